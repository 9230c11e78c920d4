package org.defkv;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import org.defkv.internal.*;

/**
 * Decode-time eviction over the caches of a model's layers (defkv_stream), from
 * {@link Context#stream}. The engine writes each new token's K/V at row {@code headLens(layer)[k]}
 * of every head, calls {@link #append} and {@link #pushQueries}, and runs {@link #round} when
 * {@link #due}. Calls hold the context's lock. close() frees the stream (idempotent); closing the
 * context closes its streams, whose later calls throw INVALID_STATE.
 */
public final class Stream implements AutoCloseable {
    private final Context ctx;
    private SWIGTYPE_p_defkv_stream raw; // guarded by ctx
    private final int layers, hk;
    private final long capacity;

    Stream(Context ctx, SWIGTYPE_p_defkv_stream raw, int layers, int hk, long capacity) {
        this.ctx = ctx; this.raw = raw; this.layers = layers; this.hk = hk; this.capacity = capacity;
    }

    @Override public void close() {
        synchronized (ctx) { closeLocked(); ctx.streams.remove(this); }
    }
    /** With ctx's lock held. */
    void closeLocked() {
        if (raw != null) { DefkvNative.defkv_stream_destroy(raw); raw = null; }
    }
    private void open() {
        if (raw == null || ctx.handle() == null) throw new DefkvException(Status.INVALID_STATE, "the stream is closed (or its context is)");
    }

    /** Registers n new entries the engine wrote after the last live row of every head of layer. */
    public void append(int layer, int n) {
        synchronized (ctx) {
            open();
            try { DefkvNative.defkv_stream_append(raw, layer, n); } catch (StatusException e) { throw ctx.err("Stream.append", e.status); }
        }
    }

    /** Pushes the post-rotary queries [H, n, d] of the newest n steps of layer (the stream keeps the last window). */
    public void pushQueries(int layer, Tensor q) {
        synchronized (ctx) {
            open();
            if (q == null) throw new DefkvException(Status.INVALID_ARGUMENT, "Stream.pushQueries: q is null");
            long[] s = new long[4], st = new long[4];
            System.arraycopy(q.shape, 0, s, 0, q.shape.length);
            System.arraycopy(q.strides, 0, st, 0, q.strides.length);
            try {
                DefkvNative.defkvb_stream_push_queries(raw, layer, DefkvNative.defkvb_buffer_address(q.buffer), q.dtype, q.shape.length,
                    s[0], s[1], s[2], s[3], st[0], st[1], st[2], st[3], 0, 0);
            } catch (StatusException e) {
                throw ctx.err("Stream.pushQueries", e.status);
            } finally {
                java.lang.ref.Reference.reachabilityFence(q);
            }
        }
    }

    /** Whether a round is due: interval steps pushed to some layer since the last round, or a head above budget + slack. */
    public boolean due() {
        synchronized (ctx) {
            open();
            int v = DefkvNative.defkvb_stream_due(raw);
            if (v < 0) throw ctx.err("Stream.due", v);
            return v != 0;
        }
    }

    /** The live entries of each KV head of layer: where each head's next token goes. */
    public int[] headLens(int layer) {
        synchronized (ctx) {
            open();
            ByteBuffer b = direct(4L * hk);
            try { DefkvNative.defkvb_stream_head_lens(raw, layer, DefkvNative.defkvb_buffer_address(b)); }
            catch (StatusException e) { throw ctx.err("Stream.headLens", e.status); }
            int[] r = new int[hk];
            b.asIntBuffer().get(r);
            return r;
        }
    }

    /**
     * Runs a round over every layer (caches: one per layer): scores, selects and compacts the
     * caches in place. Rows past a head's new length are left as they were; a paged cache's pages
     * past ceil(headLen / pageSize) are no longer used. Errors leave the stream and caches unchanged.
     */
    public void round(StreamCache[] caches) { round("Stream.round", caches, false); }

    /**
     * round(), also returning each layer's selection: headLens and cuSeqlens per KV head, indices
     * the kept rows (of the live entries before the round), keepMask and scores [Hk, capacity].
     */
    public Selection[] roundSelections(StreamCache[] caches) { return round("Stream.roundSelections", caches, true); }

