package defkv_test

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"

	defkv "github.com/defkv/defkv/bindings/go"
	"github.com/defkv/defkv/bindings/go/internal/golden"
)

func layerOf(t *testing.T, l golden.Layer, keys, values []float32) *defkv.Layer {
	q, err := defkv.F32Tensor(l.Queries, l.QShape...)
	if err != nil {
		t.Fatal(err)
	}
	k, _ := defkv.F32Tensor(keys, l.KVShape...)
	v, _ := defkv.F32Tensor(values, l.KVShape...)
	o, _ := defkv.F32Tensor(l.OProj, l.OShape...)
	return &defkv.Layer{Seqs: []defkv.Sequence{{Queries: q, Keys: k, Values: v}}, OProj: o}
}

func params(c *golden.Case, m defkv.Method) defkv.Params {
	p := defkv.NewParams(m)
	p.CompressionRatio, p.Window, p.Kernel = c.Ratio, c.Window, c.Kernel
	return p
}

func TestGoldenCases(t *testing.T) {
	ctx, err := defkv.NewContext()
	if err != nil {
		t.Fatal(err)
	}
	defer ctx.Close()
	checked := 0
	for _, name := range golden.Cases {
		c, err := golden.Load(name)
		if err != nil {
			t.Fatal(err)
		}
		for _, mname := range golden.Methods {
			m, err := defkv.MethodFromName(mname)
			if err != nil {
				t.Fatal(err)
			}
			exp, err := golden.Read(filepath.Join(golden.Dir(), name+"."+mname+".expected.safetensors"))
			if err != nil {
				t.Fatal(err)
			}
			var layers []*defkv.Layer
			for _, l := range c.Layers {
				layers = append(layers, layerOf(t, l, l.Keys, l.Values))
			}
			var sels []*defkv.Selection
			if m == defkv.LayerDefensiveKV {
				g, err := ctx.NewGlobal(params(c, m), len(layers))
				if err != nil {
					t.Fatal(err)
				}
				for i, l := range layers {
					if err := g.AddLayer(i, l); err != nil {
						t.Fatal(err)
					}
				}
				if err := g.Select(); err != nil {
					t.Fatal(err)
				}
				for i := range layers {
					s, err := g.LayerSelection(i)
					if err != nil {
						t.Fatal(err)
					}
					sels = append(sels, s)
				}
				g.Close()
			} else {
				for _, l := range layers {
					s, err := ctx.Select(params(c, m), l)
					if err != nil {
						t.Fatal(err)
					}
					sels = append(sels, s)
				}
			}
			for i, s := range sels {
				keep := exp.U8(fmt.Sprintf("layers.%d.keep", i))
				lens := exp.I32(fmt.Sprintf("layers.%d.head_lens", i))
				if fmt.Sprint(s.HeadLens) != fmt.Sprint(lens) {
					t.Errorf("%s %s layer %d: head_lens %v, want %v", name, mname, i, s.HeadLens, lens)
				}
				if string(s.KeepMask) != string(keep) {
					t.Errorf("%s %s layer %d: keep set differs", name, mname, i)
				}
				L := int(c.Layers[i].KVShape[1])
				for h := range lens {
					var want []int32
					for tok := 0; tok < L; tok++ {
						if keep[h*L+tok] == 1 {
							want = append(want, int32(tok))
						}
					}
					if fmt.Sprint(s.Kept(h)) != fmt.Sprint(want) {
						t.Errorf("%s %s layer %d head %d: indices differ", name, mname, i, h)
					}
				}
				checked++
			}
		}
	}
	if checked != 54 {
		t.Fatalf("checked %d layer results, want 54", checked)
	}
}

