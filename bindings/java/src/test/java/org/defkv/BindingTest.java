package org.defkv;

import static org.junit.jupiter.api.Assertions.*;
import java.nio.*;
import java.nio.file.*;
import java.util.*;
import java.util.regex.*;
import org.junit.jupiter.api.Test;

class BindingTest {
    /** Minimal safetensors reader: 8-byte LE length, flat JSON header, LE data. */
    static final class St {
        final Map<String, long[]> shape = new HashMap<>(); final Map<String, int[]> off = new HashMap<>();
        final Map<String, String> meta = new HashMap<>(); final ByteBuffer data;
        St(Path p) throws Exception {
            ByteBuffer b = ByteBuffer.wrap(Files.readAllBytes(p)).order(ByteOrder.LITTLE_ENDIAN);
            int n = (int) b.getLong(0);
            String h = new String(b.array(), 8, n, "UTF-8");
            Matcher m = Pattern.compile("\"([^\"]+)\":\\s*\\{\"dtype\":\\s*\"\\w+\",\\s*\"shape\":\\s*\\[([^\\]]*)\\],\\s*\"data_offsets\":\\s*\\[(\\d+),\\s*(\\d+)\\]").matcher(h);
            while (m.find()) {
                shape.put(m.group(1), Arrays.stream(m.group(2).split(",")).map(String::trim).filter(s -> !s.isEmpty()).mapToLong(Long::parseLong).toArray());
                off.put(m.group(1), new int[] {Integer.parseInt(m.group(3)), Integer.parseInt(m.group(4))});
            }
            Matcher mm = Pattern.compile("\"(window|kernel|compression_ratio|n_layers)\":\\s*\"([^\"]*)\"").matcher(h);
            while (mm.find()) meta.put(mm.group(1), mm.group(2));
            data = b.slice(8 + n, b.capacity() - 8 - n).order(ByteOrder.LITTLE_ENDIAN);
        }
        ByteBuffer bytes(String name) { int[] o = off.get(name); assertNotNull(o, name); return data.slice(o[0], o[1] - o[0]).order(ByteOrder.LITTLE_ENDIAN); }
        Tensor tensor(String name) {
            ByteBuffer src = bytes(name);
            ByteBuffer d = ByteBuffer.allocateDirect(src.capacity()).order(ByteOrder.nativeOrder());
            d.asFloatBuffer().put(src.asFloatBuffer());
            return Tensor.of(d, Tensor.F32, shape.get(name));
        }
    }
    static Path dir() {
        String d = System.getProperty("defkv.conformance.dir", System.getenv("DEFKV_CONFORMANCE_DIR"));
        return Paths.get(d != null ? d : "../../tests/data/conformance");
    }
    static final String[] CASES = {"pub1-g4-L1024", "pub2-g1-L300", "pub3-g8-L700", "pub4-3layer-L512"};
    static final String[] METHODS = {"snapkv", "ada-snapkv", "criticalkv", "ada-criticalkv", "defensivekv",
        "layer-defensivekv", "streamingllm", "knorm", "tova"};

    static Params params(St c, int method) {
        return new Params(method).compressionRatio(Double.parseDouble(c.meta.get("compression_ratio")))
            .window(Integer.parseInt(c.meta.get("window"))).kernel(Integer.parseInt(c.meta.get("kernel")));
    }

