package defkv

import (
	"fmt"
	"runtime"
	"unsafe"

	"github.com/defkv/defkv/bindings/go/internal/raw"
)

// Aggregation is a defkv_stream_aggregation value: how a stream combines an entry's scores
// across rounds.
type Aggregation int32

// Aggregations.
const (
	StreamLatest   Aggregation = 0 // the current round's score only (kvpress DecodingPress)
	StreamMax      Aggregation = 1 // the running maximum over every round that scored the entry (default)
	StreamMaxDecay Aggregation = 2 // r = max(Decay * r, s): a maximum that fades
)

// StreamParams configure a stream (defkv_stream_params). NewStreamParams starts from the
// library's defaults; the shape fields, Capacity and Budget must then be set.
type StreamParams struct {
	Layers      int32 // n_layers, >= 1
	Heads       int32 // H
	KVHeads     int32 // Hk, dividing H
	HeadDim     int32 // d
	Capacity    int32 // rows per head in each layer's cache; appending past it is an error
	Interval    int32 // steps between rounds; >= the window
	Aggregation Aggregation
	Budget      int64   // entries kept per head after a round; >= window + n_sink
	Slack       int64   // a head above Budget + Slack makes a round due; 0 = Interval
	Decay       float32 // StreamMaxDecay factor in (0, 1]
}

// NewStreamParams returns the library's defaults (1 layer, interval 128, StreamMax, decay 0.9).
func NewStreamParams() StreamParams {
	r := raw.NewDefkv_stream_params()
	defer raw.DeleteDefkv_stream_params(r)
	return StreamParams{Layers: int32(r.GetN_layers()), Heads: int32(r.GetN_heads()), KVHeads: int32(r.GetN_kv_heads()),
		HeadDim: int32(r.GetHead_dim()), Capacity: int32(r.GetCapacity()), Interval: int32(r.GetInterval()),
		Aggregation: Aggregation(r.GetAggregation()), Budget: r.GetBudget(), Slack: r.GetSlack(), Decay: r.GetDecay()}
}

func (sp *StreamParams) toRaw() raw.Defkv_stream_params {
	r := raw.NewDefkv_stream_params()
	r.SetN_layers(int(sp.Layers))
	r.SetN_heads(int(sp.Heads))
	r.SetN_kv_heads(int(sp.KVHeads))
	r.SetHead_dim(int(sp.HeadDim))
	r.SetCapacity(int(sp.Capacity))
	r.SetInterval(int(sp.Interval))
	r.SetAggregation(int(sp.Aggregation))
	r.SetBudget(sp.Budget)
	r.SetSlack(sp.Slack)
	r.SetDecay(sp.Decay)
	return r
}

// StreamCache is one layer's cache in a round: Keys and Values [Hk, C, d] with C at least
// every head's length (an F32View of a [Hk, capacity, d] cache), or Paged (the pools and
// block tables; SeqLens is not read: the stream knows each head's length). OProj [D, H*d] is
// required by defensivekv and layer-defensivekv streams.
type StreamCache struct {
	Keys, Values *Tensor
	Paged        *PagedKV
	OProj        *Tensor
}

// streamHandle is the C stream; the context holds it so that Close can destroy it first.
type streamHandle struct{ s raw.Struct_SS_defkv_stream }

func (h *streamHandle) destroy() {
	if h.s != nil {
		raw.Defkv_stream_destroy(h.s)
		h.s = nil
	}
}

// Stream is decode-time eviction over the caches of a model's layers (defkv_stream): the
// engine writes each new token's K/V at row HeadLens(layer)[k] of every head, calls Append and
// PushQueries, and runs Round when Due. Every call goes through the context (its mutex); closing
// the context closes its streams, whose later calls then return an InvalidState error. Close
// the stream when done (idempotent); a finalizer only backs up a forgotten Close.
type Stream struct {
	c        *Context
	h        *streamHandle
	layers   int
	hk       int
	capacity int64
}

