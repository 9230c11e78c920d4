// A program outside the defkv repository using the installed jar (which loads its own native
// library): compresses a golden case with DefensiveKV and checks the kept entries against the
// expected file. Usage: java -cp defkv.jar:. Consumer CASE.safetensors EXPECTED.safetensors
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.util.Arrays;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.defkv.Context;
import org.defkv.Params;
import org.defkv.Selection;
import org.defkv.Tensor;

public class Consumer {
    /** The few fields of a safetensors file this program needs. */
    static final class File {
        final String header; final ByteBuffer data;
        File(String path) throws Exception {
            ByteBuffer b = ByteBuffer.wrap(Files.readAllBytes(Paths.get(path))).order(ByteOrder.LITTLE_ENDIAN);
            int n = (int) b.getLong(0);
            header = new String(b.array(), 8, n, "UTF-8");
            data = b.slice(8 + n, b.capacity() - 8 - n).order(ByteOrder.LITTLE_ENDIAN);
        }
        Matcher entry(String name) {
            Matcher m = Pattern.compile("\"" + Pattern.quote(name) + "\":\\s*\\{\"dtype\":\\s*\"\\w+\",\\s*\"shape\":\\s*\\[([^\\]]*)\\],"
                + "\\s*\"data_offsets\":\\s*\\[(\\d+),\\s*(\\d+)\\]").matcher(header);
            if (!m.find()) throw new IllegalArgumentException("no tensor " + name);
            return m;
        }
        long[] shape(String name) {
            return Arrays.stream(entry(name).group(1).split(",")).map(String::trim).mapToLong(Long::parseLong).toArray();
        }
        ByteBuffer bytes(String name) {
            Matcher m = entry(name);
            int a = Integer.parseInt(m.group(2)), b = Integer.parseInt(m.group(3));
            return data.slice(a, b - a).order(ByteOrder.LITTLE_ENDIAN);
        }
        /** A direct buffer in native order (what the library reads) holding the tensor. */
        Tensor tensor(String name) {
            ByteBuffer src = bytes(name);
            ByteBuffer d = ByteBuffer.allocateDirect(src.capacity()).order(ByteOrder.nativeOrder());
            d.asFloatBuffer().put(src.asFloatBuffer());
            return Tensor.of(d, Tensor.F32, shape(name));
        }
        String meta(String key) {
            Matcher m = Pattern.compile("\"" + key + "\":\\s*\"([^\"]*)\"").matcher(header);
            if (!m.find()) throw new IllegalArgumentException("no metadata " + key);
            return m.group(1);
        }
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 2) { System.err.println("usage: Consumer CASE.safetensors EXPECTED.safetensors"); System.exit(2); }
        File c = new File(args[0]), exp = new File(args[1]);
        Tensor q = c.tensor("layers.0.queries"), k = c.tensor("layers.0.keys"), v = c.tensor("layers.0.values"), o = c.tensor("layers.0.o_proj");
        Params p = new Params(Params.DEFENSIVEKV).compressionRatio(Double.parseDouble(c.meta("compression_ratio")))
            .window(Integer.parseInt(c.meta("window"))).kernel(Integer.parseInt(c.meta("kernel")));
        try (Context ctx = new Context()) {
            Selection sel = ctx.select(p, q, k, v, o);
            ByteBuffer keep = exp.bytes("layers.0.keep"), lens = exp.bytes("layers.0.head_lens");
            int diff = keep.capacity() == sel.keepMask.length ? 0 : 1;
            for (int i = 0; i < Math.min(keep.capacity(), sel.keepMask.length); i++) if (keep.get(i) != sel.keepMask[i]) diff++;
            for (int h = 0; h < sel.headLens.length; h++) if (lens.getInt(4 * h) != sel.headLens[h]) diff++;
            if (diff != 0) { System.err.println("java consumer: " + diff + " entries differ from " + args[1]); System.exit(1); }
            ctx.compactInPlace(q, k, v, o, sel);
            System.out.println("java consumer: defkv " + Context.version() + ": " + sel.indices.length + " kept entries over "
                + sel.headLens.length + " heads match the expected file");
        }
    }
}
