package org.defkv;

/** Compression parameters, starting from the library's defaults. */
public final class Params {
    public static final int SNAPKV = 0, ADA_SNAPKV = 1, CRITICALKV = 2, ADA_CRITICALKV = 3, DEFENSIVEKV = 4,
        LAYER_DEFENSIVEKV = 5, STREAMINGLLM = 6, KNORM = 7, TOVA = 8, RANDOM = 9;
    final org.defkv.internal.defkv_params raw = new org.defkv.internal.defkv_params();
    public Params(int method) { raw.setMethod(method); }
    public static int methodFromName(String name) {
        int m = org.defkv.internal.DefkvNative.defkvb_method_from_name(name);
        if (m < 0) throw new DefkvException(m, "unknown method name \"" + name + "\"");
        return m;
    }
    public Params compressionRatio(double r) { raw.setCompression_ratio(r); return this; }
    public Params budget(long n) { raw.setBudget(n); return this; }
    public Params window(int w) { raw.setWindow(w); return this; }
    public Params kernel(int k) { raw.setKernel(k); return this; }
    public Params seed(long s) { raw.setSeed(java.math.BigInteger.valueOf(s)); return this; }
    public int method() { return raw.getMethod(); }
}
