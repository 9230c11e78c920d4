//! Safe Rust API of libdefkv: KV-cache eviction with DefensiveKV and the methods it is compared
//! with. Inputs are borrowed views of the caller's memory (no copies); results come back as a
//! [`Selection`]; [`Context::compact_inplace`] moves the kept entries to the front of the
//! caller's own key/value buffers.
//!
//! ```no_run
//! use defkv::{Context, Layer, Method, Params, Sequence, Tensor};
//! # fn main() -> defkv::Result<()> {
//! let (h, hk, w, l, d) = (8, 2, 32, 1024, 64);
//! let q = vec![0f32; h * w * d];
//! let mut k = vec![0f32; hk * l * d];
//! let mut v = vec![0f32; hk * l * d];
//! let o = vec![0f32; 512 * h * d];
//! let ctx = Context::new()?;
//! let mut layer = Layer::new(vec![Sequence::with_queries(
//!     Tensor::f32(&q, &[h as i64, w as i64, d as i64])?,
//!     Tensor::f32_mut(&mut k, &[hk as i64, l as i64, d as i64])?,
//!     Tensor::f32_mut(&mut v, &[hk as i64, l as i64, d as i64])?,
//! )])
//! .with_o_proj(Tensor::f32(&o, &[512, (h * d) as i64])?);
//! let params = Params::new(Method::DEFENSIVEKV).compression_ratio(0.8);
//! let sel = ctx.select(&params, &layer)?;
//! ctx.compact_inplace(&mut layer, &sel)?;
//! # Ok(()) }
//! ```
//!
//! Paged caches (vLLM / FlashInfer page pools with block tables) are described by a
//! [`PagedKv`] given to [`Layer::with_paged`]; [`Context::compact_paged_inplace`] and
//! [`Context::compact_paged_into`] compact them and return the page ids they free.
#![deny(missing_docs)]

use defkv_sys as sys;
use std::cell::Cell;
use std::ffi::{CStr, CString};
use std::fmt;
use std::marker::PhantomData;
use std::os::raw::c_char;
use std::ptr::NonNull;

/// `defkv_status` as an integer newtype: values this crate does not know are kept, not lost.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug)]
#[repr(transparent)]
pub struct Status(pub i32);

impl Status {
    /// DEFKV_SUCCESS
    pub const SUCCESS: Status = Status(0);
    /// DEFKV_ERROR_INVALID_ARGUMENT
    pub const INVALID_ARGUMENT: Status = Status(-1);
    /// DEFKV_ERROR_OUT_OF_MEMORY
    pub const OUT_OF_MEMORY: Status = Status(-2);
    /// DEFKV_ERROR_UNSUPPORTED
    pub const UNSUPPORTED: Status = Status(-3);
    /// DEFKV_ERROR_BACKEND_UNAVAILABLE
    pub const BACKEND_UNAVAILABLE: Status = Status(-4);
    /// DEFKV_ERROR_SIZE_OVERFLOW
    pub const SIZE_OVERFLOW: Status = Status(-5);
    /// DEFKV_ERROR_NON_FINITE
    pub const NON_FINITE: Status = Status(-6);
    /// DEFKV_ERROR_INVALID_STATE
    pub const INVALID_STATE: Status = Status(-7);
    /// DEFKV_ERROR_BUFFER_TOO_SMALL
    pub const BUFFER_TOO_SMALL: Status = Status(-8);
    /// DEFKV_ERROR_BACKEND_FAILURE
    pub const BACKEND_FAILURE: Status = Status(-9);
    /// DEFKV_ERROR_INTERNAL
    pub const INTERNAL: Status = Status(-10);

    /// The library's short description of the status ("invalid argument", ...).
    pub fn description(self) -> &'static str {
        // SAFETY: defkv_status_string never returns NULL and returns static strings.
        unsafe { static_str(sys::defkv_status_string(self.0)).unwrap_or("") }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.description(), self.0)
    }
}

/// `defkv_method` as an integer newtype.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug)]
#[repr(transparent)]
pub struct Method(pub i32);

impl Method {
    /// SnapKV, per head.
    pub const SNAPKV: Method = Method(0);
    /// AdaKV-SnapKV, head-adaptive.
    pub const ADA_SNAPKV: Method = Method(1);
    /// CriticalKV, per head.
    pub const CRITICALKV: Method = Method(2);
    /// CriticalKV with AdaKV budgets.
    pub const ADA_CRITICALKV: Method = Method(3);
    /// DefensiveKV, head-adaptive.
    pub const DEFENSIVEKV: Method = Method(4);
    /// Layer-DefensiveKV, layer-adaptive (use [`Context::global`] for several layers).
    pub const LAYER_DEFENSIVEKV: Method = Method(5);
    /// StreamingLLM.
    pub const STREAMINGLLM: Method = Method(6);
    /// Key-norm.
    pub const KNORM: Method = Method(7);
    /// TOVA.
    pub const TOVA: Method = Method(8);
    /// Random (seeded).
    pub const RANDOM: Method = Method(9);
    /// Number of methods this header version knows.
    pub const COUNT: i32 = 10;

    /// Parses a CLI method name such as "defensivekv".
    pub fn from_name(name: &str) -> Result<Method> {
        let c = CString::new(name).map_err(|_| Error::new(Status::INVALID_ARGUMENT, "method name contains a NUL byte"))?;
        let mut m = 0i32;
        // SAFETY: c is a valid C string and m a valid out pointer for the call.
        let st = unsafe { sys::defkv_method_from_name(c.as_ptr(), &mut m) };
        if st != 0 {
            return Err(Error::new(Status(st), format!("unknown method name {name:?}")));
        }
        Ok(Method(m))
    }
    /// The CLI name ("defensivekv"), or None for an unknown value.
    pub fn name(self) -> Option<&'static str> {
        // SAFETY: static string or NULL.
        unsafe { static_str(sys::defkv_method_name(self.0)) }
    }
    /// The official press class name ("EfficientDefensiveKVPress"), or None.
    pub fn press_name(self) -> Option<&'static str> {
        // SAFETY: static string or NULL.
        unsafe { static_str(sys::defkv_method_press_name(self.0)) }
    }
}

/// `defkv_dtype` as an integer newtype.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug)]
#[repr(transparent)]
pub struct Dtype(pub i32);
impl Dtype {
    /// float32
    pub const F32: Dtype = Dtype(0);
    /// IEEE binary16 (stored as u16 bits)
    pub const F16: Dtype = Dtype(1);
    /// bfloat16 (stored as u16 bits)
    pub const BF16: Dtype = Dtype(2);
}

