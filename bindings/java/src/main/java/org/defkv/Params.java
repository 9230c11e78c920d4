package org.defkv;

/** Compression parameters, starting from the library's defaults (every field of defkv_params). */
public final class Params {
    public static final int SNAPKV = 0, ADA_SNAPKV = 1, CRITICALKV = 2, ADA_CRITICALKV = 3, DEFENSIVEKV = 4,
        LAYER_DEFENSIVEKV = 5, STREAMINGLLM = 6, KNORM = 7, TOVA = 8, RANDOM = 9;
    /** windowBias values: the official code's measurement (default), the paper's intent. */
    public static final int WINDOW_BIAS_OFFICIAL = 0, WINDOW_BIAS_WINDOW = 1;
    /** nonfinite values: reject NaN/Inf (default), rank such cache entries lowest. */
    public static final int NONFINITE_REJECT = 0, NONFINITE_LOWEST = 1;
    final org.defkv.internal.defkv_params raw = new org.defkv.internal.defkv_params();
    public Params(int method) { raw.setMethod(method); }
    public static int methodFromName(String name) {
        int m = org.defkv.internal.DefkvNative.defkvb_method_from_name(name);
        if (m < 0) throw new DefkvException(m, "Params.methodFromName: unknown method name \"" + name + "\"");
        return m;
    }
    /** Fraction evicted, in [0, 1). */
    public Params compressionRatio(double r) { raw.setCompression_ratio(r); return this; }
    /** Absolute per-head budget (0: use the ratio). */
    public Params budget(long n) { raw.setBudget(n); return this; }
    /** Observation window W. */
    public Params window(int w) { raw.setWindow(w); return this; }
    /** Pooling kernel (odd). */
    public Params kernel(int k) { raw.setKernel(k); return this; }
    /** Softmax scale (0: 1/sqrt(d)). */
    public Params scale(float s) { raw.setScale(s); return this; }
    /** StreamingLLM sink tokens. */
    public Params nSink(int n) { raw.setN_sink(n); return this; }
    /** AdaKV safeguard fraction. */
    public Params alphaSafeguard(double a) { raw.setAlpha_safeguard(a); return this; }
    /** CriticalKV stage-1 fraction. */
    public Params firstStageRatio(double r) { raw.setFirst_stage_ratio(r); return this; }
    /** CriticalKV epsilon. */
    public Params epsilon(double e) { raw.setEpsilon(e); return this; }
    /** DefensiveKV base mass threshold. */
    public Params massThreshold(double t) { raw.setMass_threshold(t); return this; }
    /** WINDOW_BIAS_OFFICIAL or WINDOW_BIAS_WINDOW. */
    public Params windowBias(int b) { raw.setWindow_bias(b); return this; }
    /** NONFINITE_REJECT or NONFINITE_LOWEST. */
    public Params nonfinite(int p) { raw.setNonfinite(p); return this; }
    /** Random method seed (all 64 bits, read as unsigned). */
    public Params seed(long s) { raw.setSeed(new java.math.BigInteger(Long.toUnsignedString(s))); return this; }

    public int method() { return raw.getMethod(); }
    public double compressionRatio() { return raw.getCompression_ratio(); }
    public long budget() { return raw.getBudget(); }
    public int window() { return raw.getWindow(); }
    public int kernel() { return raw.getKernel(); }
    public float scale() { return raw.getScale(); }
    public int nSink() { return raw.getN_sink(); }
    public double alphaSafeguard() { return raw.getAlpha_safeguard(); }
    public double firstStageRatio() { return raw.getFirst_stage_ratio(); }
    public double epsilon() { return raw.getEpsilon(); }
    public double massThreshold() { return raw.getMass_threshold(); }
    public int windowBias() { return raw.getWindow_bias(); }
    public int nonfinite() { return raw.getNonfinite(); }
    public long seed() { return raw.getSeed().longValue(); }
}
