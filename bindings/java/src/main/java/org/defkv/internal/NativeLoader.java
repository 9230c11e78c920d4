package org.defkv.internal;

import java.io.IOException;
import java.io.InputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.nio.file.StandardCopyOption;

/**
 * Loads libdefkv_jni (internal). In order:
 * <ol>
 * <li>system property {@code defkv.lib.dir}: the directory holding libdefkv_jni.so (Maven's
 *     in-process test runs, which cannot change java.library.path);</li>
 * <li>the native libraries packed in the jar ({@code org/defkv/native/<os>-<arch>/}): libdefkv_jni
 *     and the libdefkv.so.0 it was built with, extracted to a private temporary directory (deleted
 *     at exit); libdefkv.so.0 is loaded first so the JNI library's dependency resolves to it;</li>
 * <li>{@code java.library.path} ({@code System.loadLibrary("defkv_jni")}).</li>
 * </ol>
 */
public final class NativeLoader {
    private NativeLoader() {}
    private static boolean loaded;

    /** The jar's resource directory of this platform's native libraries. */
    public static String resourceDir() {
        String os = System.getProperty("os.name", "").toLowerCase().replaceAll("[^a-z0-9]", "");
        String arch = System.getProperty("os.arch", "").toLowerCase().replaceAll("[^a-z0-9_]", "");
        return "org/defkv/native/" + os + "-" + arch + "/";
    }

    public static synchronized void load() {
        if (loaded) return;
        String dir = System.getProperty("defkv.lib.dir");
        String jni = System.mapLibraryName("defkv_jni");
        if (dir != null && !dir.isEmpty()) {
            Path lib = Paths.get(dir, jni).toAbsolutePath();
            if (!Files.isRegularFile(lib))
                throw new UnsatisfiedLinkError("defkv.lib.dir=" + dir + " has no " + lib.getFileName());
            System.load(lib.toString());
        } else if (NativeLoader.class.getClassLoader().getResource(resourceDir() + jni) != null) {
            loadFromJar(jni);
        } else {
            System.loadLibrary("defkv_jni");
        }
        loaded = true;
    }

    private static void loadFromJar(String jni) {
        try {
            Path tmp = Files.createTempDirectory("defkv-native-");
            tmp.toFile().deleteOnExit();
            Path core = extract("libdefkv.so.0", tmp);
            Path wrapper = extract(jni, tmp);
            if (core != null) System.load(core.toString());
            System.load(wrapper.toString());
        } catch (IOException e) {
            UnsatisfiedLinkError err = new UnsatisfiedLinkError("defkv: could not extract the native libraries from the jar: " + e);
            err.initCause(e);
            throw err;
        }
    }

    private static Path extract(String name, Path dir) throws IOException {
        try (InputStream in = NativeLoader.class.getClassLoader().getResourceAsStream(resourceDir() + name)) {
            if (in == null) return null;
            Path out = dir.resolve(name);
            Files.copy(in, out, StandardCopyOption.REPLACE_EXISTING);
            out.toFile().deleteOnExit();
            return out;
        }
    }
}
