// Package defkv is the Go API of libdefkv: KV-cache eviction with DefensiveKV and the methods
// it is compared with. Tensors are views of the caller's Go slices (or device memory given as
// a uintptr); nothing is copied, and CompactInPlace writes into the caller's own slices.
//
// A Context is used by one goroutine at a time (calls on it are serialized by a mutex);
// different contexts are independent. Close it when done; a finalizer only backs up a
// forgotten Close.
package defkv

import (
	"fmt"
	"runtime"
	"strings"
	"sync"
	"unsafe"

	"github.com/defkv/defkv/bindings/go/internal/raw"
)

// Status is a defkv_status code (an integer, so unknown future values are kept).
type Status int32

// Status codes.
const (
	Success            Status = 0
	InvalidArgument    Status = -1
	OutOfMemory        Status = -2
	Unsupported        Status = -3
	BackendUnavailable Status = -4
	SizeOverflow       Status = -5
	NonFinite          Status = -6
	InvalidState       Status = -7
	BufferTooSmall     Status = -8
	BackendFailure     Status = -9
	Internal           Status = -10
)

func (s Status) String() string { return raw.Defkv_status_string(int(s)) }

// Method is a defkv_method value.
type Method int32

// Methods.
const (
	SnapKV           Method = 0
	AdaSnapKV        Method = 1
	CriticalKV       Method = 2
	AdaCriticalKV    Method = 3
	DefensiveKV      Method = 4
	LayerDefensiveKV Method = 5
	StreamingLLM     Method = 6
	Knorm            Method = 7
	TOVA             Method = 8
	Random           Method = 9
)

// Name is the CLI name ("defensivekv"), "" for an unknown value.
func (m Method) Name() string { return raw.Defkv_method_name(int(m)) }

// MethodFromName parses a CLI method name.
func MethodFromName(name string) (Method, error) {
	v := raw.Defkvb_method_from_name(name)
	if v < 0 {
		return 0, &Error{Code: Status(v), Message: fmt.Sprintf("unknown method name %q", name)}
	}
	return Method(v), nil
}

// Dtype is a defkv_dtype value.
type Dtype int32

// Element types.
const (
	F32  Dtype = 0
	F16  Dtype = 1
	BF16 Dtype = 2
)

// Backend is a defkv_backend value.
type Backend int32

// Backends.
const (
	BackendAuto   Backend = 0
	BackendCPU    Backend = 1
	BackendCUDA   Backend = 2
	BackendVulkan Backend = 3
)

// Memory says where a tensor's data lives.
type Memory int32

// Memory kinds.
const (
	MemoryHost         Memory = 0
	MemoryCUDADevice   Memory = 1
	MemoryVulkanBuffer Memory = 2
)

// Error is an error of the library: the status code and the message naming the argument.
type Error struct {
	Code    Status
	Message string
}

func (e *Error) Error() string {
	return fmt.Sprintf("defkv: %s (%d): %s", e.Code, int32(e.Code), e.Message)
}

// Version is the library version string.
func Version() string { return raw.Defkv_version_string() }

// Tensor is a strided view of memory: a Go slice (host) or a device address.
type Tensor struct {
	addr     uintptr
	keep     interface{} // the Go slice the address points into, kept alive while in use
	n        int64       // elements available (host tensors)
	dtype    Dtype
	shape    []int64
	strides  []int64
	memory   Memory
	offset   int64
	writable bool
}

func checkShape(n int64, shape []int64) error {
	if len(shape) < 1 || len(shape) > 4 {
		return &Error{InvalidArgument, fmt.Sprintf("shape has %d dimensions, expected 1 to 4", len(shape))}
	}
	p := int64(1)
	for _, s := range shape {
		if s < 0 {
			return &Error{InvalidArgument, fmt.Sprintf("shape %v has a negative extent", shape)}
		}
		p *= s
	}
	if p != n {
		return &Error{InvalidArgument, fmt.Sprintf("slice has %d elements but shape %v needs %d", n, shape, p)}
	}
	return nil
}

// F32Tensor views data (row-major, contiguous) as a float32 tensor of the given shape. The
// library may write to it (compaction of keys/values); nothing is copied.
func F32Tensor(data []float32, shape ...int64) (*Tensor, error) {
	if err := checkShape(int64(len(data)), shape); err != nil {
		return nil, err
	}
	t := &Tensor{keep: data, n: int64(len(data)), dtype: F32, shape: shape, writable: true}
	if len(data) > 0 {
		t.addr = uintptr(unsafe.Pointer(&data[0]))
	}
	return t, nil
}