/// `defkv_backend` as an integer newtype.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug)]
#[repr(transparent)]
pub struct Backend(pub i32);
impl Backend {
    /// The best available backend.
    pub const AUTO: Backend = Backend(0);
    /// CPU backend.
    pub const CPU: Backend = Backend(1);
    /// CUDA backend.
    pub const CUDA: Backend = Backend(2);
    /// Vulkan backend.
    pub const VULKAN: Backend = Backend(3);
    /// Ok if the backend can be used on this machine.
    pub fn available(self) -> Result<()> {
        // SAFETY: plain value call.
        let st = unsafe { sys::defkv_backend_available(self.0) };
        if st == 0 {
            Ok(())
        } else {
            Err(Error::new(Status(st), format!("backend {} is not available here", self.0)))
        }
    }
    /// "cpu", "cuda", ...
    pub fn name(self) -> Option<&'static str> {
        // SAFETY: static string or NULL.
        unsafe { static_str(sys::defkv_backend_name(self.0)) }
    }
}

/// `defkv_memory`: where a tensor's data lives.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug)]
#[repr(transparent)]
pub struct Memory(pub i32);
impl Memory {
    /// Host memory.
    pub const HOST: Memory = Memory(0);
    /// CUDA device pointer.
    pub const CUDA_DEVICE: Memory = Memory(1);
    /// VkBuffer handle.
    pub const VULKAN_BUFFER: Memory = Memory(2);
}

/// `defkv_window_bias` as an integer newtype.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug)]
#[repr(transparent)]
pub struct WindowBias(pub i32);
impl WindowBias {
    /// The official code's measurement (default).
    pub const OFFICIAL: WindowBias = WindowBias(0);
    /// The paper's intent.
    pub const WINDOW: WindowBias = WindowBias(1);
}

/// `defkv_nonfinite_policy` as an integer newtype.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug)]
#[repr(transparent)]
pub struct NonFinite(pub i32);
impl NonFinite {
    /// Reject NaN/Inf (default).
    pub const REJECT: NonFinite = NonFinite(0);
    /// Rank non-finite cache entries lowest.
    pub const LOWEST: NonFinite = NonFinite(1);
}

/// An error of the library: the status code and the message naming the offending argument.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Error {
    status: Status,
    message: String,
}

impl Error {
    fn new(status: Status, message: impl Into<String>) -> Error {
        Error { status, message: message.into() }
    }
    /// The status code (never SUCCESS).
    pub fn status(&self) -> Status {
        self.status
    }
    /// The library's message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "defkv: {}: {}", self.status, self.message)
    }
}

impl std::error::Error for Error {}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

unsafe fn static_str(p: *const c_char) -> Option<&'static str> {
    if p.is_null() {
        None
    } else {
        CStr::from_ptr(p).to_str().ok()
    }
}

unsafe fn owned_str(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

/// "defkv_kept_count: layer.seqs[0]..." -> "Context::select: layer.seqs[0]...".
fn caller_message(caller: &str, msg: &str) -> String {
    let rest = match msg.split_once(": ") {
        Some((head, rest)) if head.starts_with("defkv_") && !head.contains(' ') => rest,
        _ => msg,
    };
    format!("{caller}: {rest}")
}

/// The library version ("0.2.0").
pub fn version() -> &'static str {
    // SAFETY: static string.
    unsafe { static_str(sys::defkv_version_string()).unwrap_or("") }
}

/// The library version as MAJOR*10000 + MINOR*100 + PATCH.
pub fn version_number() -> u32 {
    // SAFETY: plain call.
    unsafe { sys::defkv_version_number() }
}

/// The error of the last failed context-free call on this thread, naming `caller`.
fn global_error(caller: &str, st: i32) -> Error {
    // SAFETY: the thread-local message of the failed call.
    let msg = unsafe { owned_str(sys::defkv_last_error_global()) };
    Error::new(Status(st), caller_message(caller, &msg))
}

/// Pages each (sequence, KV head) needs for its kept entries, `ceil(head_lens[i] /
/// page_size)`, and their total: what to allocate before [`Context::compact_paged_into`].
pub fn pages_needed(head_lens: &[i32], page_size: i32) -> Result<(Vec<i32>, i64)> {
    let mut pages = vec![0i32; head_lens.len()];
    let mut total = 0i64;
    // SAFETY: both arrays hold head_lens.len() entries.
    let st = unsafe {
        sys::defkv_paged_pages_needed(head_lens.as_ptr(), head_lens.len() as i64, page_size, pages.as_mut_ptr(), &mut total)
    };
    if st != 0 {
        return Err(global_error("pages_needed", st));
    }
    Ok((pages, total))
}

/// Where each block-table row's next token goes when decoding after compaction: row `i`
/// (length `lens[i]`) appends at slot `offsets[i]` of page `pages[i]`, or, where `pages[i]` is
/// -1, the row is full: allocate a page, append its id to the row and write at slot 0.
/// Returns `(pages, offsets)`.
pub fn next_slots(lens: &[i32], block_tables: &[i32], block_table_stride: i64, page_size: i32)
                  -> Result<(Vec<i32>, Vec<i32>)> {
    if block_table_stride >= 1
        && (block_tables.len() as u64) < (lens.len() as u64).saturating_mul(block_table_stride as u64)
    {
        return Err(Error::new(Status::INVALID_ARGUMENT, format!(
            "next_slots: block_tables has {} entries, expected {} rows of {block_table_stride}",
            block_tables.len(), lens.len())));
    }
    let (mut pages, mut offsets) = (vec![0i32; lens.len()], vec![0i32; lens.len()]);
    // SAFETY: the tables hold every row read (checked above); outputs hold lens.len() entries.
    let st = unsafe {
        sys::defkv_paged_next_slots(lens.as_ptr(), lens.len() as i64, block_tables.as_ptr(), block_table_stride,
                                    page_size, pages.as_mut_ptr(), offsets.as_mut_ptr())
    };
    if st != 0 {
        return Err(global_error("next_slots", st));
    }
    Ok((pages, offsets))
}

// ---------------------------------------------------------------------------------------------
// Tensors
// ---------------------------------------------------------------------------------------------

