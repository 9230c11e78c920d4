package org.defkv;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import org.defkv.internal.*;

/**
 * A libdefkv context (CPU backend by default). One thread at a time; close() frees it
 * (idempotent). A layer is one sequence (queries [H,W,d], keys/values [Hk,L,d]) or a ragged
 * batch of Sequence; tensors are direct buffers, keys/values written in place by compactInPlace;
 * oProj [D,H*d] or null.
 */
public final class Context implements AutoCloseable {
    private SWIGTYPE_p_defkv_context ctx;

    public Context() { this(1, 0); }
    public Context(int backend, int threads) {
        synchronized (Context.class) {
            ctx = DefkvNative.defkvb_context_create(backend, threads, -1);
            if (ctx == null) throw new DefkvException(DefkvNative.defkvb_last_create_status(),
                callerMessage("new Context", DefkvNative.defkv_last_error_global()));
        }
    }
    public static String version() { return DefkvNative.defkv_version_string(); }

    @Override public synchronized void close() {
        if (ctx != null) { DefkvNative.defkv_context_destroy(ctx); ctx = null; }
    }
    private void open() { if (ctx == null) throw new DefkvException(Status.INVALID_STATE, "the context is closed"); }
    /** The context's error, its message naming the Java method called (not the C function). */
    private DefkvException err(String fn, int status) {
        return new DefkvException(status, callerMessage(fn, DefkvNative.defkv_context_last_error(ctx)));
    }
    static String callerMessage(String fn, String msg) {
        int i = msg.indexOf(": ");
        if (msg.startsWith("defkv_") && i > 0 && msg.substring(0, i).indexOf(' ') < 0) msg = msg.substring(i + 2);
        return fn + ": " + msg;
    }

    private static void set(SWIGTYPE_p_defkvb_layer l, int seq, int which, Tensor t) {
        if (t == null) return;
        long[] s = new long[4];
        System.arraycopy(t.shape, 0, s, 0, t.shape.length);
        long[] st = new long[4];
        System.arraycopy(t.strides, 0, st, 0, t.strides.length);
        DefkvNative.defkvb_layer_set_tensor(l, seq, which, DefkvNative.defkvb_buffer_address(t.buffer), t.dtype,
            t.shape.length, s[0], s[1], s[2], s[3], st[0], st[1], st[2], st[3], 0, 0);
    }
    static SWIGTYPE_p_defkvb_layer layer(Sequence[] seqs, Tensor o) {
        if (seqs == null || seqs.length == 0) throw new DefkvException(Status.INVALID_ARGUMENT, "seqs must hold at least one sequence");
        for (int b = 0; b < seqs.length; b++)
            if (seqs[b] == null) throw new DefkvException(Status.INVALID_ARGUMENT, "seqs[" + b + "] is null");
        SWIGTYPE_p_defkvb_layer l = DefkvNative.defkvb_layer_new(seqs.length);
        for (int b = 0; b < seqs.length; b++) {
            set(l, b, 0, seqs[b].queries); set(l, b, 1, seqs[b].attention);
            set(l, b, 2, seqs[b].keys); set(l, b, 3, seqs[b].values);
        }
        set(l, 0, 4, o);
        return l;
    }
    private static Sequence[] one(Tensor q, Tensor k, Tensor v) { return new Sequence[] {Sequence.ofQueries(q, k, v)}; }
    /** Per-head and per-entry sizes of a selection of this batch. */
    private static Out out(Sequence[] seqs, long cap) {
        int heads = 0; long entries = 0;
        for (Sequence s : seqs) { heads += s.kvHeads(); entries += s.kvHeads() * s.length(); }
        return new Out(heads, (int) entries, cap);
    }
    /** The same for a paged batch (Hk of the pools, seqLens). */
    private static Out out(PagedKv paged, long cap) {
        int heads = 0; long entries = 0;
        for (int l : paged.seqLens) { heads += paged.kvHeads(); entries += (long) paged.kvHeads() * l; }
        return new Out(heads, (int) entries, cap);
    }
    /** A selection's arrays in direct buffers, for a compaction; close() frees the C view. */
    private static final class SelIn implements AutoCloseable {
        final ByteBuffer lens, cu, idx; final SWIGTYPE_p_defkv_selection raw;
        SelIn(String fn, Selection sel) {
            if (sel == null || sel.headLens.length == 0 || sel.cuSeqlens.length != sel.headLens.length + 1)
                throw new DefkvException(Status.INVALID_ARGUMENT, fn + ": sel must be a Selection returned by select or selectGlobal");
            lens = direct(4L * sel.headLens.length); cu = direct(4L * sel.cuSeqlens.length); idx = direct(4L * sel.indices.length);
            lens.asIntBuffer().put(sel.headLens); cu.asIntBuffer().put(sel.cuSeqlens); idx.asIntBuffer().put(sel.indices);
            raw = DefkvNative.defkvb_selection_new(DefkvNative.defkvb_buffer_address(lens), DefkvNative.defkvb_buffer_address(cu),
                DefkvNative.defkvb_buffer_address(idx), sel.indices.length, 0, 0);
        }
        @Override public void close() {
            DefkvNative.defkvb_selection_free(raw);
            java.lang.ref.Reference.reachabilityFence(lens); java.lang.ref.Reference.reachabilityFence(cu);
            java.lang.ref.Reference.reachabilityFence(idx);
        }
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

