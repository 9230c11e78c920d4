package org.defkv;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;

/** A contiguous row-major view of a direct ByteBuffer (zero-copy), or of a copy of a float[]. */
public final class Tensor {
    public static final int F32 = 0, F16 = 1, BF16 = 2;
    final ByteBuffer buffer;
    final int dtype;
    final long[] shape;

    private Tensor(ByteBuffer buffer, int dtype, long[] shape) {
        if (!buffer.isDirect()) throw new DefkvException(Status.INVALID_ARGUMENT, "buffer must be a direct ByteBuffer");
        long n = 1;
        for (long s : shape) n *= s;
        long bytes = n * (dtype == F32 ? 4 : 2);
        if (shape.length < 1 || shape.length > 4 || bytes != buffer.capacity())
            throw new DefkvException(Status.INVALID_ARGUMENT,
                "buffer has " + buffer.capacity() + " bytes but shape needs " + bytes);
        this.buffer = buffer; this.dtype = dtype; this.shape = shape.clone();
    }
    /** Zero-copy view of a direct buffer (native byte order) as dtype with the given shape. */
    public static Tensor of(ByteBuffer direct, int dtype, long... shape) { return new Tensor(direct, dtype, shape); }
    /** float[] overload: copies the data into a new direct buffer (use of() to avoid the copy). */
    public static Tensor ofFloats(float[] data, long... shape) {
        ByteBuffer b = ByteBuffer.allocateDirect(data.length * 4).order(ByteOrder.nativeOrder());
        b.asFloatBuffer().put(data);
        return new Tensor(b, F32, shape);
    }
    /** The buffer viewed (for ofFloats, the copy). */
    public ByteBuffer buffer() { return buffer; }
}