/// A strided view of caller memory, borrowed for `'a`. Built from a shared slice it is
/// read-only; built from a mutable slice (`*_mut`) the library may write to it (compaction).
#[derive(Clone, Copy)]
pub struct Tensor<'a> {
    raw: sys::defkv_tensor,
    len: usize, // elements available from data (host tensors)
    writable: bool,
    _borrow: PhantomData<&'a ()>,
}

fn check_shape(shape: &[i64]) -> Result<()> {
    if shape.is_empty() || shape.len() > sys::DEFKV_MAX_DIMS as usize {
        return Err(Error::new(Status::INVALID_ARGUMENT, format!("shape has {} dimensions, expected 1 to 4", shape.len())));
    }
    if let Some(s) = shape.iter().find(|&&s| s < 0) {
        return Err(Error::new(Status::INVALID_ARGUMENT, format!("shape has a negative extent {s}")));
    }
    Ok(())
}

fn contiguous_len(shape: &[i64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &s| acc.checked_mul(usize::try_from(s).ok()?))
}

mod sealed {
    pub trait Sealed {}
}

/// An element type the library reads: `f32`, and with the `half` feature `half::f16` and
/// `half::bf16`. Sealed: its dtype must match the memory layout.
pub trait Element: Copy + sealed::Sealed {
    /// The library's dtype of this element type.
    const DTYPE: Dtype;
}
impl sealed::Sealed for f32 {}
impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
}
#[cfg(feature = "half")]
impl sealed::Sealed for half::f16 {}
#[cfg(feature = "half")]
impl Element for half::f16 {
    const DTYPE: Dtype = Dtype::F16;
}
#[cfg(feature = "half")]
impl sealed::Sealed for half::bf16 {}
#[cfg(feature = "half")]
impl Element for half::bf16 {
    const DTYPE: Dtype = Dtype::BF16;
}

