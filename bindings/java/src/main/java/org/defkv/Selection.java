package org.defkv;

/** What a selection keeps (per-head arrays sequence-major; per-entry arrays [Hk, L_b] blocks). */
public final class Selection {
    public final int[] headLens, cuSeqlens, indices;
    public final byte[] keepMask;
    public final float[] scores;
    Selection(int[] headLens, int[] cuSeqlens, int[] indices, byte[] keepMask, float[] scores) {
        this.headLens = headLens; this.cuSeqlens = cuSeqlens; this.indices = indices;
        this.keepMask = keepMask; this.scores = scores;
    }
    /** Kept token positions of head h. */
    public int[] kept(int h) { return java.util.Arrays.copyOfRange(indices, cuSeqlens[h], cuSeqlens[h + 1]); }
}
