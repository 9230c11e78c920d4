package org.defkv;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import org.defkv.internal.*;

/**
 * A libdefkv context (CPU backend by default). One thread at a time; close() frees it
 * (idempotent). Layers are single-sequence here: queries [H,W,d], keys/values [Hk,L,d]
 * (direct buffers, written in place by compactInPlace), oProj [D,H*d] or null.
 */
public final class Context implements AutoCloseable {
    static {
        System.loadLibrary("defkv_jni");
    }
    private SWIGTYPE_p_defkv_context ctx;

    public Context() { this(1, 0); }
    public Context(int backend, int threads) {
        synchronized (Context.class) {
            ctx = DefkvNative.defkvb_context_create(backend, threads, -1);
            if (ctx == null) throw new DefkvException(DefkvNative.defkvb_last_create_status(), DefkvNative.defkv_last_error_global());
        }
    }
    public static String version() { return DefkvNative.defkv_version_string(); }

    @Override public synchronized void close() {
        if (ctx != null) { DefkvNative.defkv_context_destroy(ctx); ctx = null; }
    }
    private void open() { if (ctx == null) throw new DefkvException(Status.INVALID_STATE, "the context is closed"); }
    private DefkvException err(StatusException e) { return new DefkvException(e.status, DefkvNative.defkv_context_last_error(ctx)); }

    private static void set(SWIGTYPE_p_defkvb_layer l, int which, Tensor t) {
        if (t == null) return;
        long[] s = new long[4];
        System.arraycopy(t.shape, 0, s, 0, t.shape.length);
        DefkvNative.defkvb_layer_set_tensor(l, 0, which, DefkvNative.defkvb_buffer_address(t.buffer), t.dtype,
            t.shape.length, s[0], s[1], s[2], s[3], 0, 0, 0, 0, 0, 0);
    }
    static SWIGTYPE_p_defkvb_layer layer(Tensor q, Tensor k, Tensor v, Tensor o) {
        SWIGTYPE_p_defkvb_layer l = DefkvNative.defkvb_layer_new(1);
        set(l, 0, q); set(l, 2, k); set(l, 3, v); set(l, 4, o);
        return l;
    }
    private static ByteBuffer direct(long bytes) {
        return ByteBuffer.allocateDirect((int) Math.max(bytes, 4)).order(ByteOrder.nativeOrder());
    }
    static final class Out {
        final ByteBuffer lens, cu, idx, mask, scores; final int heads, entries; final long cap;
        Out(int heads, int entries, long cap) {
            this.heads = heads; this.entries = entries; this.cap = cap;
            lens = direct(4L * heads); cu = direct(4L * (heads + 1)); idx = direct(4 * cap);
            mask = direct(entries); scores = direct(4L * entries);
        }
        SWIGTYPE_p_defkv_selection raw() {
            return DefkvNative.defkvb_selection_new(DefkvNative.defkvb_buffer_address(lens), DefkvNative.defkvb_buffer_address(cu),
                DefkvNative.defkvb_buffer_address(idx), cap, DefkvNative.defkvb_buffer_address(mask), DefkvNative.defkvb_buffer_address(scores));
        }
        Selection get() {
            int[] l = new int[heads], c = new int[heads + 1];
            lens.asIntBuffer().get(l); cu.asIntBuffer().get(c);
            int[] i = new int[c[heads]]; idx.asIntBuffer().get(i);
            byte[] m = new byte[entries]; mask.get(0, m);
            float[] s = new float[entries]; scores.asFloatBuffer().get(s);
            return new Selection(l, c, i, m, s);
        }
    }

