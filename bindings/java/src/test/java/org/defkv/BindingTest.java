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
}