    @Test void goldenCasesMatchExactly() throws Exception {
        int checked = 0;
        try (Context ctx = new Context()) {
            for (String cn : CASES) {
                St c = new St(dir().resolve(cn + ".case.safetensors"));
                int nl = Integer.parseInt(c.meta.get("n_layers"));
                Tensor[] q = new Tensor[nl], k = new Tensor[nl], v = new Tensor[nl], o = new Tensor[nl];
                for (int i = 0; i < nl; i++) {
                    q[i] = c.tensor("layers." + i + ".queries"); k[i] = c.tensor("layers." + i + ".keys");
                    v[i] = c.tensor("layers." + i + ".values"); o[i] = c.tensor("layers." + i + ".o_proj");
                }
                for (String mn : METHODS) {
                    int m = Params.methodFromName(mn);
                    St e = new St(dir().resolve(cn + "." + mn + ".expected.safetensors"));
                    Selection[] sels = new Selection[nl];
                    if (m == Params.LAYER_DEFENSIVEKV) sels = ctx.selectGlobal(params(c, m), q, k, v, o);
                    else for (int i = 0; i < nl; i++) sels[i] = ctx.select(params(c, m), q[i], k[i], v[i], o[i]);
                    for (int i = 0; i < nl; i++) {
                        ByteBuffer keep = e.bytes("layers." + i + ".keep");
                        byte[] want = new byte[keep.capacity()]; keep.get(want);
                        int[] lens = new int[sels[i].headLens.length]; e.bytes("layers." + i + ".head_lens").asIntBuffer().get(lens);
                        assertArrayEquals(lens, sels[i].headLens, cn + " " + mn + " layer " + i + " head_lens");
                        assertArrayEquals(want, sels[i].keepMask, cn + " " + mn + " layer " + i + " keep set");
                        checked++;
                    }
                }
            }
        }
        assertEquals(54, checked);
    }

    @Test void errorsCarryStatusAndMessage() throws Exception {
        St c = new St(dir().resolve("pub2-g1-L300.case.safetensors"));
        Tensor q = c.tensor("layers.0.queries"), k = c.tensor("layers.0.keys"), v = c.tensor("layers.0.values"), o = c.tensor("layers.0.o_proj");
        Context ctx = new Context();
        DefkvException e = assertThrows(DefkvException.class, () -> ctx.select(params(c, Params.SNAPKV).compressionRatio(1.5), q, k, v, o));
        assertEquals(Status.INVALID_ARGUMENT, e.status());
        assertTrue(e.getMessage().contains("compression_ratio"), e.getMessage());
        e = assertThrows(DefkvException.class, () -> ctx.select(params(c, Params.DEFENSIVEKV), q, k, v, null));
        assertTrue(e.getMessage().contains("o_proj"), e.getMessage());
        e = assertThrows(DefkvException.class, () -> Params.methodFromName("no-such"));
        assertEquals(Status.INVALID_ARGUMENT, e.status());
        e = assertThrows(DefkvException.class, () -> Tensor.ofFloats(new float[10], 3, 4));
        assertEquals(Status.INVALID_ARGUMENT, e.status());
        ctx.close(); ctx.close();
        e = assertThrows(DefkvException.class, () -> ctx.select(params(c, Params.SNAPKV), q, k, v, o));
        assertEquals(Status.INVALID_STATE, e.status());
    }

    @Test void compactionWritesIntoCallersDirectBuffers() throws Exception {
        St c = new St(dir().resolve("pub1-g4-L1024.case.safetensors"));
        Tensor q = c.tensor("layers.0.queries"), k = c.tensor("layers.0.keys"), v = c.tensor("layers.0.values"), o = c.tensor("layers.0.o_proj");
        float[] orig = new float[k.buffer().capacity() / 4]; k.buffer().asFloatBuffer().get(orig);
        try (Context ctx = new Context()) {
            Selection s = ctx.select(params(c, Params.DEFENSIVEKV), q, k, v, o);
            ctx.compactInPlace(q, k, v, o, s);
            FloatBuffer kb = k.buffer().asFloatBuffer();
            int L = (int) k.shape[1], d = (int) k.shape[2], moved = 0;
            for (int h = 0; h < k.shape[0]; h++) {
                int[] kept = s.kept(h);
                for (int j = 0; j < kept.length; j++) {
                    for (int x = 0; x < d; x++) assertEquals(orig[(h * L + kept[j]) * d + x], kb.get((h * L + j) * d + x));
                    if (kept[j] != j) moved++;
                }
            }
            assertTrue(moved > 0, "no row moved");
        }
    }

