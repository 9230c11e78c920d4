//! Decode-time eviction: [`Stream`] (`defkv_stream`), started by [`Context::stream`].

use super::*;

/// `defkv_stream_aggregation` as an integer newtype: how a stream combines an entry's scores
/// across rounds.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug)]
#[repr(transparent)]
pub struct Aggregation(pub i32);
impl Aggregation {
    /// The current round's score only (kvpress DecodingPress).
    pub const LATEST: Aggregation = Aggregation(0);
    /// The running maximum over every round that scored the entry (the default).
    pub const MAX: Aggregation = Aggregation(1);
    /// `r = max(decay * r, s)`: a maximum that fades.
    pub const MAX_DECAY: Aggregation = Aggregation(2);
}

/// Stream parameters (`defkv_stream_params`): the model's shape, each head's cache capacity
/// and the budget, then the library's defaults (interval 128, [`Aggregation::MAX`], decay 0.9)
/// changed by the setters.
#[derive(Clone, Copy)]
pub struct StreamParams {
    raw: sys::defkv_stream_params,
}

impl StreamParams {
    /// `n_layers` layers of `n_heads` query heads, `n_kv_heads` KV heads of dimension
    /// `head_dim`; `capacity` rows per head in each layer's cache; `budget` entries kept per
    /// head after a round (at least window + n_sink).
    pub fn new(n_layers: i32, n_heads: i32, n_kv_heads: i32, head_dim: i32, capacity: i32, budget: i64) -> StreamParams {
        // SAFETY: plain data filled by the default function.
        let mut raw: sys::defkv_stream_params = unsafe { std::mem::zeroed() };
        unsafe { sys::defkv_stream_params_default(&mut raw) };
        raw.n_layers = n_layers;
        raw.n_heads = n_heads;
        raw.n_kv_heads = n_kv_heads;
        raw.head_dim = head_dim;
        raw.capacity = capacity;
        raw.budget = budget;
        StreamParams { raw }
    }
    /// Steps between rounds (at least the window).
    pub fn interval(mut self, n: i32) -> StreamParams {
        self.raw.interval = n;
        self
    }
    /// How scores combine across rounds.
    pub fn aggregation(mut self, a: Aggregation) -> StreamParams {
        self.raw.aggregation = a.0;
        self
    }
    /// A head above budget + slack makes a round due (0: the interval).
    pub fn slack(mut self, n: i64) -> StreamParams {
        self.raw.slack = n;
        self
    }
    /// The [`Aggregation::MAX_DECAY`] factor in (0, 1].
    pub fn decay(mut self, d: f32) -> StreamParams {
        self.raw.decay = d;
        self
    }
    /// The budget per head.
    pub fn budget(&self) -> i64 {
        self.raw.budget
    }
    /// The steps between rounds.
    pub fn get_interval(&self) -> i32 {
        self.raw.interval
    }
}

/// One layer's cache in a round, borrowing it for `'a`: writable keys and values `[Hk, C, d]`
/// with `C` at least every head's length, or a [`PagedKv`] with writable pools (its `seq_lens`
/// are not read: the stream knows each head's length); plus `o_proj` `[D, H*d]` for
/// defensivekv and layer-defensivekv streams.
#[derive(Clone, Copy)]
pub struct StreamCache<'a> {
    keys: Option<Tensor<'a>>,
    values: Option<Tensor<'a>>,
    paged: Option<PagedKv<'a>>,
    o_proj: Option<Tensor<'a>>,
}

impl<'a> StreamCache<'a> {
    /// A contiguous cache (tensors made with `Tensor::*_mut`).
    pub fn contiguous(keys: Tensor<'a>, values: Tensor<'a>) -> StreamCache<'a> {
        StreamCache { keys: Some(keys), values: Some(values), paged: None, o_proj: None }
    }
    /// A paged cache.
    pub fn paged(paged: PagedKv<'a>) -> StreamCache<'a> {
        StreamCache { keys: None, values: None, paged: Some(paged), o_proj: None }
    }
    /// Adds the layer's output projection `[D, H*d]`.
    pub fn with_o_proj(mut self, o_proj: Tensor<'a>) -> StreamCache<'a> {
        self.o_proj = Some(o_proj);
        self
    }
}

/// Decode-time eviction over the caches of a model's layers, borrowing its [`Context`] (so the
/// context cannot be dropped while the stream lives). The engine writes each new token's K/V at
/// row [`Stream::head_lens`]`[k]` of every head, calls [`Stream::append`] and
/// [`Stream::push_queries`], and runs [`Stream::round`] when [`Stream::due`]. Freed on drop.
pub struct Stream<'c> {
    raw: NonNull<sys::defkv_stream>,
    ctx: &'c Context,
    n_layers: usize,
    n_kv_heads: usize,
    capacity: usize,
}

impl Drop for Stream<'_> {
    fn drop(&mut self) {
        // SAFETY: owned handle; the context outlives it by the borrow.
        unsafe { sys::defkv_stream_destroy(self.raw.as_ptr()) }
    }
}

impl Context {
    /// Starts a stream: `params` gives the method (snapkv, ada-snapkv, defensivekv,
    /// layer-defensivekv or streamingllm), window, kernel, scale and n_sink; `sp` the shape,
    /// capacity, budget, interval and aggregation.
    pub fn stream(&self, params: &Params, sp: &StreamParams) -> Result<Stream<'_>> {
        let mut s: *mut sys::defkv_stream = std::ptr::null_mut();
        let mut raw_sp = sp.raw;
        raw_sp.struct_size = std::mem::size_of::<sys::defkv_stream_params>() as u32;
        // SAFETY: valid handle, parameters and out pointer.
        self.check("Context::stream", unsafe { sys::defkv_stream_create(self.raw.as_ptr(), &params.raw, &raw_sp, &mut s) })?;
        let raw = NonNull::new(s).ok_or_else(|| Error::new(Status::INTERNAL, "defkv_stream_create returned NULL"))?;
        Ok(Stream {
            raw,
            ctx: self,
            n_layers: sp.raw.n_layers.max(0) as usize,
            n_kv_heads: sp.raw.n_kv_heads.max(0) as usize,
            capacity: sp.raw.capacity.max(0) as usize,
        })
    }
}

