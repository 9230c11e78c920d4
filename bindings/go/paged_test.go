package defkv_test

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"

	defkv "github.com/defkv/defkv/bindings/go"
)

// A small batch of two sequences (L = 37 and 22, Hk = 2, d = 8) held contiguously and, for the
// paged tests, copied into page pools of 4-token pages with shuffled page ids and NaN wherever
// no row points (spare pages, slots past a sequence's end).
const (
	pgH, pgHk, pgD, pgW, pgPS = 4, 2, 8, 4, 4
)

var pgLens = []int32{37, 22}

type pagedBatch struct {
	q, k, v [][]float32 // per sequence: [H, W, d], [Hk, L, d], [Hk, L, d]
}

func lcg(seed *uint32) float32 {
	*seed = *seed*1103515245 + 12345
	return float32(*seed>>8)/16777216.0 - 0.5
}

func newPagedBatch() *pagedBatch {
	seed := uint32(7)
	b := &pagedBatch{}
	fill := func(n int) []float32 {
		s := make([]float32, n)
		for i := range s {
			s[i] = lcg(&seed)
		}
		return s
	}
	for _, l := range pgLens {
		b.q = append(b.q, fill(pgH*pgW*pgD))
		b.k = append(b.k, fill(pgHk*int(l)*pgD))
		b.v = append(b.v, fill(pgHk*int(l)*pgD))
	}
	return b
}

func (b *pagedBatch) contiguous(t *testing.T) *defkv.Layer {
	l := &defkv.Layer{}
	for i, n := range pgLens {
		q, err := defkv.F32Tensor(b.q[i], pgH, pgW, pgD)
		if err != nil {
			t.Fatal(err)
		}
		k, _ := defkv.F32Tensor(append([]float32(nil), b.k[i]...), pgHk, int64(n), pgD)
		v, _ := defkv.F32Tensor(append([]float32(nil), b.v[i]...), pgHk, int64(n), pgD)
		l.Seqs = append(l.Seqs, defkv.Sequence{Queries: q, Keys: k, Values: v})
	}
	return l
}

func ceilDiv(a, b int32) int32 { return (a + b - 1) / b }

// shuffled is a permutation of 0..n-1 (a fixed LCG shuffle).
func shuffled(n int) []int32 {
	p := make([]int32, n)
	for i := range p {
		p[i] = int32(i)
	}
	seed := uint32(11)
	for i := n - 1; i > 0; i-- {
		seed = seed*1103515245 + 12345
		j := int(seed>>8) % (i + 1)
		p[i], p[j] = p[j], p[i]
	}
	return p
}

// pagedCache is a paged copy of the batch plus its flat pools, for checking what compaction wrote.
type pagedCache struct {
	kp, vp []float32
	pk     *defkv.PagedKV
	stride int32
}

// slot is the pool offset of (row, token, head) for the layout.
func slot(layout defkv.PageLayout, page, tok, h int32) int {
	switch layout {
	case defkv.PageNHD:
		return ((int(page)*pgPS+int(tok%pgPS))*pgHk + int(h)) * pgD
	default: // PageHead: h is implied by the row
		return (int(page)*pgPS + int(tok%pgPS)) * pgD
	}
}