    /** A batch of three sequences (pub4's three layers, same H/Hk/W/d): each sequence's part of the
     *  selection must equal that layer's golden result, for the methods that need no o_proj. */
    @Test void batchOfSequencesMatchesGoldenPerSequence() throws Exception {
        St c = new St(dir().resolve("pub4-3layer-L512.case.safetensors"));
        Sequence[] seqs = new Sequence[3];
        for (int i = 0; i < 3; i++)
            seqs[i] = Sequence.ofQueries(c.tensor("layers." + i + ".queries"), c.tensor("layers." + i + ".keys"), c.tensor("layers." + i + ".values"));
        int hk = 2, L = 512, checked = 0;
        try (Context ctx = new Context()) {
            for (String mn : new String[] {"snapkv", "ada-snapkv", "streamingllm", "knorm", "tova"}) {
                St e = new St(dir().resolve("pub4-3layer-L512." + mn + ".expected.safetensors"));
                Selection s = ctx.select(params(c, Params.methodFromName(mn)), seqs, null);
                assertEquals(3 * hk, s.headLens.length, mn);
                assertEquals(3 * hk * L, s.keepMask.length, mn);
                for (int i = 0; i < 3; i++) {
                    int[] lens = new int[hk]; e.bytes("layers." + i + ".head_lens").asIntBuffer().get(lens);
                    byte[] want = new byte[hk * L]; e.bytes("layers." + i + ".keep").get(want);
                    assertArrayEquals(lens, Arrays.copyOfRange(s.headLens, i * hk, (i + 1) * hk), mn + " seq " + i + " head_lens");
                    assertArrayEquals(want, Arrays.copyOfRange(s.keepMask, i * hk * L, (i + 1) * hk * L), mn + " seq " + i + " keep set");
                    checked++;
                }
            }
        }
        assertEquals(15, checked);
    }

    /** Keys/values [Hk, L, d] cut to their first n positions (a shorter sequence). */
    static Tensor prefix(Tensor t, int n) {
        int hk = (int) t.shape[0], L = (int) t.shape[1], d = (int) t.shape[2];
        FloatBuffer src = t.buffer().asFloatBuffer();
        ByteBuffer b = ByteBuffer.allocateDirect(4 * hk * n * d).order(ByteOrder.nativeOrder());
        for (int h = 0; h < hk; h++)
            for (int j = 0; j < n * d; j++) b.putFloat(4 * (h * n * d + j), src.get(h * L * d + j));
        return Tensor.of(b, Tensor.F32, hk, n, d);
    }

    /** A ragged batch (L = 512 and 400): each sequence selects as it does alone, and compaction
     *  moves the kept rows to the front of each sequence's own buffers. */
    @Test void raggedBatchSelectsAndCompactsPerSequence() throws Exception {
        St c = new St(dir().resolve("pub4-3layer-L512.case.safetensors"));
        Tensor q0 = c.tensor("layers.0.queries"), k0 = c.tensor("layers.0.keys"), v0 = c.tensor("layers.0.values");
        Tensor q1 = c.tensor("layers.1.queries"), k1 = prefix(c.tensor("layers.1.keys"), 400), v1 = prefix(c.tensor("layers.1.values"), 400);
        Tensor o = c.tensor("layers.0.o_proj");
        float[] orig1 = new float[k1.buffer().capacity() / 4]; k1.buffer().asFloatBuffer().get(orig1);
        try (Context ctx = new Context()) {
            Params p = params(c, Params.DEFENSIVEKV);
            Selection a = ctx.select(p, q0, k0, v0, o), b = ctx.select(p, q1, k1, v1, o);
            Sequence[] seqs = {Sequence.ofQueries(q0, k0, v0), Sequence.ofQueries(q1, k1, v1)};
            Selection s = ctx.select(p, seqs, o);
            assertEquals(2 * 512 + 2 * 400, s.keepMask.length);
            for (int h = 0; h < 2; h++) {
                assertArrayEquals(a.kept(h), s.kept(h), "seq 0 head " + h);
                assertArrayEquals(b.kept(h), s.kept(2 + h), "seq 1 head " + h);
            }
            ctx.compactInPlace(seqs, o, s);
            FloatBuffer kb = k1.buffer().asFloatBuffer();
            int d = 32, moved = 0;
            for (int h = 0; h < 2; h++) {
                int[] kept = s.kept(2 + h);
                for (int j = 0; j < kept.length; j++) {
                    for (int x = 0; x < d; x++) assertEquals(orig1[(h * 400 + kept[j]) * d + x], kb.get((h * 400 + j) * d + x));
                    if (kept[j] != j) moved++;
                }
            }
            assertTrue(moved > 0, "no row of sequence 1 moved");
            assertThrows(DefkvException.class, () -> ctx.select(p, new Sequence[0], o));
        }
    }