    /** Scores one layer and selects the entries to keep. */
    public synchronized Selection select(Params p, Tensor q, Tensor k, Tensor v, Tensor o) {
        open();
        SWIGTYPE_p_defkvb_layer l = layer(q, k, v, o);
        try {
            long n = DefkvNative.defkvb_kept_count(ctx, p.raw, l);
            if (n < 0) throw new DefkvException((int) n, DefkvNative.defkv_context_last_error(ctx));
            Out out = new Out((int) k.shape[0], (int) (k.shape[0] * k.shape[1]), n);
            SWIGTYPE_p_defkv_selection s = out.raw();
            try { DefkvNative.defkvb_select(ctx, p.raw, l, s); } catch (StatusException e) { throw err(e); }
            finally { DefkvNative.defkvb_selection_free(s); }
            return out.get();
        } finally {
            DefkvNative.defkvb_layer_free(l);
            java.lang.ref.Reference.reachabilityFence(q); java.lang.ref.Reference.reachabilityFence(k);
            java.lang.ref.Reference.reachabilityFence(v); java.lang.ref.Reference.reachabilityFence(o);
        }
    }

    /** Moves each head's kept entries to the front of its rows of k and v, in the caller's buffers. */
    public synchronized void compactInPlace(Tensor q, Tensor k, Tensor v, Tensor o, Selection sel) {
        open();
        SWIGTYPE_p_defkvb_layer l = layer(q, k, v, o);
        ByteBuffer lens = direct(4L * sel.headLens.length), cu = direct(4L * sel.cuSeqlens.length), idx = direct(4L * sel.indices.length);
        lens.asIntBuffer().put(sel.headLens); cu.asIntBuffer().put(sel.cuSeqlens); idx.asIntBuffer().put(sel.indices);
        SWIGTYPE_p_defkv_selection s = DefkvNative.defkvb_selection_new(DefkvNative.defkvb_buffer_address(lens),
            DefkvNative.defkvb_buffer_address(cu), DefkvNative.defkvb_buffer_address(idx), sel.indices.length, 0, 0);
        try { DefkvNative.defkvb_compact_inplace(ctx, l, s); } catch (StatusException e) { throw err(e); }
        finally {
            DefkvNative.defkvb_selection_free(s); DefkvNative.defkvb_layer_free(l);
            java.lang.ref.Reference.reachabilityFence(k); java.lang.ref.Reference.reachabilityFence(v);
            java.lang.ref.Reference.reachabilityFence(lens); java.lang.ref.Reference.reachabilityFence(cu);
            java.lang.ref.Reference.reachabilityFence(idx);
        }
    }

    /** Layer-DefensiveKV over several layers: q/k/v/o[i] of layer i; returns each layer's selection. */
    public synchronized Selection[] selectGlobal(Params p, Tensor[] q, Tensor[] k, Tensor[] v, Tensor[] o) {
        open();
        SWIGTYPE_p_defkv_global g = DefkvNative.defkvb_global_create(ctx, p.raw, q.length);
        if (g == null) throw new DefkvException(DefkvNative.defkvb_last_create_status(), DefkvNative.defkv_context_last_error(ctx));
        try {
            for (int i = 0; i < q.length; i++) {
                SWIGTYPE_p_defkvb_layer l = layer(q[i], k[i], v[i], o[i]);
                try { DefkvNative.defkvb_global_add_layer(g, i, l); } catch (StatusException e) { throw err(e); }
                finally { DefkvNative.defkvb_layer_free(l); }
            }
            try { DefkvNative.defkv_global_select(g); } catch (StatusException e) { throw err(e); }
            Selection[] r = new Selection[q.length];
            for (int i = 0; i < q.length; i++) {
                long n = DefkvNative.defkvb_global_layer_kept_count(g, i);
                Out out = new Out((int) k[i].shape[0], (int) (k[i].shape[0] * k[i].shape[1]), n);
                SWIGTYPE_p_defkv_selection s = out.raw();
                try { DefkvNative.defkvb_global_layer_selection(g, i, s); } catch (StatusException e) { throw err(e); }
                finally { DefkvNative.defkvb_selection_free(s); }
                r[i] = out.get();
            }
            return r;
        } finally {
            DefkvNative.defkv_global_destroy(g);
            java.lang.ref.Reference.reachabilityFence(q); java.lang.ref.Reference.reachabilityFence(k);
            java.lang.ref.Reference.reachabilityFence(v); java.lang.ref.Reference.reachabilityFence(o);
        }
    }
}