func newPagedCache(t *testing.T, b *pagedBatch, layout defkv.PageLayout, spare int) *pagedCache {
	rowsPerSeq := int32(1)
	if layout == defkv.PageHead {
		rowsPerSeq = pgHk
	}
	stride := ceilDiv(pgLens[0], pgPS)
	used := 0
	for _, l := range pgLens {
		used += int(rowsPerSeq * ceilDiv(l, pgPS))
	}
	n := used + spare
	per := pgPS * pgD
	if layout == defkv.PageNHD {
		per *= pgHk
	}
	c := &pagedCache{kp: make([]float32, n*per), vp: make([]float32, n*per), stride: stride}
	for i := range c.kp {
		c.kp[i], c.vp[i] = float32(math.NaN()), float32(math.NaN())
	}
	ids := shuffled(n)
	tables := make([]int32, int(rowsPerSeq)*len(pgLens)*int(stride))
	next := 0
	for s, l := range pgLens {
		for r := int32(0); r < rowsPerSeq; r++ {
			row := tables[(int32(s)*rowsPerSeq+r)*stride:]
			for i := int32(0); i < ceilDiv(l, pgPS); i++ {
				row[i] = ids[next]
				next++
			}
		}
		for h := int32(0); h < pgHk; h++ {
			row := tables[(int32(s)*rowsPerSeq+h%rowsPerSeq)*stride:]
			for tok := int32(0); tok < l; tok++ {
				o := slot(layout, row[tok/pgPS], tok, h)
				src := (int(h)*int(l) + int(tok)) * pgD
				copy(c.kp[o:o+pgD], b.k[s][src:src+pgD])
				copy(c.vp[o:o+pgD], b.v[s][src:src+pgD])
			}
		}
	}
	shape := []int64{int64(n), pgPS, pgD}
	if layout == defkv.PageNHD {
		shape = []int64{int64(n), pgPS, pgHk, pgD}
	}
	kt, err := defkv.F32Tensor(c.kp, shape...)
	if err != nil {
		t.Fatal(err)
	}
	vt, _ := defkv.F32Tensor(c.vp, shape...)
	c.pk = &defkv.PagedKV{Layout: layout, PageSize: pgPS, KPages: kt, VPages: vt, BlockTables: tables,
		BlockTableStride: int64(stride), SeqLens: append([]int32(nil), pgLens...)}
	if layout == defkv.PageHead {
		c.pk.NKVHeads = pgHk
	}
	return c
}

func (b *pagedBatch) pagedLayer(c *pagedCache) *defkv.Layer {
	l := &defkv.Layer{Paged: c.pk}
	for i := range pgLens {
		q, _ := defkv.F32Tensor(b.q[i], pgH, pgW, pgD)
		l.Seqs = append(l.Seqs, defkv.Sequence{Queries: q})
	}
	return l
}

func pagedParams() defkv.Params {
	p := defkv.NewParams(defkv.AdaSnapKV) // head-adaptive: heads keep different counts
	p.CompressionRatio, p.Window = 0.6, pgW
	return p
}

// checkRows verifies that row r of a layout keeps head h's kept entries (of sequence s) first.
func checkKept(t *testing.T, what string, b *pagedBatch, kp, vp []float32, layout defkv.PageLayout, row []int32,
	s, h int, kept []int32) {
	t.Helper()
	L := int(pgLens[s])
	for j, tok := range kept {
		o := slot(layout, row[int32(j)/pgPS], int32(j), int32(h))
		src := (h*L + int(tok)) * pgD
		if fmt.Sprint(kp[o:o+pgD]) != fmt.Sprint(b.k[s][src:src+pgD]) || fmt.Sprint(vp[o:o+pgD]) != fmt.Sprint(b.v[s][src:src+pgD]) {
			t.Fatalf("%s: sequence %d head %d entry %d is not token %d's row", what, s, h, j, tok)
		}
	}
}

