package org.defkv.internal;

/** A negative defkv_status from a wrapped call (internal; rethrown as DefkvException). */
public final class StatusException extends RuntimeException {
    public final int status;
    public StatusException(int status) { super("defkv status " + status); this.status = status; }
}