    /** Scores one single-sequence layer and selects the entries to keep. */
    public Selection select(Params p, Tensor q, Tensor k, Tensor v, Tensor o) { return select(p, one(q, k, v), o); }

    /**
     * Scores one layer of a (ragged) batch and selects the entries to keep. The selection's
     * per-head arrays are sequence-major (seqs[0]'s Hk heads first); per-entry arrays are
     * [Hk, L_b] blocks in sequence order.
     */
    public synchronized Selection select(Params p, Sequence[] seqs, Tensor o) {
        open();
        SWIGTYPE_p_defkvb_layer l = layer(seqs, o);
        try {
            long n = DefkvNative.defkvb_kept_count(ctx, p.raw, l);
            if (n < 0) throw err("Context.select", (int) n);
            Out out = out(seqs, n);
            SWIGTYPE_p_defkv_selection s = out.raw();
            try { DefkvNative.defkvb_select(ctx, p.raw, l, s); } catch (StatusException e) { throw err("Context.select", e.status); }
            finally { DefkvNative.defkvb_selection_free(s); }
            return out.get();
        } finally {
            DefkvNative.defkvb_layer_free(l);
            java.lang.ref.Reference.reachabilityFence(seqs); java.lang.ref.Reference.reachabilityFence(o);
        }
    }

    /** Scores one single-sequence layer whose cache is paged (queries [H, W, d], oProj or null). */
    public Selection select(Params p, Tensor q, Tensor o, PagedKv paged) {
        return select(p, new Sequence[] {Sequence.ofQueries(q)}, o, paged);
    }

    /**
     * Scores one layer of a batch whose cache is paged: seqs hold queries (or attention) only
     * ({@link Sequence#ofQueries(Tensor)}), paged the pools, block tables and one length per
     * sequence. The selection is laid out as for contiguous caches.
     */
    public synchronized Selection select(Params p, Sequence[] seqs, Tensor o, PagedKv paged) {
        open();
        if (paged == null) return select(p, seqs, o);
        SWIGTYPE_p_defkvb_layer l = layer(seqs, o);
        try (PagedKv.Native pn = paged.new Native("Context.select", "paged", seqs.length * paged.rowsPerSeq(), seqs.length)) {
            DefkvNative.defkvb_layer_set_paged(l, pn.raw);
            long n = DefkvNative.defkvb_kept_count(ctx, p.raw, l);
            if (n < 0) throw err("Context.select", (int) n);
            Out out = out(paged, n);
            SWIGTYPE_p_defkv_selection s = out.raw();
            try { DefkvNative.defkvb_select(ctx, p.raw, l, s); } catch (StatusException e) { throw err("Context.select", e.status); }
            finally { DefkvNative.defkvb_selection_free(s); }
            return out.get();
        } finally {
            DefkvNative.defkvb_layer_free(l);
            java.lang.ref.Reference.reachabilityFence(seqs); java.lang.ref.Reference.reachabilityFence(o);
        }
    }

    /**
     * Compacts a paged cache in place after select: each block-table row's kept entries move to
     * the front of the row's own slots, and the row's pages past those still in use are freed
     * (per head for HEAD; NHD and HND heads share pages, so a sequence keeps the pages of its
     * longest head). Returns the freed page ids, row by row in table order.
     */
    public int[] compactPaged(PagedKv paged, Selection sel) { return compactPaged(paged, sel, null); }

    /**
     * Compacts a paged cache after select into dst (dst null: in place): a HEAD description
     * (nKvHeads = Hk) whose rows, one per (sequence, KV head) as in sel.headLens, hold at least
     * {@link PagedKv#pagesNeeded} pages each, allocated by the caller. Every source page is then
     * freed; returns the freed page ids, row by row in table order.
     */
    public synchronized int[] compactPaged(PagedKv paged, Selection sel, PagedKv dst) {
        final String fn = "Context.compactPaged";
        open();
        if (paged == null) throw new DefkvException(Status.INVALID_ARGUMENT, fn + ": paged is null");
        int nSeqs = paged.seqLens.length;
        if (nSeqs == 0) throw new DefkvException(Status.INVALID_ARGUMENT, fn + ": paged.seqLens is empty");
        SWIGTYPE_p_defkvb_layer l = DefkvNative.defkvb_layer_new(nSeqs); // no tensors: compaction reads the cache only
        try (SelIn s = new SelIn(fn, sel);
             PagedKv.Native pn = paged.new Native(fn, "paged", nSeqs * paged.rowsPerSeq(), nSeqs);
             PagedKv.Native dn = dst == null ? null : dst.new Native(fn, "dst", sel.headLens.length, -1)) {
            DefkvNative.defkvb_layer_set_paged(l, pn.raw);
            SWIGTYPE_p_defkv_paged_kv d = dn == null ? null : dn.raw;
            long n = DefkvNative.defkvb_compact_paged(ctx, l, s.raw, d, 0, 0); // counts only
            if (n < 0) throw err(fn, (int) n);
            ByteBuffer freed = direct(4 * n); // never empty: a NULL freed_pages would only count
            n = DefkvNative.defkvb_compact_paged(ctx, l, s.raw, d, DefkvNative.defkvb_buffer_address(freed), n);
            if (n < 0) throw err(fn, (int) n);
            int[] r = new int[(int) n];
            freed.asIntBuffer().get(r);
            return r;
        } finally {
            DefkvNative.defkvb_layer_free(l);
        }
    }

