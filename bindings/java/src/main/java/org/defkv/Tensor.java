package org.defkv;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;

/**
 * A view of a direct ByteBuffer (zero-copy), or of a copy of a float[]: a logical shape with,
 * optionally, element strides (so token-major caches [L, Hk, d] and preallocated caches with
 * spare capacity are described without copies). The buffer must be in native byte order
 * ({@code buf.order(ByteOrder.nativeOrder())}): the library reads its bytes as they are.
 */
public final class Tensor {
    public static final int F32 = 0, F16 = 1, BF16 = 2;
    final ByteBuffer buffer;
    final int dtype;
    final long[] shape;
    final long[] strides; // all zero: contiguous row-major

    private Tensor(String fn, ByteBuffer buffer, int dtype, long[] shape, long[] strides) {
        if (buffer == null) throw new DefkvException(Status.INVALID_ARGUMENT, fn + ": buffer is null");
        if (!buffer.isDirect()) throw new DefkvException(Status.INVALID_ARGUMENT, fn + ": buffer must be a direct ByteBuffer");
        if (buffer.order() != ByteOrder.nativeOrder())
            throw new DefkvException(Status.INVALID_ARGUMENT, fn + ": buffer is in " + buffer.order()
                + " byte order but the library reads native (" + ByteOrder.nativeOrder()
                + ") order: call buffer.order(ByteOrder.nativeOrder()) before filling it");
        if (dtype != F32 && dtype != F16 && dtype != BF16)
            throw new DefkvException(Status.INVALID_ARGUMENT, fn + ": dtype " + dtype + " is not F32, F16 or BF16");
        if (shape == null || shape.length < 1 || shape.length > 4)
            throw new DefkvException(Status.INVALID_ARGUMENT, fn + ": shape must have 1 to 4 dimensions");
        for (long s : shape)
            if (s < 0) throw new DefkvException(Status.INVALID_ARGUMENT, fn + ": shape " + java.util.Arrays.toString(shape) + " has a negative extent");
        long elem = dtype == F32 ? 4 : 2;
        if (strides == null) {
            long n = 1;
            for (long s : shape) n = Math.multiplyExact(n, s);
            long bytes = n * elem;
            if (bytes != buffer.capacity())
                throw new DefkvException(Status.INVALID_ARGUMENT,
                    fn + ": buffer has " + buffer.capacity() + " bytes but shape " + java.util.Arrays.toString(shape) + " needs " + bytes);
            strides = new long[shape.length];
        } else {
            if (strides.length != shape.length)
                throw new DefkvException(Status.INVALID_ARGUMENT, fn + ": " + strides.length + " strides for " + shape.length + " dimensions");
            long last = 0;
            boolean empty = false;
            for (int i = 0; i < shape.length; i++) {
                if (strides[i] < 0) throw new DefkvException(Status.INVALID_ARGUMENT, fn + ": strides must be non-negative");
                if (shape[i] == 0) empty = true;
                else last = Math.addExact(last, Math.multiplyExact(shape[i] - 1, strides[i]));
            }
            if (!empty && (last + 1) * elem > buffer.capacity())
                throw new DefkvException(Status.INVALID_ARGUMENT, fn + ": shape " + java.util.Arrays.toString(shape)
                    + " with strides " + java.util.Arrays.toString(strides) + " reaches byte " + ((last + 1) * elem)
                    + " of a buffer of " + buffer.capacity());
        }
        this.buffer = buffer; this.dtype = dtype; this.shape = shape.clone(); this.strides = strides.clone();
    }
    /** Zero-copy contiguous row-major view of a direct buffer (native byte order) holding exactly the shape. */
    public static Tensor of(ByteBuffer direct, int dtype, long... shape) { return new Tensor("Tensor.of", direct, dtype, shape, null); }
    /**
     * Zero-copy strided view: logical shape, element strides per dimension. The buffer must
     * hold every element the strides reach and may be larger: a preallocated head-major cache
     * [Hk, Lmax, d] holding L tokens is {@code strided(buf, F32, new long[]{hk, l, d}, new long[]{lmax*d, d, 1})},
     * a token-major cache [L, Hk, d] is {@code strided(buf, F32, new long[]{hk, l, d}, new long[]{d, hk*d, 1})}.
     */
    public static Tensor strided(ByteBuffer direct, int dtype, long[] shape, long[] strides) {
        if (strides == null) throw new DefkvException(Status.INVALID_ARGUMENT, "Tensor.strided: strides is null");
        return new Tensor("Tensor.strided", direct, dtype, shape, strides);
    }
    /** float[] overload: copies the data into a new direct buffer (use of() to avoid the copy). */
    public static Tensor ofFloats(float[] data, long... shape) {
        ByteBuffer b = ByteBuffer.allocateDirect(data.length * 4).order(ByteOrder.nativeOrder());
        b.asFloatBuffer().put(data);
        return new Tensor("Tensor.ofFloats", b, F32, shape, null);
    }
    /** The buffer viewed (for ofFloats, the copy). */
    public ByteBuffer buffer() { return buffer; }
    /** The logical shape. */
    public long[] shape() { return shape.clone(); }
    /** The element strides (all zero for a contiguous tensor). */
    public long[] strides() { return strides.clone(); }
}