func TestErrors(t *testing.T) {
	c, err := golden.Load("pub2-g1-L300")
	if err != nil {
		t.Fatal(err)
	}
	ctx, _ := defkv.NewContext()
	defer ctx.Close()
	l := c.Layers[0]
	p := params(c, defkv.SnapKV)
	p.CompressionRatio = 1.5
	_, err = ctx.Select(p, layerOf(t, l, l.Keys, l.Values))
	var de *defkv.Error
	if !errors.As(err, &de) || de.Code != defkv.InvalidArgument || !strings.Contains(de.Message, "compression_ratio") {
		t.Fatalf("ratio 1.5: got %v", err)
	}
	lay := layerOf(t, l, l.Keys, l.Values)
	lay.OProj = nil
	_, err = ctx.Select(params(c, defkv.DefensiveKV), lay)
	if !errors.As(err, &de) || de.Code != defkv.InvalidArgument || !strings.Contains(de.Message, "o_proj") {
		t.Fatalf("missing o_proj: got %v", err)
	}
	if _, err := ctx.NewGlobal(params(c, defkv.SnapKV), 2); !errors.As(err, &de) || de.Code != defkv.InvalidArgument {
		t.Fatalf("global with snapkv: got %v", err)
	}
	g, err := ctx.NewGlobal(params(c, defkv.LayerDefensiveKV), 2)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Select(); !errors.As(err, &de) || de.Code != defkv.InvalidState || !strings.Contains(de.Message, "was not added") {
		t.Fatalf("select before add: got %v", err)
	}
	g.Close()
	g.Close()
	if _, err := defkv.MethodFromName("no-such"); !errors.As(err, &de) || de.Code != defkv.InvalidArgument {
		t.Fatalf("unknown method: %v", err)
	}
	if _, err := defkv.F32Tensor(make([]float32, 10), 3, 4); !errors.As(err, &de) || !strings.Contains(de.Message, "10 elements") {
		t.Fatalf("bad shape: %v", err)
	}
	if _, err := defkv.NewContextWith(defkv.ContextOptions{Backend: 99}); !errors.As(err, &de) || de.Code == defkv.Success || de.Message == "" {
		t.Fatalf("backend 99: %v", err)
	}
	ctx.Close()
	ctx.Close()
	if _, err := ctx.Select(p, lay); !errors.As(err, &de) || de.Code != defkv.InvalidState {
		t.Fatalf("closed context: %v", err)
	}
}

func TestCompactionWritesCallersSlices(t *testing.T) {
	c, _ := golden.Load("pub1-g4-L1024")
	l := c.Layers[0]
	keys := append([]float32(nil), l.Keys...)
	values := append([]float32(nil), l.Values...)
	ctx, _ := defkv.NewContext()
	defer ctx.Close()
	lay := layerOf(t, l, keys, values)
	sel, err := ctx.Select(params(c, defkv.DefensiveKV), lay)
	if err != nil {
		t.Fatal(err)
	}
	if err := ctx.CompactInPlace(lay, sel); err != nil {
		t.Fatal(err)
	}
	hk, L, d := int(l.KVShape[0]), int(l.KVShape[1]), int(l.KVShape[2])
	moved := 0
	for h := 0; h < hk; h++ {
		for j, tok := range sel.Kept(h) {
			dst, src := (h*L+j)*d, (h*L+int(tok))*d
			for e := 0; e < d; e++ {
				if keys[dst+e] != l.Keys[src+e] || values[dst+e] != l.Values[src+e] {
					t.Fatalf("head %d row %d: not the kept entry %d", h, j, tok)
				}
			}
			if int(tok) != j {
				moved++
			}
		}
	}
	if moved == 0 {
		t.Fatal("no row moved: the test would not notice a copy")
	}
}

func rssKiB() int {
	b, _ := os.ReadFile("/proc/self/statm")
	f := strings.Fields(string(b))
	n, _ := strconv.Atoi(f[1])
	return n * 4
}

func TestNoLeak(t *testing.T) {
	c, _ := golden.Load("pub2-g1-L300")
	l := c.Layers[0]
	round := func() {
		ctx, err := defkv.NewContextWith(defkv.ContextOptions{Backend: defkv.BackendCPU, Threads: 1, DeviceIndex: -1})
		if err != nil {
			t.Fatal(err)
		}
		keys := append([]float32(nil), l.Keys...)
		values := append([]float32(nil), l.Values...)
		lay := layerOf(t, l, keys, values)
		sel, err := ctx.Select(params(c, defkv.DefensiveKV), lay)
		if err != nil {
			t.Fatal(err)
		}
		if err := ctx.CompactInPlace(lay, sel); err != nil {
			t.Fatal(err)
		}
		ctx.Close()
		if os.Getenv("DEFKV_TEST_LEAK") != "" {
			// proves the test can fail: a context that is never freed
			leaked, _ := defkv.NewContext()
			runtime.SetFinalizer(leaked, nil)
		}
	}
	for i := 0; i < 20; i++ {
		round()
	}
	runtime.GC()
	before := rssKiB()
	for i := 0; i < 300; i++ {
		round()
		if i%50 == 0 {
			runtime.GC()
		}
	}
	runtime.GC()
	after := rssKiB()
	t.Logf("rss before %d KiB, after 300 rounds %d KiB", before, after)
	if after-before > 8192 {
		t.Fatalf("memory grew by %d KiB over 300 rounds", after-before)
	}
}