// F32View views data as a float32 tensor of the given logical shape with element strides
// (one per dimension). The slice only has to hold every element the strides reach, so a
// preallocated head-major cache [Hk, Lmax, d] holding L < Lmax tokens is the view
// F32View(cache, []int64{Hk, L, d}, []int64{Lmax * d, d, 1}). Nothing is copied.
func F32View(data []float32, shape, strides []int64) (*Tensor, error) {
	t := &Tensor{keep: data, n: int64(len(data)), dtype: F32, shape: shape, writable: true}
	if len(data) > 0 {
		t.addr = uintptr(unsafe.Pointer(&data[0]))
	}
	return t.strided("F32View", strides)
}

// HalfView is F32View for raw 16-bit floats (dtype F16 or BF16).
func HalfView(data []uint16, dtype Dtype, shape, strides []int64) (*Tensor, error) {
	if dtype != F16 && dtype != BF16 {
		return nil, &Error{InvalidArgument, fmt.Sprintf("HalfView: dtype %d is not a 16-bit float type", dtype)}
	}
	t := &Tensor{keep: data, n: int64(len(data)), dtype: dtype, shape: shape, writable: true}
	if len(data) > 0 {
		t.addr = uintptr(unsafe.Pointer(&data[0]))
	}
	return t.strided("HalfView", strides)
}

// HalfTensor views raw 16-bit floats (dtype F16 or BF16) as a tensor, without copying.
func HalfTensor(data []uint16, dtype Dtype, shape ...int64) (*Tensor, error) {
	if dtype != F16 && dtype != BF16 {
		return nil, &Error{InvalidArgument, fmt.Sprintf("dtype %d is not a 16-bit float type", dtype)}
	}
	if err := checkShape(int64(len(data)), shape); err != nil {
		return nil, err
	}
	t := &Tensor{keep: data, n: int64(len(data)), dtype: dtype, shape: shape, writable: true}
	if len(data) > 0 {
		t.addr = uintptr(unsafe.Pointer(&data[0]))
	}
	return t, nil
}

// DeviceTensor describes device memory (a CUDA pointer or a VkBuffer handle) as a tensor. The
// caller keeps it valid while the tensor is used.
func DeviceTensor(addr uintptr, memory Memory, dtype Dtype, byteOffset int64, shape ...int64) *Tensor {
	return &Tensor{addr: addr, n: -1, dtype: dtype, shape: shape, memory: memory, offset: byteOffset, writable: true}
}

// WithStrides sets per-dimension element strides on a contiguous tensor; host tensors check
// that every element reached lies inside the slice. To view a slice larger than the logical
// shape (a cache with spare capacity) use F32View / HalfView.
func (t *Tensor) WithStrides(strides ...int64) (*Tensor, error) {
	return t.strided("WithStrides", strides)
}

func (t *Tensor) strided(fn string, strides []int64) (*Tensor, error) {
	if len(t.shape) < 1 || len(t.shape) > 4 {
		return nil, &Error{InvalidArgument, fmt.Sprintf("%s: shape has %d dimensions, expected 1 to 4", fn, len(t.shape))}
	}
	if len(strides) != len(t.shape) {
		return nil, &Error{InvalidArgument, fmt.Sprintf("%s: %d strides for %d dimensions", fn, len(strides), len(t.shape))}
	}
	last := int64(0)
	for i, s := range strides {
		if s < 0 || t.shape[i] < 0 {
			return nil, &Error{InvalidArgument, fmt.Sprintf("%s: shape %v and strides %v must be non-negative", fn, t.shape, strides)}
		}
	}
	for i, s := range strides {
		if t.shape[i] == 0 {
			last = -1
			break
		}
		last += (t.shape[i] - 1) * s
	}
	if t.n >= 0 && last >= t.n {
		return nil, &Error{InvalidArgument, fmt.Sprintf("%s: shape %v with strides %v reaches element %d of a slice of %d", fn, t.shape, strides, last, t.n)}
	}
	c := *t
	c.shape = append([]int64(nil), t.shape...)
	c.strides = append([]int64(nil), strides...)
	return &c, nil
}

// Sequence is one sequence of a batch: Queries (or Attention), Keys and Values.
type Sequence struct {
	Queries, Attention, Keys, Values *Tensor
}