// NewStream starts a stream: p gives the method (snapkv, ada-snapkv, defensivekv,
// layer-defensivekv or streamingllm), Window, Kernel, Scale and NSink; sp the shape, capacity,
// interval, aggregation and budget.
func (c *Context) NewStream(p Params, sp StreamParams) (*Stream, error) {
	const fn = "Context.NewStream"
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ptr == nil {
		return nil, errClosed
	}
	rp := p.toRaw()
	defer raw.DeleteDefkv_params(rp)
	rsp := sp.toRaw()
	defer raw.DeleteDefkv_stream_params(rsp)
	runtime.LockOSThread() // the create status is per OS thread
	defer runtime.UnlockOSThread()
	s := raw.Defkvb_stream_create(c.ptr, rp, rsp)
	if s == nil || s.Swigcptr() == 0 {
		return nil, &Error{Status(raw.Defkvb_last_create_status()), callerMessage(fn, raw.Defkv_context_last_error(c.ptr))}
	}
	h := &streamHandle{s: s}
	if c.streams == nil {
		c.streams = map[*streamHandle]struct{}{}
	}
	c.streams[h] = struct{}{}
	st := &Stream{c: c, h: h, layers: int(sp.Layers), hk: int(sp.KVHeads), capacity: int64(sp.Capacity)}
	runtime.SetFinalizer(st, func(s *Stream) { s.Close() })
	return st, nil
}

var errStreamClosed = &Error{InvalidState, "the stream is closed (or its context is)"}

// Close releases the stream (idempotent).
func (s *Stream) Close() error {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	if s.h.s != nil {
		s.h.destroy()
		delete(s.c.streams, s.h)
	}
	runtime.SetFinalizer(s, nil)
	return nil
}

// lock takes the context's mutex; the caller unlocks it (also on error).
func (s *Stream) lock() error {
	s.c.mu.Lock()
	if s.h.s == nil || s.c.ptr == nil {
		return errStreamClosed
	}
	return nil
}

// Append registers n new entries the engine wrote after the last live row of every head of
// layer (at rows HeadLens(layer)[k] onwards).
func (s *Stream) Append(layer, n int) error {
	defer s.c.mu.Unlock()
	if err := s.lock(); err != nil {
		return err
	}
	return s.c.wrap("Stream.Append", raw.Defkv_stream_append(s.h.s, layer, n))
}

// PushQueries pushes the post-rotary queries [H, n, d] of the newest n steps of layer; the
// stream keeps the last window of them. Each call counts n steps towards Due.
func (s *Stream) PushQueries(layer int, queries *Tensor) error {
	defer s.c.mu.Unlock()
	if err := s.lock(); err != nil {
		return err
	}
	if queries == nil {
		return &Error{InvalidArgument, "Stream.PushQueries: queries is nil"}
	}
	var sh, st [4]int64
	copy(sh[:], queries.shape)
	copy(st[:], queries.strides)
	err := raw.Defkvb_stream_push_queries(s.h.s, layer, int64(queries.addr), int(queries.dtype), len(queries.shape),
		sh[0], sh[1], sh[2], sh[3], st[0], st[1], st[2], st[3], int(queries.memory), queries.offset)
	runtime.KeepAlive(queries.keep)
	return s.c.wrap("Stream.PushQueries", err)
}

// Due reports whether a round is due: Interval steps pushed to some layer since the last
// round, or a head holding more than Budget + Slack entries.
func (s *Stream) Due() (bool, error) {
	defer s.c.mu.Unlock()
	if err := s.lock(); err != nil {
		return false, err
	}
	v := raw.Defkvb_stream_due(s.h.s)
	if err := s.c.status("Stream.Due", int64(v)); err != nil {
		return false, err
	}
	return v != 0, nil
}

// HeadLens returns the live entries of each KV head of layer: where the next token's K/V go.
func (s *Stream) HeadLens(layer int) ([]int32, error) {
	defer s.c.mu.Unlock()
	if err := s.lock(); err != nil {
		return nil, err
	}
	lens := make([]int32, s.hk+1) // never empty
	err := raw.Defkvb_stream_head_lens(s.h.s, layer, sliceAddr(lens))
	runtime.KeepAlive(lens)
	if err := s.c.wrap("Stream.HeadLens", err); err != nil {
		return nil, err
	}
	return lens[:s.hk], nil
}

// Round runs a round over every layer (caches: one per layer): scores, selects and compacts
// the caches in place, in the caller's slices or pages. Rows past a head's new length are
// left as they were; a paged cache's pages past ceil(head_len / PageSize) are no longer used
// (give them back to the allocator). Errors leave the stream and the caches unchanged.
func (s *Stream) Round(caches []StreamCache) error {
	_, err := s.round("Stream.Round", caches, false)
	return err
}