impl<'a> Tensor<'a> {
    fn host(ptr: *const u8, len: usize, dtype: Dtype, shape: &[i64], writable: bool) -> Result<Tensor<'a>> {
        check_shape(shape)?;
        let need = contiguous_len(shape)
            .ok_or_else(|| Error::new(Status::SIZE_OVERFLOW, "shape product overflows"))?;
        if need != len {
            return Err(Error::new(
                Status::INVALID_ARGUMENT,
                format!("slice has {len} elements but shape {shape:?} needs {need}"),
            ));
        }
        Ok(Self::host_unchecked(ptr, len, dtype, shape, writable))
    }
    fn host_strided(ptr: *const u8, len: usize, dtype: Dtype, shape: &[i64], strides: &[i64],
                    writable: bool) -> Result<Tensor<'a>> {
        check_shape(shape)?;
        Self::host_unchecked(ptr, len, dtype, shape, writable).with_strides(strides)
    }
    /// A read-only contiguous row-major tensor over `data` (f32, or half::f16/bf16 with the
    /// `half` feature); the slice holds exactly the shape's elements.
    pub fn new<T: Element>(data: &'a [T], shape: &[i64]) -> Result<Tensor<'a>> {
        Self::host(data.as_ptr().cast(), data.len(), T::DTYPE, shape, false)
    }
    /// A writable contiguous row-major tensor over `data`.
    pub fn new_mut<T: Element>(data: &'a mut [T], shape: &[i64]) -> Result<Tensor<'a>> {
        Self::host(data.as_mut_ptr().cast(), data.len(), T::DTYPE, shape, true)
    }
    /// A read-only strided view: logical `shape`, element `strides` (one per dimension). The
    /// slice must hold every element the strides reach and may be larger, so a preallocated
    /// head-major cache `[Hk, Lmax, d]` holding `L < Lmax` tokens is
    /// `Tensor::strided(&cache, &[hk, l, d], &[lmax * d, d, 1])`.
    pub fn strided<T: Element>(data: &'a [T], shape: &[i64], strides: &[i64]) -> Result<Tensor<'a>> {
        Self::host_strided(data.as_ptr().cast(), data.len(), T::DTYPE, shape, strides, false)
    }
    /// A writable strided view (see [`Tensor::strided`]); compaction writes through it.
    pub fn strided_mut<T: Element>(data: &'a mut [T], shape: &[i64], strides: &[i64]) -> Result<Tensor<'a>> {
        Self::host_strided(data.as_mut_ptr().cast(), data.len(), T::DTYPE, shape, strides, true)
    }
    fn host_unchecked(ptr: *const u8, len: usize, dtype: Dtype, shape: &[i64], writable: bool) -> Tensor<'a> {
        let mut raw = sys::defkv_tensor {
            data: ptr as *mut std::ffi::c_void,
            dtype: dtype.0,
            ndim: shape.len() as i32,
            shape: [0; 4],
            strides: [0; 4],
            memory: Memory::HOST.0,
            reserved0: 0,
            byte_offset: 0,
        };
        raw.shape[..shape.len()].copy_from_slice(shape);
        Tensor { raw, len, writable, _borrow: PhantomData }
    }
    /// A read-only contiguous row-major f32 tensor over `data`.
    pub fn f32(data: &'a [f32], shape: &[i64]) -> Result<Tensor<'a>> {
        Self::host(data.as_ptr().cast(), data.len(), Dtype::F32, shape, false)
    }
    /// A writable contiguous row-major f32 tensor over `data`.
    pub fn f32_mut(data: &'a mut [f32], shape: &[i64]) -> Result<Tensor<'a>> {
        Self::host(data.as_mut_ptr().cast(), data.len(), Dtype::F32, shape, true)
    }
    /// A read-only f16 tensor over raw binary16 bits.
    pub fn f16(data: &'a [u16], shape: &[i64]) -> Result<Tensor<'a>> {
        Self::host(data.as_ptr().cast(), data.len(), Dtype::F16, shape, false)
    }
    /// A writable f16 tensor over raw binary16 bits.
    pub fn f16_mut(data: &'a mut [u16], shape: &[i64]) -> Result<Tensor<'a>> {
        Self::host(data.as_mut_ptr().cast(), data.len(), Dtype::F16, shape, true)
    }
    /// A read-only bf16 tensor over raw bfloat16 bits.
    pub fn bf16(data: &'a [u16], shape: &[i64]) -> Result<Tensor<'a>> {
        Self::host(data.as_ptr().cast(), data.len(), Dtype::BF16, shape, false)
    }
    /// A writable bf16 tensor over raw bfloat16 bits.
    pub fn bf16_mut(data: &'a mut [u16], shape: &[i64]) -> Result<Tensor<'a>> {
        Self::host(data.as_mut_ptr().cast(), data.len(), Dtype::BF16, shape, true)
    }
    /// Sets element strides (one per logical dimension); the slice must hold every element
    /// the strides reach (checked). For host tensors only.
    pub fn with_strides(mut self, strides: &[i64]) -> Result<Tensor<'a>> {
        let nd = self.raw.ndim as usize;
        if strides.len() != nd {
            return Err(Error::new(Status::INVALID_ARGUMENT, format!("{} strides for {nd} dimensions", strides.len())));
        }
        if strides.iter().any(|&s| s < 0) {
            return Err(Error::new(Status::INVALID_ARGUMENT, "strides must be non-negative"));
        }
        let mut last: i64 = 0;
        for (&n, &s) in self.raw.shape[..nd].iter().zip(strides) {
            if n == 0 {
                last = -1;
                break;
            }
            last = (n - 1).checked_mul(s).and_then(|x| x.checked_add(last))
                .ok_or_else(|| Error::new(Status::SIZE_OVERFLOW, "strided extent overflows"))?;
        }
        if last >= 0 && (last as u64) >= self.len as u64 {
            return Err(Error::new(
                Status::INVALID_ARGUMENT,
                format!("strides {strides:?} reach element {last} of a slice of {}", self.len),
            ));
        }
        self.raw.strides[..nd].copy_from_slice(strides);
        Ok(self)
    }
    /// A tensor in device memory (a CUDA pointer or a VkBuffer handle given as an integer).
    ///
    /// # Safety
    /// `address` must be valid device memory of the given memory kind holding every element
    /// the shape and strides reach, and must stay valid while the tensor is used; it is
    /// writable if `writable` is true.
    pub unsafe fn device(address: usize, memory: Memory, dtype: Dtype, shape: &[i64], strides: Option<&[i64]>,
                         byte_offset: i64, writable: bool) -> Result<Tensor<'static>> {
        check_shape(shape)?;
        let mut raw = sys::defkv_tensor {
            data: address as *mut std::ffi::c_void,
            dtype: dtype.0,
            ndim: shape.len() as i32,
            shape: [0; 4],
            strides: [0; 4],
            memory: memory.0,
            reserved0: 0,
            byte_offset,
        };
        raw.shape[..shape.len()].copy_from_slice(shape);
        if let Some(s) = strides {
            if s.len() != shape.len() {
                return Err(Error::new(Status::INVALID_ARGUMENT, "strides and shape differ in length"));
            }
            raw.strides[..s.len()].copy_from_slice(s);
        }
        Ok(Tensor { raw, len: usize::MAX, writable, _borrow: PhantomData })
    }
    /// The logical shape.
    pub fn shape(&self) -> &[i64] {
        &self.raw.shape[..self.raw.ndim as usize]
    }
    /// The element type.
    pub fn dtype(&self) -> Dtype {
        Dtype(self.raw.dtype)
    }
    /// Whether the library may write through this view.
    pub fn is_writable(&self) -> bool {
        self.writable
    }
}

const ABSENT: sys::defkv_tensor = sys::defkv_tensor {
    data: std::ptr::null_mut(),
    dtype: 0,
    ndim: 0,
    shape: [0; 4],
    strides: [0; 4],
    memory: 0,
    reserved0: 0,
    byte_offset: 0,
};

/// One sequence of a batch: queries (or attention), keys and values of one layer (keys and
/// values absent when the layer's cache is paged).
#[derive(Clone, Copy)]
pub struct Sequence<'a> {
    queries: Option<Tensor<'a>>,
    attention: Option<Tensor<'a>>,
    keys: Option<Tensor<'a>>,
    values: Option<Tensor<'a>>,
}

impl<'a> Sequence<'a> {
    /// Queries [H, W, d], keys [Hk, L, d], values [Hk, L, d].
    pub fn with_queries(queries: Tensor<'a>, keys: Tensor<'a>, values: Tensor<'a>) -> Sequence<'a> {
        Sequence { queries: Some(queries), attention: None, keys: Some(keys), values: Some(values) }
    }
    /// Precomputed window attention [H, W, L], keys and values [Hk, L, d].
    pub fn with_attention(attention: Tensor<'a>, keys: Tensor<'a>, values: Tensor<'a>) -> Sequence<'a> {
        Sequence { queries: None, attention: Some(attention), keys: Some(keys), values: Some(values) }
    }
    /// Queries [H, W, d] of a sequence whose cache is in the layer's [`PagedKv`].
    pub fn paged_queries(queries: Tensor<'a>) -> Sequence<'a> {
        Sequence { queries: Some(queries), attention: None, keys: None, values: None }
    }
    /// Window attention [H, W, L] of a sequence whose cache is in the layer's [`PagedKv`].
    pub fn paged_attention(attention: Tensor<'a>) -> Sequence<'a> {
        Sequence { queries: None, attention: Some(attention), keys: None, values: None }
    }
    fn raw(&self) -> sys::defkv_sequence {
        sys::defkv_sequence {
            queries: self.queries.map_or(ABSENT, |t| t.raw),
            attention: self.attention.map_or(ABSENT, |t| t.raw),
            keys: self.keys.map_or(ABSENT, |t| t.raw),
            values: self.values.map_or(ABSENT, |t| t.raw),
        }
    }
    fn kv_heads(&self) -> i64 {
        self.keys.map_or(0, |t| t.raw.shape[0])
    }
    fn len(&self) -> i64 {
        self.keys.map_or(0, |t| t.raw.shape[1])
    }
}

/// `defkv_page_layout` as an integer newtype: how a page pool stores K or V.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug)]
#[repr(transparent)]
pub struct PageLayout(pub i32);
impl PageLayout {
    /// `[num_pages, page_size, Hk, d]` (vLLM, FlashInfer "NHD"); one block-table row per sequence.
    pub const NHD: PageLayout = PageLayout(0);
    /// `[num_pages, Hk, page_size, d]` (FlashInfer "HND"); one row per sequence.
    pub const HND: PageLayout = PageLayout(1);
    /// `[num_pages, page_size, d]`, one KV head per page; one row per (sequence, KV head),
    /// sequence-major. What [`Context::compact_paged_into`] writes.
    pub const HEAD: PageLayout = PageLayout(2);
}

/// A layer's K and V held in page pools and addressed through block tables
/// (`defkv_paged_kv`), borrowing the pools and tables for `'a`.
///
/// Row `r` of `block_tables` holds its page ids in token order at
/// `block_tables[r * block_table_stride..]`; token `t` of a row sits in page
/// `row[t / page_size]` at slot `t % page_size`. Rows: one per sequence (NHD, HND) or one per
/// (sequence, KV head) (HEAD). Pages no row points at, and slots past a sequence's end, are
/// never read (they may hold anything, NaN included). The tables are read during each call only.
#[derive(Clone, Copy)]
pub struct PagedKv<'a> {
    raw: sys::defkv_paged_kv,
    k_pages: Tensor<'a>,
    v_pages: Tensor<'a>,
    block_tables: &'a [i32],
    seq_lens: &'a [i32],
}

impl<'a> PagedKv<'a> {
    /// Pools `k_pages` and `v_pages` of the layout's shape (the same tensor for an MLA
    /// cache; writable ones for in-place compaction or as a destination), `block_tables` as
    /// rows of `block_table_stride` entries, and `seq_lens` (L of each sequence; empty for a
    /// destination of [`Context::compact_paged_into`]). For [`PageLayout::HEAD`] set
    /// [`PagedKv::n_kv_heads`].
    pub fn new(layout: PageLayout, page_size: i32, k_pages: Tensor<'a>, v_pages: Tensor<'a>, block_tables: &'a [i32],
               block_table_stride: i64, seq_lens: &'a [i32]) -> PagedKv<'a> {
        // SAFETY: plain data filled by the default function.
        let mut raw: sys::defkv_paged_kv = unsafe { std::mem::zeroed() };
        unsafe { sys::defkv_paged_kv_default(&mut raw) };
        raw.layout = layout.0;
        raw.page_size = page_size;
        raw.k_pages = k_pages.raw;
        raw.v_pages = v_pages.raw;
        raw.block_tables = block_tables.as_ptr();
        raw.block_table_stride = block_table_stride;
        raw.seq_lens = if seq_lens.is_empty() { std::ptr::null() } else { seq_lens.as_ptr() };
        PagedKv { raw, k_pages, v_pages, block_tables, seq_lens }
    }
    /// Hk: required for [`PageLayout::HEAD`]; 0 (the default) or the pools' Hk otherwise.
    pub fn n_kv_heads(mut self, hk: i32) -> PagedKv<'a> {
        self.raw.n_kv_heads = hk;
        self
    }
    /// The layout.
    pub fn layout(&self) -> PageLayout {
        PageLayout(self.raw.layout)
    }
    fn kv_heads(&self) -> i64 {
        let shape = self.k_pages.shape();
        match (self.layout(), shape.len()) {
            (PageLayout::NHD, 4) => shape[2],
            (PageLayout::HND, 4) => shape[1],
            _ => self.raw.n_kv_heads as i64,
        }
    }
    fn rows_per_seq(&self) -> i64 {
        if self.layout() == PageLayout::HEAD {
            self.raw.n_kv_heads.max(0) as i64
        } else {
            1
        }
    }
    /// Makes sure the library reads only inside the borrowed tables: `rows` rows of
    /// block_table_stride entries and (when `seqs` is Some) one length per sequence.
    fn check_tables(&self, caller: &str, what: &str, rows: i64, seqs: Option<usize>) -> Result<()> {
        let stride = self.raw.block_table_stride;
        if stride >= 1 && rows > 0 {
            let need = rows.checked_mul(stride).ok_or_else(|| Error::new(Status::SIZE_OVERFLOW, format!(
                "{caller}: {what}: {rows} rows of {stride} entries overflow")))?;
            if (self.block_tables.len() as u64) < need as u64 {
                return Err(Error::new(Status::INVALID_ARGUMENT, format!(
                    "{caller}: {what}: block_tables has {} entries, expected {rows} rows of {stride}",
                    self.block_tables.len())));
            }
        }
        if let Some(n) = seqs {
            if self.seq_lens.len() != n {
                return Err(Error::new(Status::INVALID_ARGUMENT, format!(
                    "{caller}: {what}: seq_lens has {} entries, expected one per sequence ({n})", self.seq_lens.len())));
            }
        }
        Ok(())
    }
    fn require_writable(&self, caller: &str, what: &str) -> Result<()> {
        if self.k_pages.writable && self.v_pages.writable {
            Ok(())
        } else {
            Err(Error::new(Status::INVALID_ARGUMENT, format!(
                "{caller}: {what}: k_pages and v_pages must be writable tensors (Tensor::*_mut) for compaction")))
        }
    }
}

/// One layer of a (possibly ragged) batch, borrowing every tensor for `'a`.
pub struct Layer<'a> {
    seqs: Vec<Sequence<'a>>,
    raw_seqs: Vec<sys::defkv_sequence>,
    o_proj: Option<Tensor<'a>>,
    paged: Option<PagedKv<'a>>,
}

impl<'a> Layer<'a> {
    /// A layer of the given sequences (one per batch element).
    pub fn new(seqs: Vec<Sequence<'a>>) -> Layer<'a> {
        let raw_seqs = seqs.iter().map(|s| s.raw()).collect();
        Layer { seqs, raw_seqs, o_proj: None, paged: None }
    }
    /// Reads the cache from page pools: the sequences then give only queries (or attention),
    /// [`Sequence::paged_queries`]. Errors when the block tables are shorter than the layer's
    /// rows or `seq_lens` does not have one entry per sequence.
    pub fn with_paged(mut self, paged: PagedKv<'a>) -> Result<Layer<'a>> {
        let n = self.seqs.len();
        paged.check_tables("Layer::with_paged", "paged", n as i64 * paged.rows_per_seq(), Some(n))?;
        self.paged = Some(paged);
        Ok(self)
    }
    /// Adds the output projection [D, H*d] (needed by the CriticalKV and DefensiveKV family).
    pub fn with_o_proj(mut self, o_proj: Tensor<'a>) -> Layer<'a> {
        self.o_proj = Some(o_proj);
        self
    }
    /// The sequences.
    pub fn sequences(&self) -> &[Sequence<'a>] {
        &self.seqs
    }
    fn raw(&self) -> sys::defkv_layer {
        sys::defkv_layer {
            struct_size: std::mem::size_of::<sys::defkv_layer>() as u32,
            n_seqs: self.raw_seqs.len() as i32,
            seqs: self.raw_seqs.as_ptr(),
            o_proj: self.o_proj.map_or(ABSENT, |t| t.raw),
            paged: self.paged.as_ref().map_or(std::ptr::null(), |p| &p.raw),
        }
    }
    fn shape(&self) -> LayerShape {
        if let Some(p) = &self.paged {
            return LayerShape { heads: p.seq_lens.iter().map(|&l| (p.kv_heads().max(0), (l as i64).max(0))).collect() };
        }
        LayerShape { heads: self.seqs.iter().map(|s| (s.kv_heads().max(0), s.len().max(0))).collect() }
    }
}

#[derive(Clone, PartialEq, Eq, Debug)]
struct LayerShape {
    heads: Vec<(i64, i64)>, // (Hk, L) per sequence
}

impl LayerShape {
    fn n_heads(&self) -> usize {
        self.heads.iter().map(|&(hk, _)| hk as usize).sum()
    }
    fn n_entries(&self) -> usize {
        self.heads.iter().map(|&(hk, l)| (hk * l) as usize).sum()
    }
}

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

/// Compression parameters; `Params::new` starts from the library's defaults (the official
/// code's) and each setter returns the changed value.
#[derive(Clone, Copy)]
pub struct Params {
    raw: sys::defkv_params,
}

macro_rules! setter {
    ($(#[$doc:meta])* $name:ident: $t:ty => $field:ident) => {
        $(#[$doc])*
        pub fn $name(mut self, value: $t) -> Params {
            self.raw.$field = value;
            self
        }
    };
}

impl Params {
    /// The defaults with the given method.
    pub fn new(method: Method) -> Params {
        // SAFETY: defkv_params is plain data; defkv_params_default fills every field.
        let mut raw: sys::defkv_params = unsafe { std::mem::zeroed() };
        unsafe { sys::defkv_params_default(&mut raw) };
        raw.method = method.0;
        Params { raw }
    }
    /// The method.
    pub fn method(&self) -> Method {
        Method(self.raw.method)
    }
    setter!(/// Fraction evicted in [0, 1).
        compression_ratio: f64 => compression_ratio);
    setter!(/// Absolute per-head budget (0: use the ratio).
        budget: i64 => budget);
    setter!(/// Observation window W.
        window: i32 => window);
    setter!(/// Pooling kernel (odd).
        kernel: i32 => kernel);
    setter!(/// Softmax scale (0: 1/sqrt(d)).
        scale: f32 => scale);
    setter!(/// StreamingLLM sink tokens.
        n_sink: i32 => n_sink);
    setter!(/// AdaKV safeguard fraction.
        alpha_safeguard: f64 => alpha_safeguard);
    setter!(/// CriticalKV stage-1 fraction.
        first_stage_ratio: f64 => first_stage_ratio);
    setter!(/// CriticalKV epsilon.
        epsilon: f64 => epsilon);
    setter!(/// DefensiveKV base mass threshold.
        mass_threshold: f64 => mass_threshold);
    setter!(/// Random method seed.
        seed: u64 => seed);
    /// How DefensiveKV measures the window bias.
    pub fn window_bias(mut self, b: WindowBias) -> Params {
        self.raw.window_bias = b.0;
        self
    }
    /// What to do with NaN/Inf inputs.
    pub fn nonfinite(mut self, p: NonFinite) -> Params {
        self.raw.nonfinite = p.0;
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Selection
// ---------------------------------------------------------------------------------------------

/// What a selection keeps, in the library's batch layouts: per-head arrays have
/// n_seqs*Hk entries (sequence-major), per-entry arrays concatenate [Hk, L_b] blocks.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    head_lens: Vec<i32>,
    cu_seqlens: Vec<i32>,
    indices: Vec<i32>,
    keep_mask: Vec<u8>,
    scores: Vec<f32>,
}

impl Selection {
    fn for_shape(shape: &LayerShape, capacity: i64) -> Selection {
        let heads = shape.n_heads();
        let entries = shape.n_entries();
        Selection {
            head_lens: vec![0; heads],
            cu_seqlens: vec![0; heads + 1],
            indices: vec![0; capacity.max(0) as usize],
            keep_mask: vec![0; entries],
            scores: vec![0.0; entries],
        }
    }
    fn raw(&mut self) -> sys::defkv_selection {
        sys::defkv_selection {
            struct_size: std::mem::size_of::<sys::defkv_selection>() as u32,
            memory: 0,
            head_lens: self.head_lens.as_mut_ptr(),
            cu_seqlens: self.cu_seqlens.as_mut_ptr(),
            indices: self.indices.as_mut_ptr(),
            indices_capacity: self.indices.len() as i64,
            keep_mask: self.keep_mask.as_mut_ptr(),
            scores: self.scores.as_mut_ptr(),
        }
    }
    fn raw_const(&self) -> sys::defkv_selection {
        sys::defkv_selection {
            struct_size: std::mem::size_of::<sys::defkv_selection>() as u32,
            memory: 0,
            head_lens: self.head_lens.as_ptr() as *mut i32,
            cu_seqlens: self.cu_seqlens.as_ptr() as *mut i32,
            indices: self.indices.as_ptr() as *mut i32,
            indices_capacity: self.indices.len() as i64,
            keep_mask: self.keep_mask.as_ptr() as *mut u8,
            scores: self.scores.as_ptr() as *mut f32,
        }
    }
    /// Kept entries per head.
    pub fn head_lens(&self) -> &[i32] {
        &self.head_lens
    }
    /// 0, then running sums of head_lens.
    pub fn cu_seqlens(&self) -> &[i32] {
        &self.cu_seqlens
    }
    /// Kept token positions of every head, concatenated.
    pub fn indices(&self) -> &[i32] {
        &self.indices[..*self.cu_seqlens.last().unwrap_or(&0) as usize]
    }
    /// Kept token positions of head `head` (ascending).
    pub fn kept(&self, head: usize) -> &[i32] {
        &self.indices[self.cu_seqlens[head] as usize..self.cu_seqlens[head + 1] as usize]
    }
    /// 1 kept, 0 evicted, per entry.
    pub fn keep_mask(&self) -> &[u8] {
        &self.keep_mask
    }
    /// The final score of every entry.
    pub fn scores(&self) -> &[f32] {
        &self.scores
    }
}

// ---------------------------------------------------------------------------------------------
// Context
// ---------------------------------------------------------------------------------------------

/// Options of a new context.
#[derive(Clone, Copy)]
pub struct ContextBuilder {
    raw: sys::defkv_context_options,
}

impl ContextBuilder {
    /// The backend (default CPU).
    pub fn backend(mut self, b: Backend) -> ContextBuilder {
        self.raw.backend = b.0;
        self
    }
    /// CPU threads (0 = all cores).
    pub fn threads(mut self, n: i32) -> ContextBuilder {
        self.raw.n_threads = n;
        self
    }
    /// GPU device index (-1 = best).
    pub fn device_index(mut self, i: i32) -> ContextBuilder {
        self.raw.device_index = i;
        self
    }
    /// Creates the context.
    pub fn build(self) -> Result<Context> {
        let mut ctx: *mut sys::defkv_context = std::ptr::null_mut();
        // SAFETY: valid options and out pointer.
        let st = unsafe { sys::defkv_context_create(&self.raw, &mut ctx) };
        if st != 0 {
            // SAFETY: thread-local message of the failed create.
            let msg = unsafe { owned_str(sys::defkv_last_error_global()) };
            return Err(Error::new(Status(st), caller_message("ContextBuilder::build", &msg)));
        }
        let raw = NonNull::new(ctx).ok_or_else(|| Error::new(Status::INTERNAL, "defkv_context_create returned NULL"))?;
        Ok(Context { raw, _not_sync: PhantomData })
    }
}

/// A library context (backend, threads, scratch memory). Released on drop.
///
/// `Send` but not `Sync`: the C API allows a context to move between threads but to be used by
/// only one thread at a time, and its last-error string is per context.
pub struct Context {
    raw: NonNull<sys::defkv_context>,
    _not_sync: PhantomData<Cell<()>>,
}

// SAFETY: the C API lets a context be used from any thread, one at a time; `!Sync` (the Cell
// marker) rules out concurrent use through shared references.
unsafe impl Send for Context {}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: we own the handle; any Global borrowing it has already been dropped.
        unsafe { sys::defkv_context_destroy(self.raw.as_ptr()) }
    }
}

impl Context {
    /// A CPU context with default options.
    pub fn new() -> Result<Context> {
        Context::builder().build()
    }
    /// Options for a new context.
    pub fn builder() -> ContextBuilder {
        // SAFETY: plain data filled by the default function.
        let mut raw: sys::defkv_context_options = unsafe { std::mem::zeroed() };
        unsafe { sys::defkv_context_options_default(&mut raw) };
        ContextBuilder { raw }
    }
    /// Ok, or the context's error with its message naming `caller` (the Rust method the user
    /// called) in place of the C function the library names.
    fn check(&self, caller: &str, st: i32) -> Result<()> {
        if st == 0 {
            Ok(())
        } else {
            // SAFETY: the context's message, copied before any other call on it.
            let msg = unsafe { owned_str(sys::defkv_context_last_error(self.raw.as_ptr())) };
            Err(Error::new(Status(st), caller_message(caller, &msg)))
        }
    }
    /// The backend in use.
    pub fn backend(&self) -> Backend {
        // SAFETY: valid handle.
        Backend(unsafe { sys::defkv_context_backend(self.raw.as_ptr()) })
    }
    /// CPU threads in use.
    pub fn n_threads(&self) -> i32 {
        // SAFETY: valid handle.
        unsafe { sys::defkv_context_n_threads(self.raw.as_ptr()) }
    }
    /// Upper bound (exact) of the entries `select` keeps.
    pub fn kept_count(&self, params: &Params, layer: &Layer<'_>) -> Result<i64> {
        let raw = layer.raw();
        let mut n = 0i64;
        // SAFETY: every pointer in raw borrows live memory for this call.
        self.check("Context::kept_count", unsafe { sys::defkv_kept_count(self.raw.as_ptr(), &params.raw, &raw, &mut n) })?;
        Ok(n)
    }
    /// Scratch bytes `select` needs for this layer.
    pub fn workspace_size(&self, params: &Params, layer: &Layer<'_>) -> Result<i64> {
        let raw = layer.raw();
        let mut n = 0i64;
        // SAFETY: as above.
        self.check("Context::workspace_size", unsafe { sys::defkv_workspace_size(self.raw.as_ptr(), &params.raw, &raw, &mut n) })?;
        Ok(n)
    }
    /// Scores and selects the entries of one layer to keep.
    pub fn select(&self, params: &Params, layer: &Layer<'_>) -> Result<Selection> {
        let raw = layer.raw();
        let mut cap = 0i64;
        // SAFETY: every pointer in raw borrows live memory for this call.
        self.check("Context::select", unsafe { sys::defkv_kept_count(self.raw.as_ptr(), &params.raw, &raw, &mut cap) })?;
        let mut sel = Selection::for_shape(&layer.shape(), cap);
        let mut out = sel.raw();
        // SAFETY: inputs borrow live memory; outputs are sized for this layer's shape.
        self.check("Context::select", unsafe { sys::defkv_select(self.raw.as_ptr(), &params.raw, &raw, &mut out) })?;
        Ok(sel)
    }
    fn require_writable(layer: &Layer<'_>) -> Result<()> {
        if layer.paged.is_some() {
            return Ok(()); // the library names the paged compaction to use
        }
        for (b, s) in layer.seqs.iter().enumerate() {
            if !s.keys.map_or(false, |t| t.writable) || !s.values.map_or(false, |t| t.writable) {
                return Err(Error::new(
                    Status::INVALID_ARGUMENT,
                    format!("sequence {b}: keys and values must be writable tensors (Tensor::*_mut) for compaction"),
                ));
            }
        }
        Ok(())
    }
    /// Moves each head's kept entries to the front of its own rows of the layer's keys and
    /// values, in the caller's buffers (no copies).
    pub fn compact_inplace(&self, layer: &mut Layer<'_>, sel: &Selection) -> Result<()> {
        Self::require_writable(layer)?;
        let raw = layer.raw();
        let s = sel.raw_const();
        // SAFETY: keys/values were borrowed mutably for the layer's lifetime.
        self.check("Context::compact_inplace", unsafe { sys::defkv_compact_inplace(self.raw.as_ptr(), &raw, &s) })
    }
    /// Gathers the kept entries into `keys_out`/`values_out`, logical [sum(head_lens), d].
    pub fn compact_varlen(&self, layer: &Layer<'_>, sel: &Selection, keys_out: &mut Tensor<'_>,
                          values_out: &mut Tensor<'_>) -> Result<()> {
        if !keys_out.writable || !values_out.writable {
            return Err(Error::new(Status::INVALID_ARGUMENT, "keys_out and values_out must be writable tensors"));
        }
        let raw = layer.raw();
        let s = sel.raw_const();
        // SAFETY: outputs are writable borrows.
        self.check("Context::compact_varlen", unsafe {
            sys::defkv_compact_varlen(self.raw.as_ptr(), &raw, &s, &mut keys_out.raw, &mut values_out.raw)
        })
    }
    /// Compacts a paged layer in place after [`Context::select`]: each block-table row's kept
    /// entries move to the front of the row's own slots, and the pages past those still in
    /// use are freed (per head for [`PageLayout::HEAD`]; NHD and HND heads share pages, so a
    /// sequence keeps the pages of its longest head). Returns the freed page ids, row by row
    /// in table order, for the caller's page allocator.
    pub fn compact_paged_inplace(&self, layer: &mut Layer<'_>, sel: &Selection) -> Result<Vec<i32>> {
        const CALLER: &str = "Context::compact_paged_inplace";
        let paged = layer.paged.as_ref().ok_or_else(|| Error::new(Status::INVALID_ARGUMENT, format!(
            "{CALLER}: the layer is not paged (Layer::with_paged); use Context::compact_inplace")))?;
        paged.require_writable(CALLER, "layer's pages")?;
        self.compact_paged(CALLER, layer, sel, None)
    }
    /// Gathers a paged layer's kept entries into new pages after [`Context::select`]: `dst` is
    /// a [`PageLayout::HEAD`] description (`n_kv_heads` the layer's Hk, writable pools) with
    /// one row per (sequence, KV head), as in `sel.head_lens()`, holding at least
    /// [`pages_needed`] pages each, allocated by the caller. Every source page of the layer is
    /// freed; returns their ids, row by row in table order.
    pub fn compact_paged_into(&self, layer: &Layer<'_>, sel: &Selection, dst: &mut PagedKv<'_>) -> Result<Vec<i32>> {
        const CALLER: &str = "Context::compact_paged_into";
        if layer.paged.is_none() {
            return Err(Error::new(Status::INVALID_ARGUMENT, format!(
                "{CALLER}: the layer is not paged (Layer::with_paged); use Context::compact_varlen")));
        }
        dst.require_writable(CALLER, "dst")?;
        dst.check_tables(CALLER, "dst", sel.head_lens.len() as i64, None)?;
        self.compact_paged(CALLER, layer, sel, Some(&dst.raw))
    }
    fn compact_paged(&self, caller: &str, layer: &Layer<'_>, sel: &Selection, dst: Option<&sys::defkv_paged_kv>)
                     -> Result<Vec<i32>> {
        let raw = layer.raw();
        let s = sel.raw_const();
        let dst = dst.map_or(std::ptr::null(), |d| d as *const _);
        let mut n = 0i64;
        // SAFETY: a null freed_pages only counts; every pointer borrows live memory.
        self.check(caller, unsafe {
            sys::defkv_compact_paged(self.raw.as_ptr(), &raw, &s, dst, std::ptr::null_mut(), 0, &mut n)
        })?;
        // Never empty: a null freed_pages would only count again.
        let mut freed = vec![0i32; n.max(0) as usize + 1];
        // SAFETY: pools were checked writable; freed holds n entries.
        self.check(caller, unsafe {
            sys::defkv_compact_paged(self.raw.as_ptr(), &raw, &s, dst, freed.as_mut_ptr(), n, &mut n)
        })?;
        freed.truncate(n.max(0) as usize);
        Ok(freed)
    }
    /// Starts a layer-adaptive (Layer-DefensiveKV) selection over `n_layers` layers.
    pub fn global(&self, params: &Params, n_layers: i32) -> Result<Global<'_>> {
        let mut g: *mut sys::defkv_global = std::ptr::null_mut();
        // SAFETY: valid handle, params and out pointer.
        self.check("Context::global", unsafe { sys::defkv_global_create(self.raw.as_ptr(), &params.raw, n_layers, &mut g) })?;
        let raw = NonNull::new(g).ok_or_else(|| Error::new(Status::INTERNAL, "defkv_global_create returned NULL"))?;
        Ok(Global { raw, ctx: self, shape: None })
    }
}

/// A layer-adaptive selection in progress; borrows its context.
pub struct Global<'c> {
    raw: NonNull<sys::defkv_global>,
    ctx: &'c Context,
    shape: Option<LayerShape>,
}

impl Drop for Global<'_> {
    fn drop(&mut self) {
        // SAFETY: owned handle; the context outlives it by the borrow.
        unsafe { sys::defkv_global_destroy(self.raw.as_ptr()) }
    }
}

impl Global<'_> {
    /// Scores layer `index` (each exactly once, same batch shape every time).
    pub fn add_layer(&mut self, index: i32, layer: &Layer<'_>) -> Result<()> {
        let raw = layer.raw();
        // SAFETY: the layer's memory is live for the call; the library copies the scores.
        self.ctx.check("Global::add_layer", unsafe { sys::defkv_global_add_layer(self.raw.as_ptr(), index, &raw) })?;
        self.shape.get_or_insert_with(|| layer.shape());
        Ok(())
    }
    /// Ranks all layers together (after every layer was added).
    pub fn select(&mut self) -> Result<()> {
        // SAFETY: valid handle.
        self.ctx.check("Global::select", unsafe { sys::defkv_global_select(self.raw.as_ptr()) })
    }
    /// Entries layer `index` keeps.
    pub fn layer_kept_count(&self, index: i32) -> Result<i64> {
        let mut n = 0i64;
        // SAFETY: valid handle and out pointer.
        self.ctx.check("Global::layer_kept_count", unsafe { sys::defkv_global_layer_kept_count(self.raw.as_ptr(), index, &mut n) })?;
        Ok(n)
    }
    /// Layer `index`'s share of the global selection.
    pub fn layer_selection(&self, index: i32) -> Result<Selection> {
        let shape = self.shape.clone().unwrap_or(LayerShape { heads: Vec::new() });
        let mut cap = 0i64;
        // SAFETY: valid handle and out pointer.
        self.ctx.check("Global::layer_selection", unsafe {
            sys::defkv_global_layer_kept_count(self.raw.as_ptr(), index, &mut cap)
        })?;
        let mut sel = Selection::for_shape(&shape, cap);
        let mut out = sel.raw();
        // SAFETY: outputs sized for the batch shape the layers were added with.
        self.ctx.check("Global::layer_selection", unsafe { sys::defkv_global_layer_selection(self.raw.as_ptr(), index, &mut out) })?;
        Ok(sel)
    }
}