// Layer is one layer of a batch. With Paged set, the cache is read from its page pools and
// every sequence gives only Queries (or Attention).
type Layer struct {
	Seqs  []Sequence
	OProj *Tensor
	Paged *PagedKV
}

// PageLayout is a defkv_page_layout value: how a page pool stores K or V.
type PageLayout int32

// Page layouts.
const (
	PageNHD  PageLayout = 0 // [numPages, pageSize, Hk, d]; one block-table row per sequence
	PageHND  PageLayout = 1 // [numPages, Hk, pageSize, d]; one row per sequence
	PageHead PageLayout = 2 // [numPages, pageSize, d]; one row per (sequence, KV head), sequence-major
)

// PagedKV is a layer's K and V held in page pools (KPages, VPages: tensors of the layout's
// shape, the same tensor for an MLA cache) and addressed through block tables: row r's page
// ids in token order are BlockTables[r*BlockTableStride:], token t of a row sits in page
// row[t/PageSize] at slot t%PageSize. SeqLens holds L of each sequence. The slices are read
// during each call only (nothing is kept); pages not in a row may hold anything, NaN included.
type PagedKV struct {
	Layout           PageLayout
	PageSize         int32
	NKVHeads         int32 // Hk: required for PageHead; 0 or the pools' Hk otherwise
	KPages, VPages   *Tensor
	BlockTables      []int32
	BlockTableStride int64
	SeqLens          []int32 // one per sequence; ignored in the destination of CompactPaged
}

// kvHeads is Hk of the description (0 when it cannot be told).
func (p *PagedKV) kvHeads() int64 {
	if p.Layout == PageHead || p.KPages == nil {
		return int64(p.NKVHeads)
	}
	sh := p.KPages.shape
	if p.Layout == PageNHD && len(sh) == 4 {
		return sh[2]
	}
	if p.Layout == PageHND && len(sh) == 4 {
		return sh[1]
	}
	return int64(p.NKVHeads)
}

// checkRows makes sure the library's reads stay inside the Go slices: rows block-table rows
// of BlockTableStride entries, and seqs sequence lengths (seqs < 0: not read).
func (p *PagedKV) checkRows(fn, what string, rows, seqs int64) error {
	if p.BlockTableStride < 1 {
		return &Error{InvalidArgument, fmt.Sprintf("%s: %s.BlockTableStride is %d, expected >= 1", fn, what, p.BlockTableStride)}
	}
	if rows > 0 && int64(len(p.BlockTables)) < rows*p.BlockTableStride {
		return &Error{InvalidArgument, fmt.Sprintf("%s: %s.BlockTables has %d entries, expected %d rows of %d", fn, what,
			len(p.BlockTables), rows, p.BlockTableStride)}
	}
	if seqs >= 0 && int64(len(p.SeqLens)) != seqs {
		return &Error{InvalidArgument, fmt.Sprintf("%s: %s.SeqLens has %d entries, expected one per sequence (%d)", fn, what,
			len(p.SeqLens), seqs)}
	}
	return nil
}

// rows is the number of block-table rows for n sequences.
func (p *PagedKV) rows(n int64) int64 {
	if p.Layout == PageHead {
		return n * int64(p.NKVHeads)
	}
	return n
}

func sliceAddr(s []int32) int64 {
	if len(s) == 0 {
		return 0
	}
	return int64(uintptr(unsafe.Pointer(&s[0])))
}

// buildPaged is the C description of p; free it (raw.Defkvb_paged_free) after the call and
// keep p's slices alive until then.
func buildPaged(p *PagedKV) (raw.Defkv_paged_kv, error) {
	r := raw.Defkvb_paged_new(int(p.Layout), int(p.PageSize), int(p.NKVHeads), sliceAddr(p.BlockTables),
		p.BlockTableStride, sliceAddr(p.SeqLens))
	if r == nil || r.Swigcptr() == 0 {
		return nil, &Error{OutOfMemory, "could not allocate the paged description"}
	}
	for which, t := range []*Tensor{p.KPages, p.VPages} {
		if t == nil {
			continue
		}
		var s, st [4]int64
		copy(s[:], t.shape)
		copy(st[:], t.strides)
		_ = raw.Defkvb_paged_set_pool(r, which, int64(t.addr), int(t.dtype), len(t.shape),
			s[0], s[1], s[2], s[3], st[0], st[1], st[2], st[3], int(t.memory), t.offset)
	}
	return r, nil
}

