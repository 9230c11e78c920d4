package org.defkv;

/** An error of libdefkv: the defkv_status code and the library's message. */
public final class DefkvException extends RuntimeException {
    private final int status;
    public DefkvException(int status, String message) {
        super("defkv status " + status + ": " + message);
        this.status = status;
    }
    /** The negative defkv_status code (Status.*). */
    public int status() { return status; }
}
