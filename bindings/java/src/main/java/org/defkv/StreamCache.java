package org.defkv;

/**
 * One layer's cache in a {@link Stream#round} : keys and values [Hk, C, d] with C at least every
 * head's length (a [Hk, capacity, d] cache), or a {@link PagedKv} (its seqLens are not read:
 * the stream knows each head's length); oProj [D, H*d] for defensivekv and layer-defensivekv,
 * else null. The caches are compacted in place.
 */
public final class StreamCache {
    final Tensor keys, values, oProj;
    final PagedKv paged;
    private StreamCache(Tensor keys, Tensor values, PagedKv paged, Tensor oProj) {
        this.keys = keys; this.values = values; this.paged = paged; this.oProj = oProj;
    }
    /** A contiguous cache. */
    public static StreamCache of(Tensor keys, Tensor values, Tensor oProj) {
        if (keys == null || values == null) throw new DefkvException(Status.INVALID_ARGUMENT, "StreamCache.of: keys and values are required");
        return new StreamCache(keys, values, null, oProj);
    }
    /** A paged cache. */
    public static StreamCache paged(PagedKv paged, Tensor oProj) {
        if (paged == null) throw new DefkvException(Status.INVALID_ARGUMENT, "StreamCache.paged: paged is null");
        return new StreamCache(null, null, paged, oProj);
    }
}