// RoundSelections is Round that also returns each layer's selection: HeadLens and CuSeqlens
// per KV head, Indices the kept rows (of the live entries before the round), KeepMask and
// Scores [Hk, Capacity] per layer (zero past a head's length).
func (s *Stream) RoundSelections(caches []StreamCache) ([]*Selection, error) {
	return s.round("Stream.RoundSelections", caches, true)
}

func (s *Stream) round(fn string, caches []StreamCache, want bool) ([]*Selection, error) {
	defer s.c.mu.Unlock()
	if err := s.lock(); err != nil {
		return nil, err
	}
	if len(caches) != s.layers {
		return nil, &Error{InvalidArgument, fmt.Sprintf("%s: %d caches, expected one per layer (%d)", fn, len(caches), s.layers)}
	}
	rc := raw.Defkvb_stream_caches_new(s.layers)
	if rc == nil || rc.Swigcptr() == 0 {
		return nil, &Error{OutOfMemory, fn + ": could not allocate the caches' description"}
	}
	defer raw.Defkvb_stream_caches_free(rc)
	var paged []raw.Defkv_paged_kv
	defer func() {
		for _, p := range paged {
			raw.Defkvb_paged_free(p)
		}
		for i := range caches { // the Go memory the descriptions pointed at lives until here
			c := &caches[i]
			for _, t := range []*Tensor{c.Keys, c.Values, c.OProj} {
				if t != nil {
					runtime.KeepAlive(t.keep)
				}
			}
			if c.Paged != nil {
				runtime.KeepAlive(c.Paged.BlockTables)
				for _, t := range []*Tensor{c.Paged.KPages, c.Paged.VPages} {
					if t != nil {
						runtime.KeepAlive(t.keep)
					}
				}
			}
		}
	}()
	for l := range caches {
		c := &caches[l]
		for which, t := range []*Tensor{c.Keys, c.Values, c.OProj} {
			if t == nil {
				continue
			}
			var sh, st [4]int64
			copy(sh[:], t.shape)
			copy(st[:], t.strides)
			_ = raw.Defkvb_stream_caches_set_tensor(rc, l, which, int64(t.addr), int(t.dtype), len(t.shape),
				sh[0], sh[1], sh[2], sh[3], st[0], st[1], st[2], st[3], int(t.memory), t.offset)
		}
		if p := c.Paged; p != nil {
			rows := int64(1)
			if p.Layout == PageHead {
				rows = int64(s.hk)
			}
			if err := p.checkRows(fn, fmt.Sprintf("caches[%d].Paged", l), rows, -1); err != nil {
				return nil, err
			}
			rp, err := buildPaged(p)
			if err != nil {
				return nil, err
			}
			paged = append(paged, rp)
			_ = raw.Defkvb_stream_caches_set_paged(rc, l, rp)
		}
	}
	if !want {
		return nil, s.c.wrap(fn, raw.Defkvb_stream_round(s.h.s, rc, s.layers, s.hk, s.capacity, 0, 0, 0, 0, 0))
	}
	per := s.hk * int(s.capacity)
	hl := make([]int32, s.layers*s.hk)
	cu := make([]int32, s.layers*(s.hk+1))
	idx := make([]int32, s.layers*per+1)
	km := make([]uint8, s.layers*per+1)
	sc := make([]float32, s.layers*per+1)
	err := raw.Defkvb_stream_round(s.h.s, rc, s.layers, s.hk, s.capacity, sliceAddr(hl), sliceAddr(cu), sliceAddr(idx),
		int64(uintptr(unsafe.Pointer(&km[0]))), int64(uintptr(unsafe.Pointer(&sc[0]))))
	runtime.KeepAlive(hl)
	runtime.KeepAlive(cu)
	runtime.KeepAlive(idx)
	runtime.KeepAlive(km)
	runtime.KeepAlive(sc)
	if err := s.c.wrap(fn, err); err != nil {
		return nil, err
	}
	sels := make([]*Selection, s.layers)
	for l := range sels {
		c := cu[l*(s.hk+1) : (l+1)*(s.hk+1)]
		sels[l] = &Selection{HeadLens: hl[l*s.hk : (l+1)*s.hk], CuSeqlens: c,
			Indices: idx[l*per : l*per+int(c[s.hk])], KeepMask: km[l*per : (l+1)*per], Scores: sc[l*per : (l+1)*per]}
	}
	return sels, nil
}
