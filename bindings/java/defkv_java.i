/* Java: generated classes go to package org.defkv.internal (not API); org.defkv is hand-written. */
%module DefkvNative

/* status-to-error: a negative defkv_status throws StatusException (code only); the public
 * org.defkv classes rethrow it as DefkvException with the context's message. */
%typemap(jni) defkv_status "jint"
%typemap(jtype) defkv_status "int"
%typemap(jstype) defkv_status "int"
%typemap(out) defkv_status %{ $result = (jint)$1; %}
%typemap(javaout) defkv_status {
    int status = $jnicall;
    if (status < 0) throw new StatusException(status);
    return status;
  }

/* Direct ByteBuffers cross as their native address: zero-copy. */
%typemap(jni) void *DEFKV_BUFFER "jobject"
%typemap(jtype) void *DEFKV_BUFFER "java.nio.Buffer"
%typemap(jstype) void *DEFKV_BUFFER "java.nio.Buffer"
%typemap(javain) void *DEFKV_BUFFER "$javainput"
%typemap(in) void *DEFKV_BUFFER %{
    $1 = $input ? (*jenv)->GetDirectBufferAddress(jenv, $input) : NULL;
    if (!$1) {
        SWIG_JavaThrowException(jenv, SWIG_JavaIllegalArgumentException, "buffer must be a direct ByteBuffer");
        return $null;
    }
%}

/* The JNI class loads the module before any native call (so static helpers such as
 * Params.methodFromName work before a Context exists); NativeLoader (hand-written, same
 * package) finds it: defkv.lib.dir, the jar's own copy, or java.library.path. */
%pragma(java) jniclasscode=%{
  static { NativeLoader.load(); }
%}

%include "defkv.i"

%inline %{
static int64_t defkvb_buffer_address(void *DEFKV_BUFFER) { return (int64_t)(intptr_t)DEFKV_BUFFER; }
%}