// An empty or malformed Selection is an error naming the Go call, never a panic.
func TestCompactInPlaceRejectsEmptySelection(t *testing.T) {
	c, _ := golden.Load("pub2-g1-L300")
	l := c.Layers[0]
	ctx, _ := defkv.NewContext()
	defer ctx.Close()
	lay := layerOf(t, l, append([]float32(nil), l.Keys...), append([]float32(nil), l.Values...))
	var de *defkv.Error
	for _, sel := range []*defkv.Selection{{}, nil, {HeadLens: []int32{1}, CuSeqlens: []int32{0}}} {
		err := ctx.CompactInPlace(lay, sel)
		if !errors.As(err, &de) || de.Code != defkv.InvalidArgument || !strings.HasPrefix(de.Message, "Context.CompactInPlace: ") {
			t.Fatalf("selection %+v: got %v", sel, err)
		}
	}
}

// Library messages name the Go method called, not the C function the binding used inside.
func TestErrorsNameTheCalledFunction(t *testing.T) {
	c, _ := golden.Load("pub2-g1-L300")
	l := c.Layers[0]
	ctx, _ := defkv.NewContext()
	defer ctx.Close()
	p := params(c, defkv.SnapKV)
	p.CompressionRatio = 1.5
	_, err := ctx.Select(p, layerOf(t, l, l.Keys, l.Values))
	var de *defkv.Error
	if !errors.As(err, &de) || !strings.HasPrefix(de.Message, "Context.Select: ") || strings.Contains(de.Message, "defkv_kept_count") {
		t.Fatalf("got %v", err)
	}
}

// A preallocated head-major cache [Hk, Lmax, d] holding L < Lmax tokens is viewed through
// strides, without a copy, and selects exactly what the contiguous [Hk, L, d] cache selects;
// compaction writes into the big buffer's rows.
func TestViewWithSpareCapacity(t *testing.T) {
	c, _ := golden.Load("pub2-g1-L300")
	l := c.Layers[0]
	hk, L, d := l.KVShape[0], l.KVShape[1], l.KVShape[2]
	lmax := L + 37
	big := func(src []float32) []float32 {
		b := make([]float32, hk*lmax*d)
		for i := range b {
			b[i] = float32(math.NaN()) // rows past L must never be read
		}
		for h := int64(0); h < hk; h++ {
			copy(b[h*lmax*d:h*lmax*d+L*d], src[h*L*d:(h+1)*L*d])
		}
		return b
	}
	bk, bv := big(l.Keys), big(l.Values)
	shape, strides := []int64{hk, L, d}, []int64{lmax * d, d, 1}
	k, err := defkv.F32View(bk, shape, strides)
	if err != nil {
		t.Fatal(err)
	}
	v, err := defkv.F32View(bv, shape, strides)
	if err != nil {
		t.Fatal(err)
	}
	q, _ := defkv.F32Tensor(l.Queries, l.QShape...)
	o, _ := defkv.F32Tensor(l.OProj, l.OShape...)
	ctx, _ := defkv.NewContext()
	defer ctx.Close()
	p := params(c, defkv.DefensiveKV)
	got, err := ctx.Select(p, &defkv.Layer{Seqs: []defkv.Sequence{{Queries: q, Keys: k, Values: v}}, OProj: o})
	if err != nil {
		t.Fatal(err)
	}
	want, err := ctx.Select(p, layerOf(t, l, l.Keys, l.Values))
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got.Indices) != fmt.Sprint(want.Indices) || len(got.Indices) == 0 {
		t.Fatal("the strided view selected differently from the contiguous cache")
	}
	if err := ctx.CompactInPlace(&defkv.Layer{Seqs: []defkv.Sequence{{Queries: q, Keys: k, Values: v}}, OProj: o}, got); err != nil {
		t.Fatal(err)
	}
	for h := int64(0); h < hk; h++ {
		for j, tok := range got.Kept(int(h)) {
			if bk[h*lmax*d+int64(j)*d] != l.Keys[(h*L+int64(tok))*d] {
				t.Fatalf("head %d row %d is not kept entry %d", h, j, tok)
			}
		}
	}
	// The extent check is against the strides: one row too few is refused.
	var de *defkv.Error
	if _, err := defkv.F32View(bk[:len(bk)-int(lmax*d-L*d)-1], shape, strides); !errors.As(err, &de) || !strings.HasPrefix(de.Message, "F32View: ") {
		t.Fatalf("short slice: %v", err)
	}
}
