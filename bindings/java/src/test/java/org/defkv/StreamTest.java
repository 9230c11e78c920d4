package org.defkv;

import static org.junit.jupiter.api.Assertions.*;
import java.nio.*;
import java.util.*;
import org.junit.jupiter.api.Test;

/**
 * A small decode-time stream: 2 layers, H = 4, Hk = 2, d = 8, window 4, interval 8, budget 12,
 * capacity 48, defensivekv with an oProj; a prompt of 20 tokens, then 40 decoding steps with the
 * engine loop (K/V written at row headLens[k] of each head, append, pushQueries, round when due),
 * on contiguous [Hk, capacity, d] caches or one-head-per-page caches.
 */
class StreamTest {
    static final int LAYERS = 2, H = 4, HK = 2, D = 8, W = 4, CAP = 48, BUDGET = 12, INTERVAL = 8, DM = 16;
    static final int PROMPT = 20, STEPS = 40, PS = 4, MAX_PAGES = CAP / PS, N_PAGES = HK * MAX_PAGES;

    int seed = 3;
    float next() { seed = seed * 1103515245 + 12345; return (seed >>> 8) / 16777216.0f - 0.5f; }
    static ByteBuffer floats(int n) { return ByteBuffer.allocateDirect(4 * n).order(ByteOrder.nativeOrder()); }
    static Params params() { return new Params(Params.DEFENSIVEKV).window(W); }
    static StreamParams streamParams() {
        return new StreamParams().shape(LAYERS, H, HK, D).capacity(CAP).interval(INTERVAL).budget(BUDGET);
    }

    /** Every round's head lengths; checks budget + slack, the cache rows, the window and the sinks. */
    List<int[]> run(boolean pagedCache) {
        seed = 3;
        List<int[]> history = new ArrayList<>();
        int[] tables = new int[HK * MAX_PAGES];
        for (int i = 0; i < tables.length; i++) tables[i] = (i * 7 + 3) % N_PAGES; // a permutation
        try (Context ctx = new Context(1, 2); Stream st = ctx.stream(params(), streamParams())) {
            ByteBuffer o = floats(DM * H * D);
            for (int i = 0; i < DM * H * D; i++) o.putFloat(4 * i, next());
            Tensor oProj = Tensor.of(o, Tensor.F32, DM, H * D);
            ByteBuffer[] keys = new ByteBuffer[LAYERS], vals = new ByteBuffer[LAYERS];
            StreamCache[] caches = new StreamCache[LAYERS];
            List<List<List<float[][]>>> mirror = new ArrayList<>(), written = new ArrayList<>();
            for (int l = 0; l < LAYERS; l++) {
                keys[l] = floats(HK * CAP * D); vals[l] = floats(HK * CAP * D);
                if (pagedCache) {
                    PagedKv pk = PagedKv.of(PagedKv.HEAD, PS, HK, Tensor.of(keys[l], Tensor.F32, N_PAGES, PS, D),
                        Tensor.of(vals[l], Tensor.F32, N_PAGES, PS, D), tables, MAX_PAGES, null);
                    caches[l] = StreamCache.paged(pk, oProj);
                } else {
                    caches[l] = StreamCache.of(Tensor.of(keys[l], Tensor.F32, HK, CAP, D), Tensor.of(vals[l], Tensor.F32, HK, CAP, D), oProj);
                }
                mirror.add(new ArrayList<>()); written.add(new ArrayList<>());
                for (int k = 0; k < HK; k++) { mirror.get(l).add(new ArrayList<>()); written.get(l).add(new ArrayList<>()); }
            }
            for (int s = -1; s < STEPS; s++) {
                int n = s < 0 ? PROMPT : 1;
                for (int l = 0; l < LAYERS; l++) {
                    int[] lens = st.headLens(l);
                    for (int k = 0; k < HK; k++)
                        for (int i = 0; i < n; i++) {
                            float[] kk = new float[D], vv = new float[D];
                            int at = row(pagedCache, tables, k, lens[k] + i);
                            for (int j = 0; j < D; j++) {
                                kk[j] = next(); vv[j] = next() * (1 + written.get(l).get(k).size() % 3);
                                keys[l].putFloat(4 * (at + j), kk[j]); vals[l].putFloat(4 * (at + j), vv[j]);
                            }
                            mirror.get(l).get(k).add(new float[][] {kk, vv});
                            written.get(l).get(k).add(new float[][] {kk, vv});
                        }
                    st.append(l, n);
                    int w = Math.min(n, W); // the prompt pushes its last window of queries
                    ByteBuffer q = floats(H * w * D);
                    for (int i = 0; i < H * w * D; i++) q.putFloat(4 * i, next() * 2);
                    st.pushQueries(l, Tensor.of(q, Tensor.F32, H, w, D));
                }
                if (s < 0 || !st.due()) continue;
                Selection[] sels = st.roundSelections(caches);
                int[] round = new int[LAYERS * HK];
                for (int l = 0; l < LAYERS; l++) {
                    int[] lens = st.headLens(l);
                    assertArrayEquals(sels[l].headLens, lens, "the selection's head lens");
                    for (int k = 0; k < HK; k++) {
                        round[l * HK + k] = lens[k];
                        assertTrue(lens[k] <= BUDGET + INTERVAL, "step " + s + ": head above budget + slack: " + lens[k]);
                        List<float[][]> kept = new ArrayList<>();
                        for (int i : sels[l].kept(k)) kept.add(mirror.get(l).get(k).get(i));
                        mirror.get(l).set(k, kept);
                        for (int r = 0; r < kept.size(); r++) {
                            int at = row(pagedCache, tables, k, r);
                            for (int j = 0; j < D; j++) {
                                assertEquals(kept.get(r)[0][j], keys[l].getFloat(4 * (at + j)), "step " + s + " layer " + l + " head " + k + " row " + r);
                                assertEquals(kept.get(r)[1][j], vals[l].getFloat(4 * (at + j)), "step " + s + " layer " + l + " head " + k + " row " + r);
                            }
                        }
                        List<float[][]> wr = written.get(l).get(k);
                        for (int i = 1; i <= W; i++) { // the window: the last 4 appended, at the last 4 rows
                            int at = row(pagedCache, tables, k, lens[k] - i);
                            for (int j = 0; j < D; j++)
                                assertEquals(wr.get(wr.size() - i)[0][j], keys[l].getFloat(4 * (at + j)), "window entry lost at step " + s);
                        }
                        for (int i = 0; i < params().nSink(); i++) { // the sinks: the first rows
                            int at = row(pagedCache, tables, k, i);
                            assertEquals(wr.get(i)[0][0], keys[l].getFloat(4 * at), "sink lost at step " + s);
                        }
                    }
                }
                history.add(round);
            }
        }
        assertTrue(history.size() >= 3, history.size() + " rounds ran, expected at least 3");
        assertTrue(history.stream().flatMapToInt(Arrays::stream).anyMatch(n -> n < PROMPT), "no round evicted anything");
        return history;
    }
    static int row(boolean paged, int[] tables, int k, int r) {
        return paged ? (tables[k * MAX_PAGES + r / PS] * PS + r % PS) * D : (k * CAP + r) * D;
    }