impl Stream<'_> {
    /// Registers `n` new entries the engine wrote after the last live row of every head of `layer`.
    pub fn append(&mut self, layer: i32, n: i32) -> Result<()> {
        // SAFETY: valid handle.
        self.ctx.check("Stream::append", unsafe { sys::defkv_stream_append(self.raw.as_ptr(), layer, n) })
    }
    /// Pushes the post-rotary queries `[H, n, d]` of the newest `n` steps of `layer` (the
    /// stream keeps the last window of them); each call counts `n` steps towards [`Stream::due`].
    pub fn push_queries(&mut self, layer: i32, queries: &Tensor<'_>) -> Result<()> {
        // SAFETY: the tensor borrows live memory for the call; the stream copies the queries.
        self.ctx.check("Stream::push_queries", unsafe {
            sys::defkv_stream_push_queries(self.raw.as_ptr(), layer, &queries.raw)
        })
    }
    /// Whether a round is due: interval steps pushed to some layer since the last round, or a
    /// head holding more than budget + slack entries.
    pub fn due(&self) -> Result<bool> {
        let mut due = 0i32;
        // SAFETY: valid handle and out pointer.
        self.ctx.check("Stream::due", unsafe { sys::defkv_stream_due(self.raw.as_ptr(), &mut due) })?;
        Ok(due != 0)
    }
    /// The live entries of each KV head of `layer`: the row where each head's next token goes.
    pub fn head_lens(&self, layer: i32) -> Result<Vec<i32>> {
        let mut lens = vec![0i32; self.n_kv_heads.max(1)];
        // SAFETY: lens holds Hk entries.
        self.ctx.check("Stream::head_lens", unsafe { sys::defkv_stream_head_lens(self.raw.as_ptr(), layer, lens.as_mut_ptr()) })?;
        lens.truncate(self.n_kv_heads);
        Ok(lens)
    }
    /// Runs a round over every layer (`caches`: one per layer): scores, selects and compacts the
    /// caches in place. Rows past a head's new length are left as they were; a paged cache's
    /// pages past `ceil(head_len / page_size)` are no longer used. Errors leave the stream and
    /// the caches unchanged.
    pub fn round(&mut self, caches: &mut [StreamCache<'_>]) -> Result<()> {
        self.run_round("Stream::round", caches, None)
    }
    /// [`Stream::round`], also returning each layer's selection: `head_lens` and `cu_seqlens`
    /// per KV head, `indices` the kept rows (of the live entries before the round), `keep_mask`
    /// and `scores` `[Hk, capacity]`.
    pub fn round_selections(&mut self, caches: &mut [StreamCache<'_>]) -> Result<Vec<Selection>> {
        let (hk, per) = (self.n_kv_heads, self.n_kv_heads * self.capacity);
        let mut sels: Vec<Selection> = (0..self.n_layers)
            .map(|_| Selection {
                head_lens: vec![0; hk],
                cu_seqlens: vec![0; hk + 1],
                indices: vec![0; per],
                keep_mask: vec![0; per],
                scores: vec![0.0; per],
            })
            .collect();
        let mut raw: Vec<sys::defkv_selection> = sels.iter_mut().map(|s| s.raw()).collect();
        self.run_round("Stream::round_selections", caches, Some(&mut raw))?;
        Ok(sels)
    }
    fn run_round(&mut self, caller: &str, caches: &mut [StreamCache<'_>], sels: Option<&mut [sys::defkv_selection]>)
                 -> Result<()> {
        if caches.len() != self.n_layers {
            return Err(Error::new(Status::INVALID_ARGUMENT, format!(
                "{caller}: {} caches, expected one per layer ({})", caches.len(), self.n_layers)));
        }
        for (l, c) in caches.iter().enumerate() {
            if let Some(p) = &c.paged {
                p.require_writable(caller, &format!("caches[{l}].paged"))?;
                let rows = if p.layout() == PageLayout::HEAD { self.n_kv_heads as i64 } else { 1 };
                p.check_tables(caller, &format!("caches[{l}].paged"), rows, None)?;
            }
            for (what, t) in [("keys", c.keys), ("values", c.values)] {
                if t.map_or(false, |t| !t.writable) {
                    return Err(Error::new(Status::INVALID_ARGUMENT, format!(
                        "{caller}: caches[{l}].{what} must be a writable tensor (Tensor::*_mut) for compaction")));
                }
            }
        }
        let raw: Vec<sys::defkv_stream_cache> = caches
            .iter()
            .map(|c| sys::defkv_stream_cache {
                keys: c.keys.map_or(ABSENT, |t| t.raw),
                values: c.values.map_or(ABSENT, |t| t.raw),
                paged: c.paged.as_ref().map_or(std::ptr::null(), |p| &p.raw),
                o_proj: c.o_proj.map_or(ABSENT, |t| t.raw),
            })
            .collect();
        let out = sels.map_or(std::ptr::null_mut(), |s| s.as_mut_ptr());
        // SAFETY: one cache per layer, borrowing live (writable) memory for the call; the
        // selections, when given, hold Hk, Hk + 1 and Hk * capacity entries per layer.
        self.ctx.check(caller, unsafe { sys::defkv_stream_round(self.raw.as_ptr(), raw.as_ptr(), out) })
    }
}