func TestPagedSelectAndCompact(t *testing.T) {
	ctx, err := defkv.NewContext()
	if err != nil {
		t.Fatal(err)
	}
	defer ctx.Close()
	b := newPagedBatch()
	want, err := ctx.Select(pagedParams(), b.contiguous(t))
	if err != nil {
		t.Fatal(err)
	}
	checks := 0
	for _, layout := range []defkv.PageLayout{defkv.PageNHD, defkv.PageHead} {
		c := newPagedCache(t, b, layout, 3)
		layer := b.pagedLayer(c)
		sel, err := ctx.Select(pagedParams(), layer)
		if err != nil {
			t.Fatalf("layout %d: %v", layout, err)
		}
		if fmt.Sprint(sel.HeadLens) != fmt.Sprint(want.HeadLens) || fmt.Sprint(sel.Indices) != fmt.Sprint(want.Indices) ||
			string(sel.KeepMask) != string(want.KeepMask) {
			t.Fatalf("layout %d: the paged selection differs from the contiguous one", layout)
		}
		checks++

		// Into new per-head pages: every source page is freed, in table order.
		dst := newDst(t, sel, 2)
		freed, err := ctx.CompactPaged(layer, sel, dst.pk)
		if err != nil {
			t.Fatalf("layout %d into new pages: %v", layout, err)
		}
		var allSrc []int32
		for r := 0; r*int(c.stride) < len(c.pk.BlockTables); r++ {
			s := r
			if layout == defkv.PageHead {
				s = r / pgHk
			}
			allSrc = append(allSrc, c.pk.BlockTables[r*int(c.stride):r*int(c.stride)+int(ceilDiv(pgLens[s], pgPS))]...)
		}
		if fmt.Sprint(freed) != fmt.Sprint(allSrc) {
			t.Fatalf("layout %d into new pages: freed %v, want every source page %v", layout, freed, allSrc)
		}
		for i := range sel.HeadLens {
			row := dst.pk.BlockTables[i*int(dst.stride):]
			checkKept(t, "into new pages", b, dst.kp, dst.vp, defkv.PageHead, row, i/pgHk, i%pgHk, sel.Kept(i))
		}
		checks++

		// In place: each row's trailing pages past those still in use are freed.
		freed, err = ctx.CompactPaged(layer, sel, nil)
		if err != nil {
			t.Fatalf("layout %d in place: %v", layout, err)
		}
		var wantFreed []int32
		for s, l := range pgLens {
			np := ceilDiv(l, pgPS)
			if layout == defkv.PageNHD {
				keep := ceilDiv(max32(sel.HeadLens[2*s], sel.HeadLens[2*s+1]), pgPS)
				wantFreed = append(wantFreed, c.pk.BlockTables[int32(s)*c.stride+keep:int32(s)*c.stride+np]...)
				continue
			}
			for h := 0; h < pgHk; h++ {
				r := int32(s*pgHk + h)
				keep := ceilDiv(sel.HeadLens[s*pgHk+h], pgPS)
				wantFreed = append(wantFreed, c.pk.BlockTables[r*c.stride+keep:r*c.stride+np]...)
			}
		}
		if len(freed) == 0 || fmt.Sprint(freed) != fmt.Sprint(wantFreed) {
			t.Fatalf("layout %d in place: freed %v, want %v", layout, freed, wantFreed)
		}
		for i := range sel.HeadLens {
			s, h := i/pgHk, i%pgHk
			r := s
			if layout == defkv.PageHead {
				r = i
			}
			checkKept(t, "in place", b, c.kp, c.vp, layout, c.pk.BlockTables[r*int(c.stride):], s, h, sel.Kept(i))
		}
		t.Logf("layout %d: head_lens %v, %d pages freed in place, %d into new pages", layout, sel.HeadLens, len(freed), len(allSrc))
		checks++
	}
	if checks != 6 {
		t.Fatalf("%d checks ran, want 6", checks)
	}
}

func max32(a, b int32) int32 {
	if a > b {
		return a
	}
	return b
}