    private Selection[] round(String fn, StreamCache[] caches, boolean want) {
        synchronized (ctx) {
            open();
            if (caches == null || caches.length != layers)
                throw new DefkvException(Status.INVALID_ARGUMENT, fn + ": " + (caches == null ? 0 : caches.length)
                    + " caches, expected one per layer (" + layers + ")");
            SWIGTYPE_p_defkvb_stream_caches rc = DefkvNative.defkvb_stream_caches_new(layers);
            if (rc == null) throw new DefkvException(Status.OUT_OF_MEMORY, fn + ": could not allocate the caches' description");
            PagedKv.Native[] paged = new PagedKv.Native[layers];
            try {
                for (int l = 0; l < layers; l++) {
                    StreamCache c = caches[l];
                    if (c == null) throw new DefkvException(Status.INVALID_ARGUMENT, fn + ": caches[" + l + "] is null");
                    set(rc, l, 0, c.keys); set(rc, l, 1, c.values); set(rc, l, 2, c.oProj);
                    if (c.paged != null) {
                        paged[l] = c.paged.new Native(fn, "caches[" + l + "].paged", c.paged.layout == PagedKv.HEAD ? hk : 1, -1);
                        DefkvNative.defkvb_stream_caches_set_paged(rc, l, paged[l].raw);
                    }
                }
                if (!want) {
                    try { DefkvNative.defkvb_stream_round(raw, rc, layers, hk, capacity, 0, 0, 0, 0, 0); }
                    catch (StatusException e) { throw ctx.err(fn, e.status); }
                    return null;
                }
                long per = hk * capacity;
                ByteBuffer lens = direct(4L * layers * hk), cu = direct(4L * layers * (hk + 1)), idx = direct(4 * layers * per),
                    mask = direct(layers * per), scores = direct(4 * layers * per);
                try {
                    DefkvNative.defkvb_stream_round(raw, rc, layers, hk, capacity, DefkvNative.defkvb_buffer_address(lens),
                        DefkvNative.defkvb_buffer_address(cu), DefkvNative.defkvb_buffer_address(idx),
                        DefkvNative.defkvb_buffer_address(mask), DefkvNative.defkvb_buffer_address(scores));
                } catch (StatusException e) {
                    throw ctx.err(fn, e.status);
                }
                Selection[] r = new Selection[layers];
                for (int l = 0; l < layers; l++) {
                    int[] hl = new int[hk], c = new int[hk + 1];
                    lens.asIntBuffer().get(l * hk, hl); cu.asIntBuffer().get(l * (hk + 1), c);
                    int[] i = new int[c[hk]]; idx.asIntBuffer().get((int) (l * per), i);
                    byte[] m = new byte[(int) per]; mask.get((int) (l * per), m);
                    float[] s = new float[(int) per]; scores.asFloatBuffer().get((int) (l * per), s);
                    r[l] = new Selection(hl, c, i, m, s);
                }
                return r;
            } finally {
                for (PagedKv.Native p : paged) if (p != null) p.close();
                DefkvNative.defkvb_stream_caches_free(rc);
                java.lang.ref.Reference.reachabilityFence(caches);
            }
        }
    }

    private static void set(SWIGTYPE_p_defkvb_stream_caches rc, int layer, int which, Tensor t) {
        if (t == null) return;
        long[] s = new long[4], st = new long[4];
        System.arraycopy(t.shape, 0, s, 0, t.shape.length);
        System.arraycopy(t.strides, 0, st, 0, t.strides.length);
        DefkvNative.defkvb_stream_caches_set_tensor(rc, layer, which, DefkvNative.defkvb_buffer_address(t.buffer), t.dtype,
            t.shape.length, s[0], s[1], s[2], s[3], st[0], st[1], st[2], st[3], 0, 0);
    }
    private static ByteBuffer direct(long bytes) {
        return ByteBuffer.allocateDirect((int) Math.max(bytes, 4)).order(ByteOrder.nativeOrder());
    }
}
