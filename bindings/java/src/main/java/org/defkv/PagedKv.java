package org.defkv;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import org.defkv.internal.*;

/**
 * A layer's K and V held in page pools and addressed through block tables (defkv_paged_kv).
 * Row r of blockTables holds its page ids in token order at {@code blockTables[r * blockTableStride + i]};
 * token t of a row sits in page {@code row[t / pageSize]} at slot {@code t % pageSize}. Rows: one per
 * sequence (NHD, HND) or one per (sequence, KV head), sequence-major (HEAD). Pages no row points at
 * and slots past a sequence's end are never read (they may hold anything, NaN included). The pools
 * are zero-copy tensors (the same one for an MLA cache); blockTables and seqLens are copied for each
 * call, so later edits of the arrays are seen by later calls.
 */
public final class PagedKv {
    /** [numPages, pageSize, Hk, d] (vLLM, FlashInfer "NHD"). */
    public static final int NHD = 0;
    /** [numPages, Hk, pageSize, d] (FlashInfer "HND"). */
    public static final int HND = 1;
    /** [numPages, pageSize, d], one KV head per page: what {@link Context#compactPaged(PagedKv, Selection, PagedKv)} writes. */
    public static final int HEAD = 2;

    final int layout, pageSize, nKvHeads;
    final Tensor kPages, vPages;
    final int[] blockTables, seqLens;
    final long blockTableStride;

    private PagedKv(int layout, int pageSize, int nKvHeads, Tensor kPages, Tensor vPages, int[] blockTables,
                    long blockTableStride, int[] seqLens) {
        if (kPages == null || vPages == null) throw new DefkvException(Status.INVALID_ARGUMENT, "PagedKv.of: kPages and vPages are required");
        if (blockTables == null) throw new DefkvException(Status.INVALID_ARGUMENT, "PagedKv.of: blockTables is null");
        this.layout = layout; this.pageSize = pageSize; this.nKvHeads = nKvHeads; this.kPages = kPages; this.vPages = vPages;
        this.blockTables = blockTables; this.blockTableStride = blockTableStride; this.seqLens = seqLens == null ? new int[0] : seqLens;
    }
    /**
     * A paged description: layout (NHD, HND, HEAD), tokens per page, Hk (required for HEAD; 0 or
     * the pools' Hk otherwise), the pools, the block tables (rows of blockTableStride entries) and
     * each sequence's length (null for a destination of compactPaged). The arrays are not copied
     * here: each call reads them as they are then.
     */
    public static PagedKv of(int layout, int pageSize, int nKvHeads, Tensor kPages, Tensor vPages, int[] blockTables,
                             long blockTableStride, int[] seqLens) {
        return new PagedKv(layout, pageSize, nKvHeads, kPages, vPages, blockTables, blockTableStride, seqLens);
    }

    int kvHeads() {
        if (layout == NHD && kPages.shape.length == 4) return (int) kPages.shape[2];
        if (layout == HND && kPages.shape.length == 4) return (int) kPages.shape[1];
        return nKvHeads;
    }
    long rowsPerSeq() { return layout == HEAD ? Math.max(nKvHeads, 0) : 1; }

    private static ByteBuffer ints(int[] a) {
        ByteBuffer b = ByteBuffer.allocateDirect(4 * Math.max(a.length, 1)).order(ByteOrder.nativeOrder());
        b.asIntBuffer().put(a);
        return b;
    }