// WindowBias values (Params.WindowBias): how DefensiveKV measures its window bias.
const (
	WindowBiasOfficial int32 = 0 // the official code's measurement (default)
	WindowBiasWindow   int32 = 1 // the paper's intent
)

// NonFinite policies (Params.NonFinitePolicy).
const (
	NonFiniteReject int32 = 0 // reject NaN/Inf inputs (default)
	NonFiniteLowest int32 = 1 // rank cache entries with NaN/Inf keys or values lowest
)

// Params are the compression parameters; NewParams starts from the library's defaults.
type Params struct {
	Method           Method
	CompressionRatio float64
	Budget           int64
	Window, Kernel   int32
	Scale            float32
	NSink            int32
	AlphaSafeguard   float64
	FirstStageRatio  float64
	Epsilon          float64
	MassThreshold    float64
	WindowBias       int32
	NonFinitePolicy  int32
	Seed             uint64
}

// NewParams returns the defaults (the official code's) with the given method.
func NewParams(m Method) Params {
	p := raw.NewDefkv_params()
	defer raw.DeleteDefkv_params(p)
	return Params{Method: m, CompressionRatio: p.GetCompression_ratio(), Budget: p.GetBudget(),
		Window: int32(p.GetWindow()), Kernel: int32(p.GetKernel()), Scale: p.GetScale(),
		NSink: int32(p.GetN_sink()), AlphaSafeguard: p.GetAlpha_safeguard(),
		FirstStageRatio: p.GetFirst_stage_ratio(), Epsilon: p.GetEpsilon(),
		MassThreshold: p.GetMass_threshold(), WindowBias: int32(p.GetWindow_bias()),
		NonFinitePolicy: int32(p.GetNonfinite()), Seed: uint64(p.GetSeed())}
}

func (p *Params) toRaw() raw.Defkv_params {
	r := raw.NewDefkv_params()
	r.SetMethod(int(p.Method))
	r.SetCompression_ratio(p.CompressionRatio)
	r.SetBudget(p.Budget)
	r.SetWindow(int(p.Window))
	r.SetKernel(int(p.Kernel))
	r.SetScale(p.Scale)
	r.SetN_sink(int(p.NSink))
	r.SetAlpha_safeguard(p.AlphaSafeguard)
	r.SetFirst_stage_ratio(p.FirstStageRatio)
	r.SetEpsilon(p.Epsilon)
	r.SetMass_threshold(p.MassThreshold)
	r.SetWindow_bias(int(p.WindowBias))
	r.SetNonfinite(int(p.NonFinitePolicy))
	r.SetSeed(p.Seed)
	return r
}

// Selection is what a selection keeps. Per-head slices have n_seqs*Hk entries
// (sequence-major); per-entry slices concatenate [Hk, L_b] blocks.
type Selection struct {
	HeadLens  []int32
	CuSeqlens []int32
	Indices   []int32
	KeepMask  []uint8
	Scores    []float32
}

// Kept returns the kept token positions of head h (ascending).
func (s *Selection) Kept(h int) []int32 { return s.Indices[s.CuSeqlens[h]:s.CuSeqlens[h+1]] }

// Context is a library context. Close releases it (idempotent).
type Context struct {
	mu  sync.Mutex
	ptr raw.Struct_SS_defkv_context
}

// ContextOptions configure NewContext.
type ContextOptions struct {
	Backend     Backend // default BackendCPU
	Threads     int32   // 0 = all cores
	DeviceIndex int32   // -1 = best
}

// NewContext creates a CPU context with default options.
func NewContext() (*Context, error) {
	return NewContextWith(ContextOptions{Backend: BackendCPU, DeviceIndex: -1})
}

// NewContextWith creates a context with the given options.
func NewContextWith(o ContextOptions) (*Context, error) {
	// The failure status and message are per OS thread: stay on one for the create.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	p := raw.Defkvb_context_create(int(o.Backend), int(o.Threads), int(o.DeviceIndex))
	if p == nil || p.Swigcptr() == 0 {
		return nil, &Error{Status(raw.Defkvb_last_create_status()), callerMessage("NewContextWith", raw.Defkv_last_error_global())}
	}
	c := &Context{ptr: p}
	runtime.SetFinalizer(c, func(c *Context) { c.Close() })
	return c, nil
}

// Close releases the context; later calls return an InvalidState error. Safe to call twice.
func (c *Context) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ptr != nil {
		raw.Defkv_context_destroy(c.ptr)
		c.ptr = nil
		runtime.SetFinalizer(c, nil)
	}
	return nil
}