    @Test void createCompressCloseLoopDoesNotGrow() throws Exception {
        St c = new St(dir().resolve("pub2-g1-L300.case.safetensors"));
        Tensor q = c.tensor("layers.0.queries"), k = c.tensor("layers.0.keys"), v = c.tensor("layers.0.values"), o = c.tensor("layers.0.o_proj");
        Runnable round = () -> { try (Context ctx = new Context(1, 1)) { ctx.select(params(c, Params.DEFENSIVEKV), q, k, v, o); } };
        for (int i = 0; i < 20; i++) round.run();
        long before = rss();
        for (int i = 0; i < 300; i++) { round.run(); if (System.getenv("DEFKV_TEST_LEAK") != null) new Context(); }
        long after = rss();
        System.out.println("rss before " + before + " KiB, after " + after + " KiB");
        assertTrue(after - before < 16384, "rss grew " + (after - before) + " KiB");
    }
    static long rss() throws Exception {
        return Long.parseLong(Files.readString(Paths.get("/proc/self/statm")).trim().split("\\s+")[1]) * 4;
    }

    /** Big-endian buffers (the JVM's default order) are refused, naming the call and the fix. */
    @Test void nonNativeByteOrderIsRejected() {
        ByteOrder other = ByteOrder.nativeOrder() == ByteOrder.LITTLE_ENDIAN ? ByteOrder.BIG_ENDIAN : ByteOrder.LITTLE_ENDIAN;
        ByteBuffer b = ByteBuffer.allocateDirect(4 * 12).order(other);
        DefkvException e = assertThrows(DefkvException.class, () -> Tensor.of(b, Tensor.F32, 3, 4));
        assertEquals(Status.INVALID_ARGUMENT, e.status());
        assertTrue(e.getMessage().contains("Tensor.of: ") && e.getMessage().contains("nativeOrder"), e.getMessage());
        e = assertThrows(DefkvException.class, () -> Tensor.strided(b, Tensor.F32, new long[] {3, 4}, new long[] {4, 1}));
        assertTrue(e.getMessage().contains("Tensor.strided: "), e.getMessage());
    }

    /** Errors name the Java method called, not the C function the binding used inside. */
    @Test void errorsNameTheCalledMethod() throws Exception {
        St c = new St(dir().resolve("pub2-g1-L300.case.safetensors"));
        Tensor q = c.tensor("layers.0.queries"), k = c.tensor("layers.0.keys"), v = c.tensor("layers.0.values"), o = c.tensor("layers.0.o_proj");
        try (Context ctx = new Context()) {
            DefkvException e = assertThrows(DefkvException.class, () -> ctx.select(params(c, Params.SNAPKV).compressionRatio(1.5), q, k, v, o));
            assertTrue(e.getMessage().contains("Context.select: ") && !e.getMessage().contains("defkv_kept_count"), e.getMessage());
            e = assertThrows(DefkvException.class, () -> ctx.compactInPlace(q, k, v, o, null));
            assertTrue(e.getMessage().contains("Context.compactInPlace: "), e.getMessage());
        }
    }

