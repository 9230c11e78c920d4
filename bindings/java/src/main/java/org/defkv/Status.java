package org.defkv;

/** defkv_status codes (integers: values from newer libraries are kept). */
public final class Status {
    private Status() {}
    public static final int SUCCESS = 0, INVALID_ARGUMENT = -1, OUT_OF_MEMORY = -2, UNSUPPORTED = -3,
        BACKEND_UNAVAILABLE = -4, SIZE_OVERFLOW = -5, NON_FINITE = -6, INVALID_STATE = -7,
        BUFFER_TOO_SMALL = -8, BACKEND_FAILURE = -9, INTERNAL = -10;
}