// callerMessage names the Go function the user called in place of the C function the
// library's message starts with ("defkv_kept_count: ..." becomes "Context.Select: ...").
func callerMessage(fn, msg string) string {
	if strings.HasPrefix(msg, "defkv_") {
		if i := strings.Index(msg, ": "); i > 0 && !strings.ContainsAny(msg[:i], " ") {
			msg = msg[i+2:]
		}
	}
	return fn + ": " + msg
}

func (c *Context) wrap(fn string, err error) error {
	if err == nil {
		return nil
	}
	if se, ok := err.(*raw.StatusError); ok {
		return &Error{Status(se.Code), callerMessage(fn, raw.Defkv_context_last_error(c.ptr))}
	}
	return err
}

func (c *Context) status(fn string, v int64) error {
	if v >= 0 {
		return nil
	}
	return &Error{Status(v), callerMessage(fn, raw.Defkv_context_last_error(c.ptr))}
}

var errClosed = &Error{InvalidState, "the context is closed"}

// Backend is the backend in use.
func (c *Context) Backend() Backend {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ptr == nil {
		return BackendAuto
	}
	return Backend(raw.Defkv_context_backend(c.ptr))
}

// builtLayer is a C-side layer description over Go memory; free it after the call.
type builtLayer struct {
	l     raw.Struct_SS_defkvb_layer
	paged raw.Defkv_paged_kv // nil for a contiguous layer
	keep  []*Tensor
	pkeep *PagedKV
}

func setTensor(l raw.Struct_SS_defkvb_layer, seq, which int, t *Tensor) error {
	if t == nil {
		return nil
	}
	var s, st [4]int64
	copy(s[:], t.shape)
	copy(st[:], t.strides)
	return raw.Defkvb_layer_set_tensor(l, seq, which, int64(t.addr), int(t.dtype), len(t.shape),
		s[0], s[1], s[2], s[3], st[0], st[1], st[2], st[3], int(t.memory), t.offset)
}

func buildLayer(fn string, layer *Layer) (*builtLayer, error) {
	if layer == nil {
		return nil, &Error{InvalidArgument, fn + ": layer is nil"}
	}
	if p := layer.Paged; p != nil {
		if err := p.checkRows(fn, "layer.Paged", p.rows(int64(len(layer.Seqs))), int64(len(layer.Seqs))); err != nil {
			return nil, err
		}
	}
	l := raw.Defkvb_layer_new(len(layer.Seqs))
	if l == nil || l.Swigcptr() == 0 {
		return nil, &Error{OutOfMemory, "could not allocate the layer description"}
	}
	b := &builtLayer{l: l}
	for i, s := range layer.Seqs {
		for w, t := range []*Tensor{s.Queries, s.Attention, s.Keys, s.Values} {
			if err := setTensor(l, i, w, t); err != nil {
				raw.Defkvb_layer_free(l)
				return nil, &Error{InvalidArgument, fmt.Sprintf("sequence %d tensor %d", i, w)}
			}
			b.keep = append(b.keep, t)
		}
	}
	_ = setTensor(l, 0, 4, layer.OProj)
	b.keep = append(b.keep, layer.OProj)
	if layer.Paged != nil {
		p, err := buildPaged(layer.Paged)
		if err != nil {
			raw.Defkvb_layer_free(l)
			return nil, err
		}
		raw.Defkvb_layer_set_paged(l, p)
		b.paged, b.pkeep = p, layer.Paged
		b.keep = append(b.keep, layer.Paged.KPages, layer.Paged.VPages)
	}
	return b, nil
}

func (b *builtLayer) free() {
	raw.Defkvb_layer_free(b.l)
	if b.paged != nil {
		raw.Defkvb_paged_free(b.paged)
	}
	if b.pkeep != nil {
		runtime.KeepAlive(b.pkeep.BlockTables)
		runtime.KeepAlive(b.pkeep.SeqLens)
	}
	// The Go memory the C description pointed at must stay alive until here.
	for _, t := range b.keep {
		if t != nil {
			runtime.KeepAlive(t.keep)
		}
	}
}

func shapeOf(layer *Layer) (heads, entries int) {
	if p := layer.Paged; p != nil {
		hk := int(p.kvHeads())
		for b := range layer.Seqs {
			if b < len(p.SeqLens) {
				heads += hk
				entries += hk * int(p.SeqLens[b])
			}
		}
		return
	}
	for _, s := range layer.Seqs {
		if s.Keys != nil && len(s.Keys.shape) >= 2 {
			heads += int(s.Keys.shape[0])
			entries += int(s.Keys.shape[0] * s.Keys.shape[1])
		}
	}
	return
}