    /** Every field of defkv_params can be set and read back. */
    @Test void paramsExposeEveryField() {
        Params p = new Params(Params.RANDOM).compressionRatio(0.3).budget(77).window(8).kernel(3).scale(0.25f).nSink(2)
            .alphaSafeguard(0.1).firstStageRatio(0.4).epsilon(1e-3).massThreshold(0.8).windowBias(Params.WINDOW_BIAS_WINDOW)
            .nonfinite(Params.NONFINITE_LOWEST).seed(-1L);
        assertEquals(Params.RANDOM, p.method()); assertEquals(0.3, p.compressionRatio()); assertEquals(77, p.budget());
        assertEquals(8, p.window()); assertEquals(3, p.kernel()); assertEquals(0.25f, p.scale()); assertEquals(2, p.nSink());
        assertEquals(0.1, p.alphaSafeguard()); assertEquals(0.4, p.firstStageRatio()); assertEquals(1e-3, p.epsilon());
        assertEquals(0.8, p.massThreshold()); assertEquals(Params.WINDOW_BIAS_WINDOW, p.windowBias());
        assertEquals(Params.NONFINITE_LOWEST, p.nonfinite()); assertEquals(-1L, p.seed());
    }

    /** A preallocated head-major cache [Hk, Lmax, d] holding L tokens, and a token-major
     *  [L, Hk, d] cache, both viewed through strides: they select what the contiguous cache selects. */
    @Test void stridedViewsSelectLikeContiguous() throws Exception {
        St c = new St(dir().resolve("pub2-g1-L300.case.safetensors"));
        Tensor q = c.tensor("layers.0.queries"), k = c.tensor("layers.0.keys"), v = c.tensor("layers.0.values"), o = c.tensor("layers.0.o_proj");
        int hk = (int) k.shape[0], L = (int) k.shape[1], d = (int) k.shape[2], lmax = L + 37;
        try (Context ctx = new Context()) {
            Params p = params(c, Params.DEFENSIVEKV);
            Selection want = ctx.select(p, q, k, v, o);
            ByteBuffer bk = ByteBuffer.allocateDirect(4 * hk * lmax * d).order(ByteOrder.nativeOrder());
            ByteBuffer bv = ByteBuffer.allocateDirect(4 * hk * lmax * d).order(ByteOrder.nativeOrder());
            ByteBuffer tk = ByteBuffer.allocateDirect(4 * hk * L * d).order(ByteOrder.nativeOrder());
            ByteBuffer tv = ByteBuffer.allocateDirect(4 * hk * L * d).order(ByteOrder.nativeOrder());
            FloatBuffer sk = k.buffer().asFloatBuffer(), sv = v.buffer().asFloatBuffer();
            for (int i = 0; i < hk * lmax * d; i++) { bk.putFloat(4 * i, Float.NaN); bv.putFloat(4 * i, Float.NaN); }
            for (int h = 0; h < hk; h++)
                for (int j = 0; j < L; j++)
                    for (int e = 0; e < d; e++) {
                        int src = (h * L + j) * d + e;
                        bk.putFloat(4 * ((h * lmax + j) * d + e), sk.get(src)); bv.putFloat(4 * ((h * lmax + j) * d + e), sv.get(src));
                        tk.putFloat(4 * ((j * hk + h) * d + e), sk.get(src)); tv.putFloat(4 * ((j * hk + h) * d + e), sv.get(src));
                    }
            long[] shape = {hk, L, d};
            Selection cap = ctx.select(p, q, Tensor.strided(bk, Tensor.F32, shape, new long[] {(long) lmax * d, d, 1}),
                Tensor.strided(bv, Tensor.F32, shape, new long[] {(long) lmax * d, d, 1}), o);
            Selection tok = ctx.select(p, q, Tensor.strided(tk, Tensor.F32, shape, new long[] {d, (long) hk * d, 1}),
                Tensor.strided(tv, Tensor.F32, shape, new long[] {d, (long) hk * d, 1}), o);
            assertTrue(want.indices.length > 0);
            assertArrayEquals(want.indices, cap.indices);
            assertArrayEquals(want.indices, tok.indices);
            ByteBuffer small = bk.slice(0, 4 * (hk * lmax * d - (lmax - L) * d) - 4).order(ByteOrder.nativeOrder());
            DefkvException e = assertThrows(DefkvException.class,
                () -> Tensor.strided(small, Tensor.F32, shape, new long[] {(long) lmax * d, d, 1}));
            assertTrue(e.getMessage().contains("reaches byte"), e.getMessage());
        }
    }
}
