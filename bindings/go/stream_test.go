package defkv_test

import (
	"errors"
	"reflect"
	"strings"
	"testing"

	defkv "github.com/defkv/defkv/bindings/go"
)

// A small decode-time stream: 2 layers, H = 4, Hk = 2, d = 8, window 4, interval 8, budget 12,
// capacity 48, defensivekv with an o_proj; a prompt of 20 tokens, then 40 decoding steps with
// the engine loop (K/V written at row HeadLens[k] of each head, Append, PushQueries, Round when
// Due), on contiguous [Hk, capacity, d] caches or one-head-per-page caches.
const (
	stLayers, stH, stHk, stD, stW, stCap, stBudget, stInterval, stDM = 2, 4, 2, 8, 4, 48, 12, 8, 16
	stPrompt, stSteps, stPS                                          = 20, 40, 4
)

func streamParams() (defkv.Params, defkv.StreamParams) {
	p := defkv.NewParams(defkv.DefensiveKV)
	p.Window = stW
	sp := defkv.NewStreamParams()
	sp.Layers, sp.Heads, sp.KVHeads, sp.HeadDim = stLayers, stH, stHk, stD
	sp.Capacity, sp.Interval, sp.Budget = stCap, stInterval, stBudget
	return p, sp
}

// streamRun runs the stream and returns every round's head lengths; it checks that no head
// exceeds budget + slack after a round, that the cache rows are the entries the selection
// kept (in order), and that the window (the last 4 appended entries) and the sinks stay.
func streamRun(t *testing.T, paged bool) [][]int32 {
	t.Helper()
	ctx, err := defkv.NewContextWith(defkv.ContextOptions{Backend: defkv.BackendCPU, Threads: 2, DeviceIndex: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer ctx.Close()
	p, sp := streamParams()
	st, err := ctx.NewStream(p, sp)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	seed := uint32(3)
	o := make([]float32, stDM*stH*stD)
	for i := range o {
		o[i] = lcg(&seed)
	}
	oproj, _ := defkv.F32Tensor(o, stDM, stH*stD)
	// Caches: contiguous [Hk, cap, d]; or pools [pages, PS, d] with each head owning a fixed,
	// shuffled set of cap/PS pages (block table row k), which the stream compacts in place.
	const maxPages = stCap / stPS
	nPages := stHk * maxPages
	tables := make([]int32, stHk*maxPages)
	for i := range tables {
		tables[i] = int32((i*7 + 3) % nPages) // a permutation: 7 is prime to 24
	}
	row := func(k, r int) int { // float offset of head k's row r
		if paged {
			return (int(tables[k*maxPages+r/stPS])*stPS + r%stPS) * stD
		}
		return (k*stCap + r) * stD
	}
	type entry struct{ k, v []float32 }
	keys, vals := make([][]float32, stLayers), make([][]float32, stLayers)
	mirror := make([][][]entry, stLayers)  // per layer and head: the live entries in cache order
	written := make([][][]entry, stLayers) // everything appended, in order
	caches := make([]defkv.StreamCache, stLayers)
	for l := range keys {
		keys[l], vals[l] = make([]float32, stHk*stCap*stD), make([]float32, stHk*stCap*stD)
		mirror[l], written[l] = make([][]entry, stHk), make([][]entry, stHk)
		if paged {
			kp, _ := defkv.F32Tensor(keys[l], int64(nPages), stPS, stD)
			vp, _ := defkv.F32Tensor(vals[l], int64(nPages), stPS, stD)
			caches[l] = defkv.StreamCache{Paged: &defkv.PagedKV{Layout: defkv.PageHead, PageSize: stPS, NKVHeads: stHk,
				KPages: kp, VPages: vp, BlockTables: tables, BlockTableStride: maxPages}, OProj: oproj}
		} else {
			k, _ := defkv.F32Tensor(keys[l], stHk, stCap, stD)
			v, _ := defkv.F32Tensor(vals[l], stHk, stCap, stD)
			caches[l] = defkv.StreamCache{Keys: k, Values: v, OProj: oproj}
		}
	}
	// One step of n tokens for every layer: K/V at the heads' next rows, Append, PushQueries.
	step := func(n int) {
		for l := 0; l < stLayers; l++ {
			lens, err := st.HeadLens(l)
			if err != nil {
				t.Fatal(err)
			}
			for k := 0; k < stHk; k++ {
				for i := 0; i < n; i++ {
					e := entry{make([]float32, stD), make([]float32, stD)}
					for j := 0; j < stD; j++ {
						e.k[j], e.v[j] = lcg(&seed), lcg(&seed)*float32(1+len(written[l][k])%3)
					}
					at := row(k, int(lens[k])+i)
					copy(keys[l][at:at+stD], e.k)
					copy(vals[l][at:at+stD], e.v)
					mirror[l][k] = append(mirror[l][k], e)
					written[l][k] = append(written[l][k], e)
				}
			}
			if err := st.Append(l, n); err != nil {
				t.Fatal(err)
			}
			w := n
			if w > stW {
				w = stW // the prompt pushes its last window of queries
			}
			q := make([]float32, stH*w*stD)
			for i := range q {
				q[i] = lcg(&seed) * 2
			}
			qt, _ := defkv.F32Tensor(q, stH, int64(w), stD)
			if err := st.PushQueries(l, qt); err != nil {
				t.Fatal(err)
			}
		}
	}
	var history [][]int32
	step(stPrompt)
	for s := 0; s < stSteps; s++ {
		step(1)
		due, err := st.Due()
		if err != nil {
			t.Fatal(err)
		}
		if !due {
			continue
		}
		sels, err := st.RoundSelections(caches)
		if err != nil {
			t.Fatal(err)
		}
		var round []int32
		for l := 0; l < stLayers; l++ {
			lens, _ := st.HeadLens(l)
			if !reflect.DeepEqual(lens, sels[l].HeadLens) {
				t.Fatalf("step %d layer %d: HeadLens %v, the selection's %v", s, l, lens, sels[l].HeadLens)
			}
			round = append(round, lens...)
			for k := 0; k < stHk; k++ {
				if lens[k] > stBudget+stInterval { // slack 0 = interval
					t.Errorf("step %d layer %d head %d: %d entries after a round, above budget + slack", s, l, k, lens[k])
				}
				var kept []entry
				for _, i := range sels[l].Kept(k) {
					kept = append(kept, mirror[l][k][i])
				}
				mirror[l][k] = kept
				for r, e := range kept {
					at := row(k, r)
					if !reflect.DeepEqual(keys[l][at:at+stD], e.k) || !reflect.DeepEqual(vals[l][at:at+stD], e.v) {
						t.Fatalf("step %d layer %d head %d: cache row %d is not the kept entry", s, l, k, r)
					}
				}
				wr, n := written[l][k], int(lens[k])
				for i := 1; i <= stW; i++ { // the window: the last 4 appended, at the last 4 rows
					at := row(k, n-i)
					if !reflect.DeepEqual(keys[l][at:at+stD], wr[len(wr)-i].k) {
						t.Fatalf("step %d layer %d head %d: window entry %d lost", s, l, k, len(wr)-i)
					}
				}
				for i := 0; i < int(p.NSink); i++ { // the sinks: the first rows
					at := row(k, i)
					if !reflect.DeepEqual(keys[l][at:at+stD], wr[i].k) {
						t.Fatalf("step %d layer %d head %d: sink %d lost", s, l, k, i)
					}
				}
			}
		}
		history = append(history, round)
	}
	if len(history) < 3 {
		t.Fatalf("%d rounds ran, expected at least 3", len(history))
	}
	evicted := false
	for _, r := range history {
		for _, n := range r {
			evicted = evicted || n < stPrompt
		}
	}
	if !evicted {
		t.Fatal("no round evicted anything")
	}
	return history
}

func TestStreamContiguous(t *testing.T) {
	a := streamRun(t, false)
	if b := streamRun(t, false); !reflect.DeepEqual(a, b) {
		t.Fatalf("two identical runs differ:\n%v\n%v", a, b)
	}
	t.Logf("%d rounds, head lens %v", len(a), a)
}

func TestStreamPaged(t *testing.T) {
	a, b := streamRun(t, true), streamRun(t, false)
	if !reflect.DeepEqual(a, b) {
		t.Fatalf("paged and contiguous caches differ:\n%v\n%v", a, b)
	}
}

func TestStreamErrors(t *testing.T) {
	ctx, err := defkv.NewContext()
	if err != nil {
		t.Fatal(err)
	}
	defer ctx.Close()
	p, sp := streamParams()
	bad := sp
	bad.Budget = 7 // below window + sinks (4 + 4)
	_, err = ctx.NewStream(p, bad)
	var e *defkv.Error
	if !errors.As(err, &e) || e.Code != defkv.InvalidArgument || !strings.HasPrefix(e.Message, "Context.NewStream: ") ||
		!strings.Contains(e.Message, "budget") {
		t.Fatalf("budget below window + sinks: %v", err)
	}
	st, err := ctx.NewStream(p, sp)
	if err != nil {
		t.Fatal(err)
	}
	q, _ := defkv.F32Tensor(make([]float32, stH*(stD+1)), stH, 1, stD+1)
	err = st.PushQueries(0, q)
	if !errors.As(err, &e) || e.Code != defkv.InvalidArgument || !strings.HasPrefix(e.Message, "Stream.PushQueries: ") ||
		!strings.Contains(e.Message, "queries") {
		t.Fatalf("queries of the wrong shape: %v", err)
	}
	if err := st.Round(nil); !errors.As(err, &e) || e.Code != defkv.InvalidArgument {
		t.Fatalf("a round without caches: %v", err)
	}
	if err := st.Append(0, stCap+1); !errors.As(err, &e) || e.Code != defkv.InvalidState || !strings.Contains(e.Message, "capacity") {
		t.Fatalf("appending past capacity: %v", err)
	}
	// Closing the context closes its streams: later calls are errors, not crashes.
	ctx.Close()
	if _, err := st.HeadLens(0); !errors.As(err, &e) || e.Code != defkv.InvalidState {
		t.Fatalf("a stream of a closed context: %v", err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	st.Close()
}