    @Test void contiguousIsDeterministic() {
        List<int[]> a = run(false), b = run(false);
        assertEquals(a.size(), b.size());
        for (int i = 0; i < a.size(); i++) assertArrayEquals(a.get(i), b.get(i), "round " + i);
    }

    @Test void pagedEqualsContiguous() {
        List<int[]> a = run(true), b = run(false);
        assertEquals(a.size(), b.size());
        for (int i = 0; i < a.size(); i++) assertArrayEquals(a.get(i), b.get(i), "round " + i);
    }

    @Test void errors() {
        Context ctx = new Context();
        DefkvException e = assertThrows(DefkvException.class, () -> ctx.stream(params(), streamParams().budget(7)));
        assertEquals(Status.INVALID_ARGUMENT, e.status());
        assertTrue(e.getMessage().contains(": Context.stream: sp->budget"), e.getMessage());
        Stream st = ctx.stream(params(), streamParams());
        Tensor wrong = Tensor.of(floats(H * (D + 1)), Tensor.F32, H, 1, D + 1);
        e = assertThrows(DefkvException.class, () -> st.pushQueries(0, wrong));
        assertEquals(Status.INVALID_ARGUMENT, e.status());
        assertTrue(e.getMessage().contains(": Stream.pushQueries: queries"), e.getMessage());
        e = assertThrows(DefkvException.class, () -> st.round(new StreamCache[0]));
        assertEquals(Status.INVALID_ARGUMENT, e.status());
        e = assertThrows(DefkvException.class, () -> st.append(0, CAP + 1));
        assertEquals(Status.INVALID_STATE, e.status());
        assertTrue(e.getMessage().contains("capacity"), e.getMessage());
        ctx.close(); // closes the stream too: later calls are errors, not crashes
        e = assertThrows(DefkvException.class, () -> st.headLens(0));
        assertEquals(Status.INVALID_STATE, e.status());
        st.close();
        st.close();
    }
}
