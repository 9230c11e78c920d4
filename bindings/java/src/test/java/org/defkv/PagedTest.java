package org.defkv;

import static org.junit.jupiter.api.Assertions.*;
import java.nio.*;
import java.util.*;
import org.junit.jupiter.api.Test;

/**
 * Paged caches: a batch of two sequences (L = 37, 22; Hk = 2, d = 8) copied into pools of
 * 4-token pages with shuffled page ids and NaN wherever no row points. The paged selection must
 * equal the contiguous one; compaction into new pages and in place must move the kept rows and
 * free the expected pages; a page id outside the pool is the library's error.
 */
class PagedTest {
    static final int H = 4, HK = 2, D = 8, W = 4, PS = 4;
    static final int[] LENS = {37, 22};

    static int seed;
    static float next() { seed = seed * 1103515245 + 12345; return (seed >>> 8) / 16777216.0f - 0.5f; }
    static float[][] fill(int... n) {
        float[][] r = new float[LENS.length][];
        for (int s = 0; s < LENS.length; s++) { r[s] = new float[n[s]]; for (int i = 0; i < n[s]; i++) r[s][i] = next(); }
        return r;
    }
    static final float[][] Q, K, V;
    static {
        seed = 7;
        Q = fill(H * W * D, H * W * D); K = fill(HK * LENS[0] * D, HK * LENS[1] * D); V = fill(HK * LENS[0] * D, HK * LENS[1] * D);
    }
    static int[] shuffled(int n) {
        int[] p = new int[n];
        for (int i = 0; i < n; i++) p[i] = i;
        int sd = 11;
        for (int i = n - 1; i > 0; i--) { sd = sd * 1103515245 + 12345; int j = (sd >>> 8) % (i + 1); int t = p[i]; p[i] = p[j]; p[j] = t; }
        return p;
    }
    static int pages(int l) { return (l + PS - 1) / PS; }
    static ByteBuffer nanBuffer(int floats) {
        ByteBuffer b = ByteBuffer.allocateDirect(4 * floats).order(ByteOrder.nativeOrder());
        for (int i = 0; i < floats; i++) b.putFloat(4 * i, Float.NaN);
        return b;
    }
    static int slot(int layout, int page, int t, int h) {
        return layout == PagedKv.NHD ? ((page * PS + t % PS) * HK + h) * D : (page * PS + t % PS) * D;
    }
    static Params params() { return new Params(Params.ADA_SNAPKV).compressionRatio(0.6).window(W); }

    /** Pools of a layout (NHD [N, PS, HK, D] or HEAD [N, PS, D]) and their block tables. */
    static final class Pools {
        final int layout, stride, n; final ByteBuffer k, v; final int[] tables; final PagedKv paged;
        Pools(int layout, int spare) {
            this.layout = layout;
            int perSeq = layout == PagedKv.HEAD ? HK : 1;
            stride = pages(LENS[0]);
            int used = 0;
            for (int l : LENS) used += perSeq * pages(l);
            n = used + spare;
            int perPage = layout == PagedKv.NHD ? PS * HK * D : PS * D;
            k = nanBuffer(n * perPage); v = nanBuffer(n * perPage);
            tables = new int[perSeq * LENS.length * stride];
            int[] ids = shuffled(n);
            int nx = 0;
            for (int s = 0; s < LENS.length; s++) {
                for (int r = 0; r < perSeq; r++) for (int i = 0; i < pages(LENS[s]); i++) tables[(s * perSeq + r) * stride + i] = ids[nx++];
                for (int h = 0; h < HK; h++) {
                    int row = (s * perSeq + h % perSeq) * stride;
                    for (int t = 0; t < LENS[s]; t++) {
                        int o = slot(layout, tables[row + t / PS], t, h), src = (h * LENS[s] + t) * D;
                        for (int e = 0; e < D; e++) { k.putFloat(4 * (o + e), K[s][src + e]); v.putFloat(4 * (o + e), V[s][src + e]); }
                    }
                }
            }
            long[] shape = layout == PagedKv.NHD ? new long[] {n, PS, HK, D} : new long[] {n, PS, D};
            paged = PagedKv.of(layout, PS, layout == PagedKv.HEAD ? HK : 0, Tensor.of(k, Tensor.F32, shape),
                Tensor.of(v, Tensor.F32, shape), tables, stride, LENS.clone());
        }
        /** Head h of sequence s (block-table row `row` of pools of layout `lay`) holds `kept` first. */
        static void checkKept(String what, int lay, ByteBuffer k, ByteBuffer v, int[] tables, int stride, int row, int s, int h, int[] kept) {
            for (int j = 0; j < kept.length; j++) {
                int o = slot(lay, tables[row * stride + j / PS], j, h), src = (h * LENS[s] + kept[j]) * D;
                for (int e = 0; e < D; e++) {
                    assertEquals(K[s][src + e], k.getFloat(4 * (o + e)), what + ": seq " + s + " head " + h + " entry " + j);
                    assertEquals(V[s][src + e], v.getFloat(4 * (o + e)), what + ": seq " + s + " head " + h + " entry " + j);
                }
            }
        }
    }
    static Sequence[] queries() {
        Sequence[] r = new Sequence[LENS.length];
        for (int s = 0; s < LENS.length; s++) r[s] = Sequence.ofQueries(Tensor.ofFloats(Q[s], H, W, D));
        return r;
    }