    /** Moves each head's kept entries to the front of its rows of k and v, in the caller's buffers. */
    public void compactInPlace(Tensor q, Tensor k, Tensor v, Tensor o, Selection sel) {
        compactInPlace(one(q, k, v), o, sel);
    }

    /** compactInPlace for a (ragged) batch: every sequence's keys and values, in place. */
    public synchronized void compactInPlace(Sequence[] seqs, Tensor o, Selection sel) {
        open();
        if (sel == null || sel.headLens.length == 0 || sel.cuSeqlens.length != sel.headLens.length + 1)
            throw new DefkvException(Status.INVALID_ARGUMENT,
                "Context.compactInPlace: sel must be a Selection returned by select or selectGlobal");
        SWIGTYPE_p_defkvb_layer l = layer(seqs, o);
        ByteBuffer lens = direct(4L * sel.headLens.length), cu = direct(4L * sel.cuSeqlens.length), idx = direct(4L * sel.indices.length);
        lens.asIntBuffer().put(sel.headLens); cu.asIntBuffer().put(sel.cuSeqlens); idx.asIntBuffer().put(sel.indices);
        SWIGTYPE_p_defkv_selection s = DefkvNative.defkvb_selection_new(DefkvNative.defkvb_buffer_address(lens),
            DefkvNative.defkvb_buffer_address(cu), DefkvNative.defkvb_buffer_address(idx), sel.indices.length, 0, 0);
        try { DefkvNative.defkvb_compact_inplace(ctx, l, s); } catch (StatusException e) { throw err("Context.compactInPlace", e.status); }
        finally {
            DefkvNative.defkvb_selection_free(s); DefkvNative.defkvb_layer_free(l);
            java.lang.ref.Reference.reachabilityFence(seqs); java.lang.ref.Reference.reachabilityFence(o);
            java.lang.ref.Reference.reachabilityFence(lens); java.lang.ref.Reference.reachabilityFence(cu);
            java.lang.ref.Reference.reachabilityFence(idx);
        }
    }

    /** Layer-DefensiveKV over several layers: q/k/v/o[i] of layer i; returns each layer's selection. */
    public Selection[] selectGlobal(Params p, Tensor[] q, Tensor[] k, Tensor[] v, Tensor[] o) {
        Sequence[][] seqs = new Sequence[q.length][];
        for (int i = 0; i < q.length; i++) seqs[i] = one(q[i], k[i], v[i]);
        return selectGlobal(p, seqs, o);
    }

    /** Layer-DefensiveKV over several layers of a (ragged) batch: seqs[i] and o[i] of layer i. */
    public synchronized Selection[] selectGlobal(Params p, Sequence[][] seqs, Tensor[] o) {
        open();
        if (seqs == null || o == null || o.length != seqs.length)
            throw new DefkvException(Status.INVALID_ARGUMENT, "o must have one entry per layer of seqs");
        SWIGTYPE_p_defkv_global g = DefkvNative.defkvb_global_create(ctx, p.raw, seqs.length);
        if (g == null) throw err("Context.selectGlobal", DefkvNative.defkvb_last_create_status());
        try {
            for (int i = 0; i < seqs.length; i++) {
                SWIGTYPE_p_defkvb_layer l = layer(seqs[i], o[i]);
                try { DefkvNative.defkvb_global_add_layer(g, i, l); } catch (StatusException e) { throw err("Context.selectGlobal", e.status); }
                finally { DefkvNative.defkvb_layer_free(l); }
            }
            try { DefkvNative.defkv_global_select(g); } catch (StatusException e) { throw err("Context.selectGlobal", e.status); }
            Selection[] r = new Selection[seqs.length];
            for (int i = 0; i < seqs.length; i++) {
                long n = DefkvNative.defkvb_global_layer_kept_count(g, i);
                if (n < 0) throw err("Context.selectGlobal", (int) n);
                Out out = out(seqs[i], n);
                SWIGTYPE_p_defkv_selection s = out.raw();
                try { DefkvNative.defkvb_global_layer_selection(g, i, s); } catch (StatusException e) { throw err("Context.selectGlobal", e.status); }
                finally { DefkvNative.defkvb_selection_free(s); }
                r[i] = out.get();
            }
            return r;
        } finally {
            DefkvNative.defkv_global_destroy(g);
            java.lang.ref.Reference.reachabilityFence(seqs); java.lang.ref.Reference.reachabilityFence(o);
        }
    }
}