// newDst allocates per-head destination pages (PagesNeeded per row, shuffled ids, NaN-filled).
func newDst(t *testing.T, sel *defkv.Selection, spare int) *pagedCache {
	pages, total, err := defkv.PagesNeeded(sel.HeadLens, pgPS)
	if err != nil {
		t.Fatal(err)
	}
	stride := int32(1)
	sum := int64(0)
	for i, p := range pages {
		if p != ceilDiv(sel.HeadLens[i], pgPS) {
			t.Fatalf("PagesNeeded: row %d needs %d pages, want %d", i, p, ceilDiv(sel.HeadLens[i], pgPS))
		}
		stride = max32(stride, p)
		sum += int64(p)
	}
	if sum != total {
		t.Fatalf("PagesNeeded: total %d, want %d", total, sum)
	}
	n := int(total) + spare
	c := &pagedCache{kp: make([]float32, n*pgPS*pgD), vp: make([]float32, n*pgPS*pgD), stride: stride}
	for i := range c.kp {
		c.kp[i], c.vp[i] = float32(math.NaN()), float32(math.NaN())
	}
	ids := shuffled(n)
	tables := make([]int32, len(pages)*int(stride))
	next := 0
	for r, p := range pages {
		for i := 0; i < int(p); i++ {
			tables[r*int(stride)+i] = ids[next]
			next++
		}
	}
	kt, _ := defkv.F32Tensor(c.kp, int64(n), pgPS, pgD)
	vt, _ := defkv.F32Tensor(c.vp, int64(n), pgPS, pgD)
	c.pk = &defkv.PagedKV{Layout: defkv.PageHead, PageSize: pgPS, NKVHeads: pgHk, KPages: kt, VPages: vt,
		BlockTables: tables, BlockTableStride: int64(stride)}
	return c
}

func TestPagedErrors(t *testing.T) {
	ctx, err := defkv.NewContext()
	if err != nil {
		t.Fatal(err)
	}
	defer ctx.Close()
	b := newPagedBatch()
	c := newPagedCache(t, b, defkv.PageNHD, 0)
	n := int32(len(c.kp) / (pgPS * pgHk * pgD))
	c.pk.BlockTables[1] = n // a page id past the pool
	var de *defkv.Error
	_, err = ctx.Select(pagedParams(), b.pagedLayer(c))
	if !errors.As(err, &de) || de.Code != defkv.InvalidArgument ||
		!strings.HasPrefix(de.Message, "Context.Select: ") ||
		!strings.Contains(de.Message, fmt.Sprintf("layer->paged->block_tables[1] (row 0, page 1) is %d, outside the pool's pages [0, %d)", n, n)) {
		t.Fatalf("page id outside the pool: got %v", err)
	}
	// A block table shorter than its rows is caught before the library reads past it.
	c2 := newPagedCache(t, b, defkv.PageNHD, 0)
	c2.pk.BlockTables = c2.pk.BlockTables[:5]
	if _, err := ctx.Select(pagedParams(), b.pagedLayer(c2)); !errors.As(err, &de) || !strings.Contains(de.Message, "BlockTables has 5 entries") {
		t.Fatalf("short block table: got %v", err)
	}
	if _, _, err := defkv.PagesNeeded([]int32{3}, 0); !errors.As(err, &de) || de.Message != "PagesNeeded: page_size is 0, expected >= 1" {
		t.Fatalf("PagesNeeded with page size 0: got %v", err)
	}
}

func TestPagedNextSlots(t *testing.T) {
	// Rows of 3 pages of 4: lengths 5 (page 1 slot 1), 8 (full: -1), 0 (full: -1), 11.
	tables := []int32{7, 2, 9, 4, 0, 1, 3, 5, 6, 8, 10, 11}
	page, off, err := defkv.NextSlots([]int32{5, 8, 0, 11}, tables, 3, 4)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(page) != "[2 -1 -1 11]" || fmt.Sprint(off) != "[1 0 0 3]" {
		t.Fatalf("NextSlots: pages %v offsets %v", page, off)
	}
	var de *defkv.Error
	if _, _, err := defkv.NextSlots([]int32{13}, tables[:3], 3, 4); !errors.As(err, &de) || de.Code != defkv.InvalidArgument ||
		!strings.HasPrefix(de.Message, "NextSlots: lens[0] is 13") {
		t.Fatalf("NextSlots past the row: got %v", err)
	}
}
