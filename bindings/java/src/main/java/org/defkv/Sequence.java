package org.defkv;

/**
 * One sequence of a (possibly ragged) batch, for one layer: queries [H, W, d] (or, instead,
 * attention [H, W, L] window attention probabilities), keys and values [Hk, L, d]. L may differ
 * between the sequences of a layer; H, Hk, W and d may not. The tensors are views, not copies.
 * A layer whose cache is paged ({@link PagedKv}) has sequences of queries (or attention) only.
 */
public final class Sequence {
    final Tensor queries, attention, keys, values;
    private Sequence(Tensor queries, Tensor attention) {
        if (queries == null && attention == null) throw new DefkvException(Status.INVALID_ARGUMENT, "queries or attention is required");
        this.queries = queries; this.attention = attention; this.keys = null; this.values = null;
    }
    private Sequence(Tensor queries, Tensor attention, Tensor keys, Tensor values) {
        if (keys == null || values == null) throw new DefkvException(Status.INVALID_ARGUMENT, "keys and values are required");
        if (keys.shape.length != 3) throw new DefkvException(Status.INVALID_ARGUMENT, "keys must be [Hk, L, d]");
        this.queries = queries; this.attention = attention; this.keys = keys; this.values = values;
    }
    /** A sequence scored from its queries [H, W, d]. */
    public static Sequence ofQueries(Tensor queries, Tensor keys, Tensor values) { return new Sequence(queries, null, keys, values); }
    /** A sequence scored from precomputed window attention [H, W, L]. */
    public static Sequence ofAttention(Tensor attention, Tensor keys, Tensor values) { return new Sequence(null, attention, keys, values); }
    /** A sequence of a paged layer, scored from its queries [H, W, d]. */
    public static Sequence ofQueries(Tensor queries) { return new Sequence(queries, null); }
    /** A sequence of a paged layer, scored from precomputed window attention [H, W, L]. */
    public static Sequence ofAttention(Tensor attention) { return new Sequence(null, attention); }
    int kvHeads() { return keys == null ? 0 : (int) keys.shape[0]; }
    long length() { return keys == null ? 0 : keys.shape[1]; }
}
