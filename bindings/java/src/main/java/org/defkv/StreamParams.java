package org.defkv;

/**
 * Parameters of a {@link Stream} (defkv_stream_params), starting from the library's defaults
 * (1 layer, interval 128, aggregation MAX, decay 0.9); the shape, capacity and budget must be set.
 */
public final class StreamParams {
    /** Aggregation across rounds: the current round's score only (kvpress DecodingPress). */
    public static final int LATEST = 0;
    /** Aggregation: the running maximum over every round that scored the entry (default). */
    public static final int MAX = 1;
    /** Aggregation: r = max(decay * r, s), a maximum that fades. */
    public static final int MAX_DECAY = 2;
    final org.defkv.internal.defkv_stream_params raw = new org.defkv.internal.defkv_stream_params();

    public StreamParams() {}
    /** Layers, H, Hk and d of the model. */
    public StreamParams shape(int nLayers, int nHeads, int nKvHeads, int headDim) {
        raw.setN_layers(nLayers); raw.setN_heads(nHeads); raw.setN_kv_heads(nKvHeads); raw.setHead_dim(headDim); return this;
    }
    /** Rows per head in each layer's cache; appending past it is an error. */
    public StreamParams capacity(int c) { raw.setCapacity(c); return this; }
    /** Steps between rounds (at least the window). */
    public StreamParams interval(int n) { raw.setInterval(n); return this; }
    /** LATEST, MAX or MAX_DECAY. */
    public StreamParams aggregation(int a) { raw.setAggregation(a); return this; }
    /** Entries kept per head after a round (at least window + nSink). */
    public StreamParams budget(long b) { raw.setBudget(b); return this; }
    /** A head above budget + slack makes a round due (0: the interval). */
    public StreamParams slack(long s) { raw.setSlack(s); return this; }
    /** MAX_DECAY factor in (0, 1]. */
    public StreamParams decay(float d) { raw.setDecay(d); return this; }

    public int nLayers() { return raw.getN_layers(); }
    public int nHeads() { return raw.getN_heads(); }
    public int nKvHeads() { return raw.getN_kv_heads(); }
    public int headDim() { return raw.getHead_dim(); }
    public int capacity() { return raw.getCapacity(); }
    public int interval() { return raw.getInterval(); }
    public int aggregation() { return raw.getAggregation(); }
    public long budget() { return raw.getBudget(); }
    public long slack() { return raw.getSlack(); }
    public float decay() { return raw.getDecay(); }
}