    @Test void pagedSelectionAndCompaction() {
        int checks = 0;
        try (Context ctx = new Context()) {
            Sequence[] contiguous = new Sequence[LENS.length];
            for (int s = 0; s < LENS.length; s++)
                contiguous[s] = Sequence.ofQueries(Tensor.ofFloats(Q[s], H, W, D), Tensor.ofFloats(K[s], HK, LENS[s], D),
                    Tensor.ofFloats(V[s], HK, LENS[s], D));
            Selection want = ctx.select(params(), contiguous, null);
            for (int layout : new int[] {PagedKv.NHD, PagedKv.HEAD}) {
                Pools src = new Pools(layout, 3);
                Selection sel = ctx.select(params(), queries(), null, src.paged);
                assertArrayEquals(want.headLens, sel.headLens, "layout " + layout);
                assertArrayEquals(want.indices, sel.indices, "layout " + layout);
                assertArrayEquals(want.keepMask, sel.keepMask, "layout " + layout);

                // Into new per-head pages (pagesNeeded per row, shuffled ids, NaN elsewhere).
                int[] need = PagedKv.pagesNeeded(sel.headLens, PS);
                int total = 0, dstride = 1;
                for (int i = 0; i < need.length; i++) { assertEquals(pages(sel.headLens[i]), need[i]); total += need[i]; dstride = Math.max(dstride, need[i]); }
                int dn = total + 2;
                ByteBuffer dk = nanBuffer(dn * PS * D), dv = nanBuffer(dn * PS * D);
                int[] dtables = new int[need.length * dstride], ids = shuffled(dn);
                int nx = 0;
                for (int r = 0; r < need.length; r++) for (int i = 0; i < need[r]; i++) dtables[r * dstride + i] = ids[nx++];
                PagedKv dst = PagedKv.of(PagedKv.HEAD, PS, HK, Tensor.of(dk, Tensor.F32, dn, PS, D), Tensor.of(dv, Tensor.F32, dn, PS, D),
                    dtables, dstride, null);
                int[] freed = ctx.compactPaged(src.paged, sel, dst);
                int perSeq = layout == PagedKv.HEAD ? HK : 1;
                List<Integer> all = new ArrayList<>();
                for (int r = 0; r < perSeq * LENS.length; r++)
                    for (int i = 0; i < pages(LENS[r / perSeq]); i++) all.add(src.tables[r * src.stride + i]);
                assertEquals(all, box(freed), "layout " + layout + " into new pages");
                for (int i = 0; i < sel.headLens.length; i++)
                    Pools.checkKept("into new pages", PagedKv.HEAD, dk, dv, dtables, dstride, i, i / HK, i % HK, sel.kept(i));
                checks++;

                // In place: each row's pages past those still in use.
                freed = ctx.compactPaged(src.paged, sel);
                List<Integer> expect = new ArrayList<>();
                for (int s = 0; s < LENS.length; s++)
                    for (int r = 0; r < perSeq; r++) {
                        int keep = perSeq == 1 ? Math.max(sel.headLens[s * HK], sel.headLens[s * HK + 1]) : sel.headLens[s * HK + r];
                        int row = (s * perSeq + r) * src.stride;
                        for (int i = pages(keep); i < pages(LENS[s]); i++) expect.add(src.tables[row + i]);
                    }
                assertFalse(expect.isEmpty());
                assertEquals(expect, box(freed), "layout " + layout + " in place");
                for (int i = 0; i < sel.headLens.length; i++)
                    Pools.checkKept("in place", layout, src.k, src.v, src.tables, src.stride, layout == PagedKv.HEAD ? i : i / HK,
                        i / HK, i % HK, sel.kept(i));
                checks++;
            }
        }
        assertEquals(4, checks);
    }
    static List<Integer> box(int[] a) { List<Integer> r = new ArrayList<>(); for (int x : a) r.add(x); return r; }

    @Test void pageOutsideThePoolIsTheLibrarysError() {
        try (Context ctx = new Context()) {
            Pools src = new Pools(PagedKv.NHD, 0);
            src.tables[1] = src.n;
            DefkvException e = assertThrows(DefkvException.class, () -> ctx.select(params(), queries(), null, src.paged));
            assertEquals(Status.INVALID_ARGUMENT, e.status());
            String want = "Context.select: layer->paged->block_tables[1] (row 0, page 1) is " + src.n + ", outside the pool's pages [0, " + src.n + ")";
            assertTrue(e.getMessage().contains(want), e.getMessage());
            PagedKv shortTables = PagedKv.of(PagedKv.NHD, PS, 0, src.paged.kPages, src.paged.vPages, new int[5], src.stride, LENS.clone());
            e = assertThrows(DefkvException.class, () -> ctx.select(params(), queries(), null, shortTables));
            assertTrue(e.getMessage().contains("blockTables has 5 entries"), e.getMessage());
        }
        DefkvException e = assertThrows(DefkvException.class, () -> PagedKv.pagesNeeded(new int[] {3}, 0));
        assertTrue(e.getMessage().endsWith("PagedKv.pagesNeeded: page_size is 0, expected >= 1"), e.getMessage());
    }

    @Test void nextSlots() {
        int[] tables = {7, 2, 9, 4, 0, 1, 3, 5, 6, 8, 10, 11};
        PagedKv.Slots s = PagedKv.nextSlots(new int[] {5, 8, 0, 11}, tables, 3, 4);
        assertArrayEquals(new int[] {2, -1, -1, 11}, s.page);
        assertArrayEquals(new int[] {1, 0, 0, 3}, s.offset);
        DefkvException e = assertThrows(DefkvException.class, () -> PagedKv.nextSlots(new int[] {13}, new int[] {7, 2, 9}, 3, 4));
        assertTrue(e.getMessage().contains("PagedKv.nextSlots: lens[0] is 13"), e.getMessage());
    }
}