func newSelection(heads, entries int, capacity int64) (*Selection, raw.Defkv_selection) {
	s := &Selection{HeadLens: make([]int32, heads), CuSeqlens: make([]int32, heads+1),
		Indices: make([]int32, capacity+1), KeepMask: make([]uint8, entries+1), Scores: make([]float32, entries+1)}
	r := raw.Defkvb_selection_new(int64(uintptr(unsafe.Pointer(&s.HeadLens[0]))),
		int64(uintptr(unsafe.Pointer(&s.CuSeqlens[0]))), int64(uintptr(unsafe.Pointer(&s.Indices[0]))), capacity,
		int64(uintptr(unsafe.Pointer(&s.KeepMask[0]))), int64(uintptr(unsafe.Pointer(&s.Scores[0]))))
	return s, r
}

func (s *Selection) finish(r raw.Defkv_selection, entries int) {
	raw.Defkvb_selection_free(r)
	runtime.KeepAlive(s)
	s.Indices = s.Indices[:s.CuSeqlens[len(s.CuSeqlens)-1]]
	s.KeepMask = s.KeepMask[:entries]
	s.Scores = s.Scores[:entries]
}

// Select scores one layer with p.Method and returns the entries to keep.
func (c *Context) Select(p Params, layer *Layer) (*Selection, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ptr == nil {
		return nil, errClosed
	}
	b, err := buildLayer("Context.Select", layer)
	if err != nil {
		return nil, err
	}
	defer b.free()
	rp := p.toRaw()
	defer raw.DeleteDefkv_params(rp)
	n := raw.Defkvb_kept_count(c.ptr, rp, b.l)
	if err := c.status("Context.Select", n); err != nil {
		return nil, err
	}
	heads, entries := shapeOf(layer)
	if heads == 0 {
		heads = 1 // never reached by a valid layer: the library rejects it before writing
	}
	sel, rs := newSelection(heads, entries, n)
	err = c.wrap("Context.Select", raw.Defkvb_select(c.ptr, rp, b.l, rs))
	if err != nil {
		raw.Defkvb_selection_free(rs)
		return nil, err
	}
	sel.finish(rs, entries)
	return sel, nil
}

// CompactInPlace moves each head's kept entries to the front of that head's rows of the
// layer's keys and values: the library writes into the caller's own slices.
func (c *Context) CompactInPlace(layer *Layer, sel *Selection) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ptr == nil {
		return errClosed
	}
	if err := checkSelection("Context.CompactInPlace", sel); err != nil {
		return err
	}
	b, err := buildLayer("Context.CompactInPlace", layer)
	if err != nil {
		return err
	}
	defer b.free()
	full := sel.Indices[:cap(sel.Indices)]
	if len(full) == 0 {
		full = []int32{0}
	}
	rs := raw.Defkvb_selection_new(int64(uintptr(unsafe.Pointer(&sel.HeadLens[0]))),
		int64(uintptr(unsafe.Pointer(&sel.CuSeqlens[0]))), int64(uintptr(unsafe.Pointer(&full[0]))),
		int64(len(sel.Indices)), 0, 0)
	defer raw.Defkvb_selection_free(rs)
	err = c.wrap("Context.CompactInPlace", raw.Defkvb_compact_inplace(c.ptr, b.l, rs))
	runtime.KeepAlive(sel)
	runtime.KeepAlive(full)
	return err
}

// checkSelection rejects a selection that does not have the shape Select returns (so an
// empty or hand-built Selection gives an error, not a panic).
func checkSelection(fn string, sel *Selection) error {
	if sel == nil {
		return &Error{InvalidArgument, fn + ": sel is nil"}
	}
	if len(sel.HeadLens) == 0 {
		return &Error{InvalidArgument, fn + ": sel.HeadLens is empty (use the Selection that Select or LayerSelection returned)"}
	}
	if len(sel.CuSeqlens) != len(sel.HeadLens)+1 {
		return &Error{InvalidArgument, fmt.Sprintf("%s: sel.CuSeqlens has %d entries, expected len(sel.HeadLens)+1 = %d",
			fn, len(sel.CuSeqlens), len(sel.HeadLens)+1)}
	}
	if total := sel.CuSeqlens[len(sel.HeadLens)]; total < 0 || int(total) > len(sel.Indices) {
		return &Error{InvalidArgument, fmt.Sprintf("%s: sel.CuSeqlens ends at %d but sel.Indices has %d entries",
			fn, total, len(sel.Indices))}
	}
	return nil
}