    /** The C description for one call; close() frees it. Keeps the copies of the tables reachable. */
    final class Native implements AutoCloseable {
        final SWIGTYPE_p_defkv_paged_kv raw;
        private final ByteBuffer tables, lens;
        /** rows: block-table rows the call reads; seqs: sequences (seqLens entries), or -1 when not read. */
        Native(String fn, String what, long rows, int seqs) {
            if (blockTableStride >= 1 && rows > 0 && blockTables.length < rows * blockTableStride)
                throw new DefkvException(Status.INVALID_ARGUMENT, fn + ": " + what + ": blockTables has " + blockTables.length
                    + " entries, expected " + rows + " rows of " + blockTableStride);
            if (seqs >= 0 && seqLens.length != seqs)
                throw new DefkvException(Status.INVALID_ARGUMENT, fn + ": " + what + ": seqLens has " + seqLens.length
                    + " entries, expected one per sequence (" + seqs + ")");
            tables = ints(blockTables);
            lens = ints(seqLens);
            raw = DefkvNative.defkvb_paged_new(layout, pageSize, nKvHeads, DefkvNative.defkvb_buffer_address(tables),
                blockTableStride, seqLens.length == 0 ? 0 : DefkvNative.defkvb_buffer_address(lens));
            if (raw == null) throw new DefkvException(Status.OUT_OF_MEMORY, fn + ": could not allocate the paged description");
            pool(0, kPages); pool(1, vPages);
        }
        private void pool(int which, Tensor t) {
            long[] s = new long[4], st = new long[4];
            System.arraycopy(t.shape, 0, s, 0, t.shape.length);
            System.arraycopy(t.strides, 0, st, 0, t.strides.length);
            DefkvNative.defkvb_paged_set_pool(raw, which, DefkvNative.defkvb_buffer_address(t.buffer), t.dtype, t.shape.length,
                s[0], s[1], s[2], s[3], st[0], st[1], st[2], st[3], 0, 0);
        }
        @Override public void close() {
            DefkvNative.defkvb_paged_free(raw);
            java.lang.ref.Reference.reachabilityFence(tables); java.lang.ref.Reference.reachabilityFence(lens);
            java.lang.ref.Reference.reachabilityFence(PagedKv.this);
        }
    }

    /** Pages each (sequence, KV head) needs for its kept entries, ceil(headLens[i] / pageSize);
     * their sum is the number of pages to allocate before compactPaged into new pages. */
    public static int[] pagesNeeded(int[] headLens, int pageSize) {
        if (headLens == null) throw new DefkvException(Status.INVALID_ARGUMENT, "PagedKv.pagesNeeded: headLens is null");
        ByteBuffer in = ints(headLens), out = ints(new int[headLens.length]);
        long total = DefkvNative.defkvb_paged_pages_needed(DefkvNative.defkvb_buffer_address(in), headLens.length, pageSize,
            DefkvNative.defkvb_buffer_address(out));
        java.lang.ref.Reference.reachabilityFence(in);
        if (total < 0) throw new DefkvException((int) total,
            Context.callerMessage("PagedKv.pagesNeeded", DefkvNative.defkv_last_error_global()));
        int[] r = new int[headLens.length];
        out.asIntBuffer().get(r);
        return r;
    }

    /** Where each row's next token goes (nextSlots): slot offset[i] of page page[i], or, where page[i] is -1,
     * the row is full: allocate a page, append its id to the row and write at slot 0. */
    public static final class Slots {
        public final int[] page, offset;
        Slots(int[] page, int[] offset) { this.page = page; this.offset = offset; }
    }

    /** Next slots of rows of lengths lens in blockTables (rows of blockTableStride entries), for decoding after compaction. */
    public static Slots nextSlots(int[] lens, int[] blockTables, long blockTableStride, int pageSize) {
        if (lens == null || blockTables == null) throw new DefkvException(Status.INVALID_ARGUMENT, "PagedKv.nextSlots: lens and blockTables are required");
        if (blockTableStride >= 1 && blockTables.length < lens.length * blockTableStride)
            throw new DefkvException(Status.INVALID_ARGUMENT, "PagedKv.nextSlots: blockTables has " + blockTables.length
                + " entries, expected " + lens.length + " rows of " + blockTableStride);
        ByteBuffer l = ints(lens), t = ints(blockTables), p = ints(new int[lens.length]), o = ints(new int[lens.length]);
        try {
            DefkvNative.defkvb_paged_next_slots(DefkvNative.defkvb_buffer_address(l), lens.length, DefkvNative.defkvb_buffer_address(t),
                blockTableStride, pageSize, DefkvNative.defkvb_buffer_address(p), DefkvNative.defkvb_buffer_address(o));
        } catch (StatusException e) {
            throw new DefkvException(e.status, Context.callerMessage("PagedKv.nextSlots", DefkvNative.defkv_last_error_global()));
        } finally {
            java.lang.ref.Reference.reachabilityFence(l); java.lang.ref.Reference.reachabilityFence(t);
        }
        int[] page = new int[lens.length], offset = new int[lens.length];
        p.asIntBuffer().get(page); o.asIntBuffer().get(offset);
        return new Slots(page, offset);
    }
}
