package org.defkv.examples;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.Arrays;
import java.util.HashMap;
import java.util.Map;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.defkv.Context;
import org.defkv.DefkvException;
import org.defkv.Params;
import org.defkv.Selection;
import org.defkv.Tensor;

/**
 * Compresses a golden conformance case and prints the kept entries per KV head.
 * Usage: CompressCase [CASE] [METHOD]   (default pub2-g1-L300 defensivekv); the cases are read
 * from $DEFKV_CONFORMANCE_DIR (default ../../tests/data/conformance).
 */
public final class CompressCase {
    public static void main(String[] args) {
        String name = args.length > 0 ? args[0] : "pub2-g1-L300";
        String method = args.length > 1 ? args[1] : "defensivekv";
        try {
            run(name, method);
        } catch (DefkvException e) {
            System.err.println("CompressCase: " + e.getMessage());
            System.exit(1);
        } catch (java.io.IOException | RuntimeException e) {
            System.err.println("CompressCase: " + e);
            System.exit(1);
        }
    }

    static void run(String name, String methodName) throws java.io.IOException {
        int method = Params.methodFromName(methodName);
        String dir = System.getenv("DEFKV_CONFORMANCE_DIR");
        CaseFile c = new CaseFile(Paths.get(dir != null ? dir : "../../tests/data/conformance", name + ".case.safetensors"));
        int n = Integer.parseInt(c.meta("n_layers"));
        Tensor[] q = new Tensor[n], k = new Tensor[n], v = new Tensor[n], o = new Tensor[n];
        for (int i = 0; i < n; i++) {
            q[i] = c.tensor("layers." + i + ".queries");
            k[i] = c.tensor("layers." + i + ".keys");
            v[i] = c.tensor("layers." + i + ".values");
            o[i] = c.tensor("layers." + i + ".o_proj");
        }
        Params p = new Params(method).compressionRatio(Double.parseDouble(c.meta("compression_ratio")))
            .window(Integer.parseInt(c.meta("window"))).kernel(Integer.parseInt(c.meta("kernel")));
        Selection[] sels = new Selection[n];
        try (Context ctx = new Context()) {
            if (method == Params.LAYER_DEFENSIVEKV) {
                sels = ctx.selectGlobal(p, q, k, v, o); // budget shared across the layers
            } else {
                for (int i = 0; i < n; i++) sels[i] = ctx.select(p, q[i], k[i], v[i], o[i]);
            }
        }
        System.out.println("defkv " + Context.version() + " " + name + " " + methodName);
        for (int i = 0; i < n; i++) {
            for (int h = 0; h < sels[i].headLens.length; h++) {
                int[] kept = sels[i].kept(h);
                System.out.println("layer " + i + " head " + h + ": kept " + kept.length + " entries, first "
                    + Arrays.toString(Arrays.copyOf(kept, Math.min(8, kept.length))));
            }
        }
    }

    /** Just enough of safetensors for the golden cases: flat header, F32 tensors, string metadata. */
    static final class CaseFile {
        private final Map<String, long[]> shapes = new HashMap<>();
        private final Map<String, long[]> offsets = new HashMap<>();
        private final Map<String, String> meta = new HashMap<>();
        private final ByteBuffer data;
        private final Path path;

        CaseFile(Path path) throws java.io.IOException {
            this.path = path;
            ByteBuffer b = ByteBuffer.wrap(Files.readAllBytes(path)).order(ByteOrder.LITTLE_ENDIAN);
            long hlen = b.capacity() >= 8 ? b.getLong(0) : -1;
            if (hlen < 2 || hlen > b.capacity() - 8) throw new java.io.IOException(path + ": not a safetensors file");
            String h = new String(b.array(), 8, (int) hlen, StandardCharsets.UTF_8);
            Matcher m = Pattern.compile("\"([^\"]+)\":\\s*\\{\"dtype\":\\s*\"F32\",\\s*\"shape\":\\s*\\[([^\\]]*)\\],"
                + "\\s*\"data_offsets\":\\s*\\[(\\d+),\\s*(\\d+)\\]").matcher(h);
            while (m.find()) {
                shapes.put(m.group(1), Arrays.stream(m.group(2).split(",")).map(String::trim)
                    .filter(s -> !s.isEmpty()).mapToLong(Long::parseLong).toArray());
                offsets.put(m.group(1), new long[] {Long.parseLong(m.group(3)), Long.parseLong(m.group(4))});
            }
            Matcher mm = Pattern.compile("\"(\\w+)\":\\s*\"([^\"]*)\"").matcher(h);
            while (mm.find()) meta.put(mm.group(1), mm.group(2));
            data = b.slice(8 + (int) hlen, b.capacity() - 8 - (int) hlen).order(ByteOrder.LITTLE_ENDIAN);
        }
        String meta(String key) {
            String s = meta.get(key);
            if (s == null) throw new IllegalArgumentException(path + ": no metadata \"" + key + "\"");
            return s;
        }
        /** The tensor copied into a direct buffer in native order (the library reads it in place). */
        Tensor tensor(String name) {
            long[] off = offsets.get(name);
            if (off == null) throw new IllegalArgumentException(path + ": no F32 tensor \"" + name + "\"");
            ByteBuffer src = data.slice((int) off[0], (int) (off[1] - off[0])).order(ByteOrder.LITTLE_ENDIAN);
            ByteBuffer dst = ByteBuffer.allocateDirect(src.capacity()).order(ByteOrder.nativeOrder());
            dst.asFloatBuffer().put(src.asFloatBuffer());
            return Tensor.of(dst, Tensor.F32, shapes.get(name));
        }
    }
}