// rawSelection is the C view of sel for a compaction (its Indices' full capacity).
func rawSelection(sel *Selection) (raw.Defkv_selection, []int32) {
	full := sel.Indices[:cap(sel.Indices)]
	if len(full) == 0 {
		full = []int32{0}
	}
	return raw.Defkvb_selection_new(sliceAddr(sel.HeadLens), sliceAddr(sel.CuSeqlens), sliceAddr(full),
		int64(len(sel.Indices)), 0, 0), full
}

// CompactPaged compacts a paged layer (layer.Paged set) after Select and returns the source
// page ids it frees, row by row in table order, for the caller's page allocator.
//
// dst nil: in place. Each block-table row's kept entries move to the front of the row's own
// slots, and the row's pages past those still in use are freed (per head for PageHead; for
// PageNHD and PageHND the heads share pages, so a sequence keeps the pages of its longest head).
//
// dst non-nil: a PageHead description (NKVHeads = the layer's Hk) whose rows, one per
// (sequence, KV head) as in sel.HeadLens, hold at least PagesNeeded(sel.HeadLens) pages each,
// allocated by the caller; every head's kept entries are gathered into its row's pages and
// every source page of the layer is freed. dst.SeqLens is not read (sel.HeadLens are the new
// lengths).
func (c *Context) CompactPaged(layer *Layer, sel *Selection, dst *PagedKV) ([]int32, error) {
	const fn = "Context.CompactPaged"
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ptr == nil {
		return nil, errClosed
	}
	if err := checkSelection(fn, sel); err != nil {
		return nil, err
	}
	if layer != nil && layer.Paged == nil {
		return nil, &Error{InvalidArgument, fn + ": layer.Paged is nil (compact contiguous caches with CompactInPlace)"}
	}
	b, err := buildLayer(fn, layer)
	if err != nil {
		return nil, err
	}
	defer b.free()
	var rdst raw.Defkv_paged_kv = raw.SwigcptrDefkv_paged_kv(0)
	if dst != nil {
		if err := dst.checkRows(fn, "dst", int64(len(sel.HeadLens)), -1); err != nil {
			return nil, err
		}
		if rdst, err = buildPaged(dst); err != nil {
			return nil, err
		}
		defer raw.Defkvb_paged_free(rdst)
	}
	rs, full := rawSelection(sel)
	defer raw.Defkvb_selection_free(rs)
	n := raw.Defkvb_compact_paged(c.ptr, b.l, rs, rdst, 0, 0) // counts only
	if err := c.status(fn, n); err != nil {
		return nil, err
	}
	freed := make([]int32, n+1) // never empty: a NULL freed_pages would only count
	n = raw.Defkvb_compact_paged(c.ptr, b.l, rs, rdst, sliceAddr(freed), n)
	runtime.KeepAlive(sel)
	runtime.KeepAlive(full)
	if dst != nil {
		runtime.KeepAlive(dst.BlockTables)
		runtime.KeepAlive(dst.KPages)
		runtime.KeepAlive(dst.VPages)
	}
	if err := c.status(fn, n); err != nil {
		return nil, err
	}
	return freed[:n], nil
}

// globalError is the failure of a context-free call, read on the OS thread that made it.
func globalError(fn string, code int64) error {
	return &Error{Status(code), callerMessage(fn, raw.Defkv_last_error_global())}
}

// PagesNeeded returns the pages each (sequence, KV head) needs for its kept entries,
// ceil(headLens[i] / pageSize), and their total: what to allocate before CompactPaged into
// new pages.
func PagesNeeded(headLens []int32, pageSize int32) (pages []int32, total int64, err error) {
	runtime.LockOSThread() // the message is per OS thread
	defer runtime.UnlockOSThread()
	pages = make([]int32, len(headLens)+1)
	total = raw.Defkvb_paged_pages_needed(sliceAddr(headLens), int64(len(headLens)), int(pageSize), sliceAddr(pages))
	runtime.KeepAlive(headLens)
	runtime.KeepAlive(pages)
	if total < 0 {
		return nil, 0, globalError("PagesNeeded", total)
	}
	return pages[:len(headLens)], total, nil
}

// NextSlots says where each block-table row's next token goes when decoding after
// compaction: row i (length lens[i]) appends at slot slotOffset[i] of page slotPage[i], or,
// where slotPage[i] is -1, the row is full: allocate a page, append its id to the row and
// write at slot 0.
func NextSlots(lens, blockTables []int32, blockTableStride int64, pageSize int32) (slotPage, slotOffset []int32, err error) {
	if blockTableStride >= 1 && int64(len(blockTables)) < int64(len(lens))*blockTableStride {
		return nil, nil, &Error{InvalidArgument, fmt.Sprintf("NextSlots: blockTables has %d entries, expected %d rows of %d",
			len(blockTables), len(lens), blockTableStride)}
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	slotPage, slotOffset = make([]int32, len(lens)+1), make([]int32, len(lens)+1)
	e := raw.Defkvb_paged_next_slots(sliceAddr(lens), int64(len(lens)), sliceAddr(blockTables), blockTableStride,
		int(pageSize), sliceAddr(slotPage), sliceAddr(slotOffset))
	runtime.KeepAlive(lens)
	runtime.KeepAlive(blockTables)
	runtime.KeepAlive(slotPage)
	runtime.KeepAlive(slotOffset)
	if se, ok := e.(*raw.StatusError); ok {
		return nil, nil, globalError("NextSlots", int64(se.Code))
	}
	return slotPage[:len(lens)], slotOffset[:len(lens)], nil
}

// Global is a layer-adaptive (Layer-DefensiveKV) selection over several layers.
type Global struct {
	c       *Context
	g       raw.Struct_SS_defkv_global
	heads   int
	entries int
}

// NewGlobal starts a layer-adaptive selection over nLayers layers (p.Method must be
// LayerDefensiveKV). Close it before the context.
func (c *Context) NewGlobal(p Params, nLayers int) (*Global, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ptr == nil {
		return nil, errClosed
	}
	rp := p.toRaw()
	defer raw.DeleteDefkv_params(rp)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	g := raw.Defkvb_global_create(c.ptr, rp, nLayers)
	if g == nil || g.Swigcptr() == 0 {
		return nil, &Error{Status(raw.Defkvb_last_create_status()), callerMessage("Context.NewGlobal", raw.Defkv_context_last_error(c.ptr))}
	}
	gl := &Global{c: c, g: g}
	runtime.SetFinalizer(gl, func(g *Global) { g.Close() })
	return gl, nil
}

// Close releases the global selection (idempotent).
func (g *Global) Close() error {
	g.c.mu.Lock()
	defer g.c.mu.Unlock()
	if g.g != nil {
		raw.Defkv_global_destroy(g.g)
		g.g = nil
		runtime.SetFinalizer(g, nil)
	}
	return nil
}

// AddLayer scores layer index (each exactly once, same batch shape every time).
func (g *Global) AddLayer(index int, layer *Layer) error {
	g.c.mu.Lock()
	defer g.c.mu.Unlock()
	if g.g == nil || g.c.ptr == nil {
		return errClosed
	}
	b, err := buildLayer("Global.AddLayer", layer)
	if err != nil {
		return err
	}
	defer b.free()
	if err := g.c.wrap("Global.AddLayer", raw.Defkvb_global_add_layer(g.g, index, b.l)); err != nil {
		return err
	}
	g.heads, g.entries = shapeOf(layer)
	return nil
}

// Select ranks all layers together.
func (g *Global) Select() error {
	g.c.mu.Lock()
	defer g.c.mu.Unlock()
	if g.g == nil || g.c.ptr == nil {
		return errClosed
	}
	return g.c.wrap("Global.Select", raw.Defkv_global_select(g.g))
}

// LayerSelection is layer index's share of the global selection.
func (g *Global) LayerSelection(index int) (*Selection, error) {
	g.c.mu.Lock()
	defer g.c.mu.Unlock()
	if g.g == nil || g.c.ptr == nil {
		return nil, errClosed
	}
	n := raw.Defkvb_global_layer_kept_count(g.g, index)
	if err := g.c.status("Global.LayerSelection", n); err != nil {
		return nil, err
	}
	heads := g.heads
	if heads == 0 {
		heads = 1
	}
	sel, rs := newSelection(heads, g.entries, n)
	if err := g.c.wrap("Global.LayerSelection", raw.Defkvb_global_layer_selection(g.g, index, rs)); err != nil {
		raw.Defkvb_selection_free(rs)
		return nil, err
	}
	sel.finish(rs, g.entries)
	return sel, nil
}
