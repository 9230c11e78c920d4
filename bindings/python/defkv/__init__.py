"""defkv: KV-cache eviction with DefensiveKV and the methods it is compared with.

Tensors are NumPy arrays or any DLPack producer (PyTorch tensors, CuPy arrays, JAX arrays,
NumPy >= 1.22 arrays, or a raw ``dltensor`` capsule such as ``torch.utils.dlpack.to_dlpack``
returns). Nothing is copied: the library reads the caller's memory through its strides, and
``Context.compact_inplace`` writes into the caller's own keys and values.

    import numpy as np, defkv
    with defkv.Context() as ctx:
        sel = ctx.select(defkv.Params("defensivekv", compression_ratio=0.8),
                         queries=q, keys=k, values=v, o_proj=o)   # q [H,W,d], k/v [Hk,L,d], o [D,H*d]
        ctx.compact_inplace(sel, keys=k, values=v)               # kept rows now lead each head
        print(sel.head_lens, sel.kept(0))

Paged caches (page pools addressed through block tables): ``defkv.PagedKV``, passed as
``paged=`` to ``Context.select``; ``Context.compact_paged`` compacts them and returns the freed
page ids; ``pages_needed`` and ``next_slots`` do the page arithmetic around it.

Decode-time eviction: ``Context.stream(params, defkv.StreamParams(...))`` returns a ``Stream``
(``append``, ``push_queries``, ``due``, ``head_lens``, ``round`` over ``defkv.StreamCache``
per layer: contiguous arrays compacted in place, or a ``PagedKV``).

Errors raise ``defkv.Error`` (``.status``, ``.message``). A Context is used by one thread at a
time (its calls hold a lock); different contexts are independent.
"""

import ctypes
import threading
import weakref

import numpy as np

from . import native as _n

__all__ = ["Context", "Params", "Sequence", "Selection", "Error", "Status", "Method", "Dtype", "Backend",
           "PagedKV", "bfloat16", "version", "method_from_name", "pages_needed", "next_slots",
           "Stream", "StreamParams", "StreamCache", "Aggregation"]


class Status:
    """defkv_status codes."""
    SUCCESS = 0
    INVALID_ARGUMENT = -1
    OUT_OF_MEMORY = -2
    UNSUPPORTED = -3
    BACKEND_UNAVAILABLE = -4
    SIZE_OVERFLOW = -5
    NON_FINITE = -6
    INVALID_STATE = -7
    BUFFER_TOO_SMALL = -8
    BACKEND_FAILURE = -9
    INTERNAL = -10


class Method:
    """defkv_method values."""
    SNAPKV, ADA_SNAPKV, CRITICALKV, ADA_CRITICALKV, DEFENSIVEKV, LAYER_DEFENSIVEKV, \
        STREAMINGLLM, KNORM, TOVA, RANDOM = range(10)


class Dtype:
    F32, F16, BF16 = 0, 1, 2


class Backend:
    AUTO, CPU, CUDA, VULKAN = 0, 1, 2, 3


_MEMORY_HOST = 0


class Error(Exception):
    """An error of the library: ``status`` (a Status code) and ``message`` naming the argument."""

    def __init__(self, status, message):
        super().__init__("defkv: %s (%d): %s" % (_n.defkv_status_string(int(status)), status, message))
        self.status = int(status)
        self.message = message


def _caller_message(fn, msg):
    """Names the Python call in place of the C function the library's message starts with."""
    head, sep, rest = msg.partition(": ")
    if sep and head.startswith("defkv_") and " " not in head:
        msg = rest
    return "%s: %s" % (fn, msg)


def version():
    """The library version string."""
    return _n.defkv_version_string()


def method_from_name(name):
    """The Method value of a CLI method name ("defensivekv")."""
    m = _n.defkvb_method_from_name(name)
    if m < 0:
        raise Error(m, "method_from_name: unknown method name %r" % (name,))
    return m


# -------------------------------------------------------------------------------------------
# Parameters
# -------------------------------------------------------------------------------------------

_PARAM_FIELDS = ("method", "compression_ratio", "budget", "window", "kernel", "scale", "n_sink",
                 "alpha_safeguard", "first_stage_ratio", "epsilon", "mass_threshold", "window_bias",
                 "nonfinite", "seed")


class Params:
    """Every field of defkv_params, starting from the library's defaults (the official code's).

    ``Params("defensivekv", compression_ratio=0.8, window=32)``; fields are attributes:
    method, compression_ratio, budget, window, kernel, scale, n_sink, alpha_safeguard,
    first_stage_ratio, epsilon, mass_threshold, window_bias (0 official, 1 window),
    nonfinite (0 reject, 1 lowest), seed.
    """

    def __init__(self, method=Method.DEFENSIVEKV, **fields):
        object.__setattr__(self, "_raw", _n.defkv_params())
        self.method = method_from_name(method) if isinstance(method, str) else int(method)
        for k, v in fields.items():
            setattr(self, k, v)

    def __getattr__(self, name):
        if name in _PARAM_FIELDS:
            return getattr(self._raw, name)
        raise AttributeError(name)

    def __setattr__(self, name, value):
        if name not in _PARAM_FIELDS:
            raise AttributeError("Params has no field %r (fields: %s)" % (name, ", ".join(_PARAM_FIELDS)))
        if name == "method" and isinstance(value, str):
            value = method_from_name(value)
        setattr(self._raw, name, value)

    def __repr__(self):
        return "Params(%s)" % ", ".join("%s=%r" % (k, getattr(self, k)) for k in _PARAM_FIELDS)


# -------------------------------------------------------------------------------------------
# Tensors
# -------------------------------------------------------------------------------------------

class bfloat16:
    """Marks a NumPy uint16 array (raw bfloat16 bits; NumPy has no bfloat16) as dtype BF16."""

    def __init__(self, array):
        if not isinstance(array, np.ndarray) or array.dtype != np.uint16:
            raise Error(Status.INVALID_ARGUMENT, "bfloat16: expected a NumPy uint16 array of bfloat16 bits")
        self.array = array


_capi = ctypes.pythonapi
_capi.PyCapsule_IsValid.restype = ctypes.c_int
_capi.PyCapsule_IsValid.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capi.PyCapsule_GetPointer.restype = ctypes.c_void_p
_capi.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]

# DLManagedTensorVersioned (DLPack >= 1.0): {version (2 x uint32), manager_ctx, deleter, flags
# (uint64), dl_tensor}; flag bit 0 marks a read-only tensor.
_VERSIONED_DLTENSOR_OFFSET = 8 + 8 + 8 + 8
_VERSIONED_FLAGS_OFFSET = 8 + 8 + 8
_DLPACK_FLAG_READ_ONLY = 1


def _dlpack_capsule(obj):
    if type(obj).__name__ == "PyCapsule":
        return obj
    try:
        return obj.__dlpack__(max_version=(1, 0))
    except TypeError:  # a producer older than DLPack 1.0's protocol
        return obj.__dlpack__()


class _View:
    """One tensor argument as the library sees it, plus what keeps its memory alive."""

    def __init__(self, fn, what, obj, writable):
        self.keep = obj
        self.dltensor = None
        if isinstance(obj, bfloat16):
            self._numpy(fn, what, obj.array, Dtype.BF16, writable)
        elif isinstance(obj, np.ndarray):
            dtypes = {np.dtype(np.float32): Dtype.F32, np.dtype(np.float16): Dtype.F16}
            dt = dtypes.get(obj.dtype.newbyteorder("="))
            if dt is None:
                raise Error(Status.UNSUPPORTED, "%s: %s has dtype %s, expected float32 or float16 (or "
                                                "defkv.bfloat16(uint16 array))" % (fn, what, obj.dtype))
            self._numpy(fn, what, obj, dt, writable)
        elif hasattr(obj, "__dlpack__") or type(obj).__name__ == "PyCapsule":
            self._dlpack(fn, what, obj, writable)
        else:
            raise Error(Status.INVALID_ARGUMENT, "%s: %s is a %s, expected a NumPy array or a DLPack "
                                                 "producer (__dlpack__)" % (fn, what, type(obj).__name__))

    def _numpy(self, fn, what, a, dtype, writable):
        if not a.dtype.isnative:
            raise Error(Status.INVALID_ARGUMENT, "%s: %s is not in native byte order" % (fn, what))
        if a.ndim < 1 or a.ndim > 4:
            raise Error(Status.INVALID_ARGUMENT, "%s: %s has %d dimensions, expected 1 to 4" % (fn, what, a.ndim))
        if writable and not a.flags.writeable:
            raise Error(Status.INVALID_ARGUMENT, "%s: %s is read-only but compaction writes to it" % (fn, what))
        strides = []
        for s, n in zip(a.strides, a.shape):
            if s % a.itemsize or (s < 0 and n > 1):
                raise Error(Status.UNSUPPORTED, "%s: %s has byte strides %s; defkv needs non-negative whole-"
                                                "element strides (np.ascontiguousarray copies)" % (fn, what, a.strides))
            strides.append(max(s, 0) // a.itemsize)
        self.address = a.__array_interface__["data"][0]
        self.dtype, self.shape, self.strides = dtype, list(a.shape), strides

    def _dlpack(self, fn, what, obj, writable):
        cap = _dlpack_capsule(obj)
        self.keep = (obj, cap)  # the capsule owns the DLManagedTensor: alive while we use it
        if _capi.PyCapsule_IsValid(cap, b"dltensor_versioned"):
            base = _capi.PyCapsule_GetPointer(cap, b"dltensor_versioned")
            flags = ctypes.c_uint64.from_address(base + _VERSIONED_FLAGS_OFFSET).value
            if writable and flags & _DLPACK_FLAG_READ_ONLY:
                raise Error(Status.INVALID_ARGUMENT, "%s: %s is a read-only DLPack tensor but compaction "
                                                     "writes to it" % (fn, what))
            self.dltensor = base + _VERSIONED_DLTENSOR_OFFSET
        elif _capi.PyCapsule_IsValid(cap, b"dltensor"):
            self.dltensor = _capi.PyCapsule_GetPointer(cap, b"dltensor")  # dl_tensor is the first member
        else:
            raise Error(Status.INVALID_ARGUMENT, "%s: %s gave a capsule that is not an unused DLPack tensor "
                                                 "('dltensor' or 'dltensor_versioned')" % (fn, what))

    def set(self, fn, what, layer, seq, which):
        if self.dltensor is not None:
            st = _n.defkvb_layer_set_dltensor(layer, seq, which, self.dltensor)
            if st < 0:
                raise Error(st, _caller_message(fn, _n.defkvb_dlpack_error()).replace(": ", ": %s: " % what, 1))
            return
        s = (self.shape + [0, 0, 0, 0])[:4]
        t = (self.strides + [0, 0, 0, 0])[:4]
        _n.defkvb_layer_set_tensor(layer, seq, which, self.address, self.dtype, len(self.shape),
                                   s[0], s[1], s[2], s[3], t[0], t[1], t[2], t[3], _MEMORY_HOST, 0)

    def _args(self):
        """The host tensor as defkvb_*_set_tensor's arguments after the slot: address, dtype,
        ndim, shape[4], strides[4], memory, byte_offset."""
        s = (self.shape + [0, 0, 0, 0])[:4]
        t = (self.strides + [0, 0, 0, 0])[:4]
        return (self.address, self.dtype, len(self.shape), s[0], s[1], s[2], s[3], t[0], t[1], t[2], t[3],
                _MEMORY_HOST, 0)

    def set_stream_cache(self, fn, what, caches, layer, which):
        """As set(), for tensor ``which`` (0 keys, 1 values, 2 o_proj) of a stream round's cache."""
        if self.dltensor is not None:
            st = _n.defkvb_stream_caches_set_dltensor(caches, layer, which, self.dltensor)
            if st < 0:
                raise Error(st, _caller_message(fn, _n.defkvb_dlpack_error()).replace(": ", ": %s: " % what, 1))
            return
        _n.defkvb_stream_caches_set_tensor(caches, layer, which, *self._args())

    def set_pool(self, fn, what, paged, which):
        """As set(), for pool ``which`` (0 k_pages, 1 v_pages) of a paged description."""
        if self.dltensor is not None:
            st = _n.defkvb_paged_set_dlpool(paged, which, self.dltensor)
            if st < 0:
                raise Error(st, _caller_message(fn, _n.defkvb_dlpack_error()).replace(": ", ": %s: " % what, 1))
            return
        s = (self.shape + [0, 0, 0, 0])[:4]
        t = (self.strides + [0, 0, 0, 0])[:4]
        _n.defkvb_paged_set_pool(paged, which, self.address, self.dtype, len(self.shape),
                                 s[0], s[1], s[2], s[3], t[0], t[1], t[2], t[3], _MEMORY_HOST, 0)

    def full_shape(self):
        if self.dltensor is not None:
            # DLTensor: data (8 bytes), device (2 x int32), ndim (int32), dtype (4 bytes), shape.
            ndim = ctypes.c_int32.from_address(self.dltensor + 16).value
            shape_ptr = ctypes.c_void_p.from_address(self.dltensor + 24).value
            return [ctypes.c_int64.from_address(shape_ptr + 8 * i).value for i in range(ndim)]
        return self.shape

    def heads_and_len(self):
        shape = self.full_shape()
        return (shape[0], shape[1]) if len(shape) >= 2 else (0, 0)


class Sequence:
    """One sequence of a (ragged) batch: queries [H, W, d] (or attention [H, W, L]), keys and
    values [Hk, L, d]. L may differ between sequences; H, Hk, W and d may not. In a paged layer
    (``select(..., paged=...)``) a sequence has queries (or attention) only."""

    def __init__(self, keys=None, values=None, queries=None, attention=None):
        self.queries, self.attention, self.keys, self.values = queries, attention, keys, values


class Selection:
    """What a selection keeps, as NumPy arrays: head_lens and cu_seqlens per head (n_seqs*Hk,
    sequence-major), indices (kept positions, head i's at cu_seqlens[i]:cu_seqlens[i+1]),
    keep_mask and scores per entry ([Hk, L_b] blocks concatenated over sequences)."""

    def __init__(self, heads, entries, capacity):
        self.head_lens = np.zeros(max(heads, 1), np.int32)[:heads]
        self.cu_seqlens = np.zeros(heads + 1, np.int32)
        self._indices = np.zeros(max(capacity, 1), np.int32)
        self._capacity = capacity
        self.keep_mask = np.zeros(max(entries, 1), np.uint8)[:entries]
        self.scores = np.zeros(max(entries, 1), np.float32)[:entries]

    @property
    def indices(self):
        return self._indices[:int(self.cu_seqlens[-1])]

    def kept(self, head):
        """Kept token positions of head ``head`` (ascending)."""
        return self._indices[int(self.cu_seqlens[head]):int(self.cu_seqlens[head + 1])]

    def _raw(self, with_outputs=True):
        a = lambda x: x.__array_interface__["data"][0] if x.size else 0
        if with_outputs:
            return _n.defkvb_selection_new(a(self.head_lens), a(self.cu_seqlens), a(self._indices),
                                           self._capacity, a(self.keep_mask), a(self.scores))
        return _n.defkvb_selection_new(a(self.head_lens), a(self.cu_seqlens), a(self._indices),
                                       int(self.cu_seqlens[-1]), 0, 0)

    def __repr__(self):
        return "Selection(head_lens=%s)" % (self.head_lens.tolist(),)


_LAYOUTS = {"nhd": 0, "hnd": 1, "head": 2}


def _int32_array(fn, what, a, ndim):
    """a as a C-contiguous int32 array of ndim dimensions (a copy only when it is not one)."""
    try:
        out = np.ascontiguousarray(a, dtype=np.int32)
    except (TypeError, ValueError) as e:
        raise Error(Status.INVALID_ARGUMENT, "%s: %s: %s" % (fn, what, e))
    if out.ndim != ndim:
        raise Error(Status.INVALID_ARGUMENT, "%s: %s has %d dimensions, expected %d" % (fn, what, out.ndim, ndim))
    return out


class PagedKV:
    """A layer's K and V in page pools addressed through block tables (defkv_paged_kv).

    ``PagedKV("nhd", k_pages, v_pages, block_tables, seq_lens, page_size=16)``: layout "nhd"
    ([num_pages, page_size, Hk, d], vLLM), "hnd" ([num_pages, Hk, page_size, d]) or "head"
    ([num_pages, page_size, d], one KV head per page; needs ``n_kv_heads``); pools as NumPy
    arrays or DLPack tensors (the same object for an MLA cache); ``block_tables`` a 2-D int array,
    one row per sequence (per (sequence, KV head), sequence-major, for "head") listing its page
    ids in token order; ``seq_lens`` each sequence's length (None for the destination of
    ``Context.compact_paged``). Pages no row points at and slots past a sequence's end are never
    read (NaN is fine there). The tables are read at each call, never kept.
    """

    NHD, HND, HEAD = 0, 1, 2

    def __init__(self, layout, k_pages, v_pages, block_tables, seq_lens=None, *, page_size, n_kv_heads=0):
        if isinstance(layout, str):
            if layout.lower() not in _LAYOUTS:
                raise Error(Status.INVALID_ARGUMENT, "PagedKV: layout %r is not one of %s" % (layout, sorted(_LAYOUTS)))
            layout = _LAYOUTS[layout.lower()]
        self.layout, self.page_size, self.n_kv_heads = int(layout), int(page_size), int(n_kv_heads)
        self.k_pages, self.v_pages, self.block_tables, self.seq_lens = k_pages, v_pages, block_tables, seq_lens

    def _rows_per_seq(self):
        return max(self.n_kv_heads, 0) if self.layout == PagedKV.HEAD else 1

    def _build(self, fn, what, rows, n_seqs, writable):
        """The C description (free with _n.defkvb_paged_free) and what keeps its memory alive.
        rows: block-table rows the call reads; n_seqs: sequences (seq_lens read), or None."""
        tables = _int32_array(fn, what + ".block_tables", self.block_tables, 2)
        if tables.shape[0] < rows:
            raise Error(Status.INVALID_ARGUMENT, "%s: %s.block_tables has %d rows, expected %d"
                        % (fn, what, tables.shape[0], rows))
        lens = None
        if n_seqs is not None:
            lens = _int32_array(fn, what + ".seq_lens", self.seq_lens if self.seq_lens is not None else [], 1)
            if lens.shape[0] != n_seqs:
                raise Error(Status.INVALID_ARGUMENT, "%s: %s.seq_lens has %d entries, expected one per sequence (%d)"
                            % (fn, what, lens.shape[0], n_seqs))
        addr = lambda a: a.__array_interface__["data"][0] if a is not None and a.size else 0
        raw = _n.defkvb_paged_new(self.layout, self.page_size, self.n_kv_heads, addr(tables), tables.shape[1],
                                  addr(lens))
        keep = [tables, lens]
        try:
            views = []
            for which, name, t in ((0, "k_pages", self.k_pages), (1, "v_pages", self.v_pages)):
                v = _View(fn, "%s.%s" % (what, name), t, writable)
                v.set_pool(fn, "%s.%s" % (what, name), raw, which)
                views.append(v)
            keep.append(views)
        except BaseException:
            _n.defkvb_paged_free(raw)
            raise
        return raw, keep, views[0].full_shape()

    def _kv_heads(self, k_shape):
        if self.layout == PagedKV.NHD and len(k_shape) == 4:
            return k_shape[2]
        if self.layout == PagedKV.HND and len(k_shape) == 4:
            return k_shape[1]
        return self.n_kv_heads


class _Layer:
    """A C-side layer description over the caller's memory; free() after the call."""

    def __init__(self, fn, seqs, o_proj, writable, paged=None):
        if not seqs:
            raise Error(Status.INVALID_ARGUMENT, "%s: at least one sequence is needed" % fn)
        self.views = []
        self.raw = _n.defkvb_layer_new(len(seqs))
        self.shape = []
        self.paged = None
        try:
            if paged is not None:
                self.paged, keep, k_shape = paged._build(fn, "paged", len(seqs) * paged._rows_per_seq(), len(seqs),
                                                         writable)
                self.views.append(keep)
                _n.defkvb_layer_set_paged(self.raw, self.paged)
                hk = paged._kv_heads(k_shape)
                self.shape = [(hk, int(n)) for n in keep[1]]
            for b, s in enumerate(seqs):
                if paged is None and (s.keys is None or s.values is None):
                    raise Error(Status.INVALID_ARGUMENT, "%s: sequence %d needs keys and values" % (fn, b))
                for which, name, t in ((0, "queries", s.queries), (1, "attention", s.attention),
                                       (2, "keys", s.keys), (3, "values", s.values)):
                    if t is None:
                        continue
                    what = name if len(seqs) == 1 else "seqs[%d].%s" % (b, name)
                    v = _View(fn, what, t, writable and which >= 2)
                    v.set(fn, what, self.raw, b, which)
                    self.views.append(v)
                    if which == 2:
                        self.shape.append(v.heads_and_len())
            if o_proj is not None:
                v = _View(fn, "o_proj", o_proj, False)
                v.set(fn, "o_proj", self.raw, 0, 4)
                self.views.append(v)
        except BaseException:
            self.free()
            raise

    def heads_entries(self):
        return sum(h for h, _ in self.shape), sum(h * n for h, n in self.shape)

    def free(self):
        if self.raw is not None:
            _n.defkvb_layer_free(self.raw)
            self.raw = None
        if self.paged is not None:
            _n.defkvb_paged_free(self.paged)
            self.paged = None


def _seqs(seqs, queries, keys, values, attention):
    if seqs is not None:
        return list(seqs)
    return [Sequence(keys, values, queries=queries, attention=attention)]


class Context:
    """A library context (backend, threads, scratch memory). ``close()`` or ``with`` frees it."""

    def __init__(self, backend=Backend.CPU, threads=0, device_index=-1):
        if isinstance(backend, str):
            names = {"auto": Backend.AUTO, "cpu": Backend.CPU, "cuda": Backend.CUDA, "vulkan": Backend.VULKAN}
            if backend not in names:
                raise Error(Status.INVALID_ARGUMENT, "Context: backend %r is not one of %s" % (backend, sorted(names)))
            backend = names[backend]
        self._lock = threading.RLock()
        self._streams = weakref.WeakSet()  # open streams: close() destroys them before the context
        self._ctx = _n.defkvb_context_create(int(backend), int(threads), int(device_index))
        if self._ctx is None:
            raise Error(_n.defkvb_last_create_status(), _caller_message("Context", _n.defkv_last_error_global()))

    def close(self):
        """Frees the context and closes its open streams (idempotent)."""
        with self._lock:
            if self._ctx is not None:
                for st in list(self._streams):  # a stream points at its context: it goes first
                    st._destroy()
                self._streams.clear()
                _n.defkv_context_destroy(self._ctx)
                self._ctx = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_ctx", None) is not None:
            self.close()

    @property
    def backend(self):
        with self._lock:
            self._open("Context.backend")
            return _n.defkv_context_backend(self._ctx)

    def _open(self, fn):
        if self._ctx is None:
            raise Error(Status.INVALID_STATE, "%s: the context is closed" % fn)

    def _fail(self, fn, status):
        raise Error(status, _caller_message(fn, _n.defkv_context_last_error(self._ctx)))

    def select(self, params, queries=None, keys=None, values=None, o_proj=None, attention=None, *, seqs=None,
               paged=None):
        """Scores one layer with params.method and returns the Selection of entries to keep.
        One sequence by keyword (queries or attention, keys, values), or a batch: seqs=[Sequence].
        A paged cache: paged=PagedKV(...) in place of keys and values."""
        fn = "Context.select"
        with self._lock:
            self._open(fn)
            layer = _Layer(fn, _seqs(seqs, queries, keys, values, attention), o_proj, False, paged)
            try:
                n = _n.defkvb_kept_count(self._ctx, params._raw, layer.raw)
                if n < 0:
                    self._fail(fn, n)
                heads, entries = layer.heads_entries()
                sel = Selection(heads, entries, n)
                raw = sel._raw()
                try:
                    st = _n.defkvb_select(self._ctx, params._raw, layer.raw, raw)
                finally:
                    _n.defkvb_selection_free(raw)
                if st < 0:
                    self._fail(fn, st)
                return sel
            finally:
                layer.free()

    def compact_inplace(self, selection, keys=None, values=None, queries=None, o_proj=None, *, seqs=None):
        """Moves each head's kept entries to the front of its rows of keys and values, in the
        caller's own arrays/tensors (which must be writable)."""
        fn = "Context.compact_inplace"
        if not isinstance(selection, Selection):
            raise Error(Status.INVALID_ARGUMENT, "%s: selection must be a Selection from select()" % fn)
        with self._lock:
            self._open(fn)
            layer = _Layer(fn, _seqs(seqs, queries, keys, values, None), o_proj, True)
            try:
                raw = selection._raw(with_outputs=False)
                try:
                    st = _n.defkvb_compact_inplace(self._ctx, layer.raw, raw)
                finally:
                    _n.defkvb_selection_free(raw)
                if st < 0:
                    self._fail(fn, st)
            finally:
                layer.free()

    def compact_paged(self, selection, paged, dst=None):
        """Compacts a paged cache after select() and returns the freed page ids (int32 array, row
        by row in table order) for your page allocator.

        dst None: in place. Each block-table row's kept entries move to the front of the row's
        own slots and the row's pages past those still in use are freed (per head for "head";
        "nhd"/"hnd" heads share pages, so a sequence keeps the pages of its longest head).
        dst a PagedKV("head", ..., n_kv_heads=Hk): rows, one per (sequence, KV head) as in
        selection.head_lens, holding at least pages_needed() pages each; every head's kept
        entries are gathered there and every source page is freed."""
        fn = "Context.compact_paged"
        if not isinstance(selection, Selection):
            raise Error(Status.INVALID_ARGUMENT, "%s: selection must be a Selection from select()" % fn)
        if not isinstance(paged, PagedKV) or (dst is not None and not isinstance(dst, PagedKV)):
            raise Error(Status.INVALID_ARGUMENT, "%s: paged and dst must be PagedKV descriptions" % fn)
        n_seqs = len(paged.seq_lens) if paged.seq_lens is not None else 0
        with self._lock:
            self._open(fn)
            # Compaction reads the cache only: sequences without tensors.
            layer = _Layer(fn, [Sequence() for _ in range(max(n_seqs, 1))], None, dst is None, paged)
            rdst = None
            try:
                if dst is not None:
                    rdst, keep, _ = dst._build(fn, "dst", len(selection.head_lens), None, True)
                raw = selection._raw(with_outputs=False)
                try:
                    n = _n.defkvb_compact_paged(self._ctx, layer.raw, raw, rdst, 0, 0)  # counts only
                    if n < 0:
                        self._fail(fn, n)
                    freed = np.zeros(n + 1, np.int32)  # never empty: a NULL freed_pages only counts
                    n = _n.defkvb_compact_paged(self._ctx, layer.raw, raw, rdst, freed.__array_interface__["data"][0], n)
                finally:
                    _n.defkvb_selection_free(raw)
                if n < 0:
                    self._fail(fn, n)
                return freed[:n]
            finally:
                if rdst is not None:
                    _n.defkvb_paged_free(rdst)
                layer.free()

    def stream(self, params, stream_params):
        """Starts a decode-time eviction Stream: params gives the method (snapkv, ada-snapkv,
        defensivekv, layer-defensivekv or streamingllm), window, kernel, scale and n_sink;
        stream_params (a StreamParams) the shape, capacity, interval, aggregation and budget.
        Closing the context closes the stream."""
        return Stream(self, params, stream_params)

    def select_global(self, params, layers):
        """Layer-DefensiveKV over several layers: layers is a list of dicts with queries (or
        attention), keys, values and o_proj (or seqs=[Sequence] and o_proj). Returns one
        Selection per layer."""
        fn = "Context.select_global"
        with self._lock:
            self._open(fn)
            g = _n.defkvb_global_create(self._ctx, params._raw, len(layers))
            if g is None:
                self._fail(fn, _n.defkvb_last_create_status())
            try:
                shapes = []
                for i, l in enumerate(layers):
                    layer = _Layer(fn, _seqs(l.get("seqs"), l.get("queries"), l.get("keys"), l.get("values"),
                                             l.get("attention")), l.get("o_proj"), False)
                    try:
                        st = _n.defkvb_global_add_layer(g, i, layer.raw)
                        shapes.append(layer.heads_entries())
                    finally:
                        layer.free()
                    if st < 0:
                        self._fail(fn, st)
                st = _n.defkv_global_select(g)
                if st < 0:
                    self._fail(fn, st)
                out = []
                for i, (heads, entries) in enumerate(shapes):
                    n = _n.defkvb_global_layer_kept_count(g, i)
                    if n < 0:
                        self._fail(fn, n)
                    sel = Selection(heads, entries, n)
                    raw = sel._raw()
                    try:
                        st = _n.defkvb_global_layer_selection(g, i, raw)
                    finally:
                        _n.defkvb_selection_free(raw)
                    if st < 0:
                        self._fail(fn, st)
                    out.append(sel)
                return out
            finally:
                _n.defkv_global_destroy(g)


def _global_fail(fn, status):
    raise Error(status, _caller_message(fn, _n.defkv_last_error_global()))


def pages_needed(head_lens, page_size):
    """Pages each (sequence, KV head) needs for its kept entries, ceil(head_lens[i] / page_size),
    and their total: ``(pages, total)``, what to allocate before ``compact_paged`` into new pages."""
    fn = "pages_needed"
    lens = _int32_array(fn, "head_lens", head_lens, 1)
    pages = np.zeros(lens.size + 1, np.int32)
    a = lambda x: x.__array_interface__["data"][0] if x.size else 0
    total = _n.defkvb_paged_pages_needed(a(lens), lens.size, int(page_size), a(pages))
    if total < 0:
        _global_fail(fn, total)
    return pages[:lens.size], total


def next_slots(lens, block_tables, page_size):
    """Where each block-table row's next token goes when decoding after compaction:
    ``(slot_page, slot_offset)``; row i (length lens[i], block_tables a 2-D int array) appends at
    slot slot_offset[i] of page slot_page[i], or, where slot_page[i] is -1, the row is full:
    allocate a page, append its id to the row and write at slot 0."""
    fn = "next_slots"
    lens = _int32_array(fn, "lens", lens, 1)
    tables = _int32_array(fn, "block_tables", block_tables, 2)
    if tables.shape[0] < lens.size:
        raise Error(Status.INVALID_ARGUMENT, "%s: block_tables has %d rows, expected %d" % (fn, tables.shape[0], lens.size))
    page, offset = np.zeros(lens.size + 1, np.int32), np.zeros(lens.size + 1, np.int32)
    a = lambda x: x.__array_interface__["data"][0] if x.size else 0
    st = _n.defkvb_paged_next_slots(a(lens), lens.size, a(tables), tables.shape[1], int(page_size), a(page), a(offset))
    if st < 0:
        _global_fail(fn, st)
    return page[:lens.size], offset[:lens.size]


# -------------------------------------------------------------------------------------------
# Decode-time eviction: streams
# -------------------------------------------------------------------------------------------

class Aggregation:
    """defkv_stream_aggregation values: how a stream combines an entry's scores across rounds."""
    LATEST = 0     # the current round's score only (kvpress DecodingPress)
    MAX = 1        # the running maximum over every round that scored the entry (default)
    MAX_DECAY = 2  # r = max(decay * r, s): a maximum that fades


_AGGREGATIONS = {"latest": Aggregation.LATEST, "max": Aggregation.MAX, "max_decay": Aggregation.MAX_DECAY}
_STREAM_FIELDS = ("n_layers", "n_heads", "n_kv_heads", "head_dim", "capacity", "interval", "aggregation",
                  "budget", "slack", "decay")


class StreamParams:
    """Every field of defkv_stream_params, starting from the library's defaults (n_layers 1,
    interval 128, aggregation MAX, slack 0 = interval, decay 0.9); the shape fields, capacity
    and budget must be set:
    ``StreamParams(n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, capacity=4096, budget=512)``.
    Fields are attributes: n_layers, n_heads (H), n_kv_heads (Hk), head_dim (d), capacity (rows
    per head in each layer's cache), interval (steps between rounds, >= window), aggregation
    (an Aggregation value or "latest", "max", "max_decay"), budget (entries per head after a
    round, >= window + n_sink), slack, decay.
    """

    def __init__(self, **fields):
        object.__setattr__(self, "_raw", _n.defkv_stream_params())
        for k, v in fields.items():
            setattr(self, k, v)

    def __getattr__(self, name):
        if name in _STREAM_FIELDS:
            return getattr(self._raw, name)
        raise AttributeError(name)

    def __setattr__(self, name, value):
        if name not in _STREAM_FIELDS:
            raise AttributeError("StreamParams has no field %r (fields: %s)" % (name, ", ".join(_STREAM_FIELDS)))
        if name == "aggregation" and isinstance(value, str):
            if value.lower() not in _AGGREGATIONS:
                raise Error(Status.INVALID_ARGUMENT, "StreamParams: aggregation %r is not one of %s"
                            % (value, sorted(_AGGREGATIONS)))
            value = _AGGREGATIONS[value.lower()]
        setattr(self._raw, name, value)

    def __repr__(self):
        return "StreamParams(%s)" % ", ".join("%s=%r" % (k, getattr(self, k)) for k in _STREAM_FIELDS)


class StreamCache:
    """One layer's cache in a stream round: ``keys`` and ``values`` [Hk, C, d] with C at least
    every head's length (typically the whole [Hk, capacity, d] cache), writable, compacted in
    place; or ``paged``, a PagedKV (its seq_lens is not read: the stream knows each head's
    length; "head" layout: one block-table row per KV head). ``o_proj`` [D, H*d] is needed by
    defensivekv and layer-defensivekv streams."""

    def __init__(self, keys=None, values=None, *, paged=None, o_proj=None):
        self.keys, self.values, self.paged, self.o_proj = keys, values, paged, o_proj


def _int32(fn, what, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise Error(Status.INVALID_ARGUMENT, "%s: %s is a %s, expected an int" % (fn, what, type(value).__name__))
    if not -2 ** 31 <= int(value) < 2 ** 31:
        raise Error(Status.INVALID_ARGUMENT, "%s: %s is %d, outside int32" % (fn, what, value))
    return int(value)


class Stream:
    """Decode-time eviction over the caches of a model's layers (defkv_stream). Per decoding
    step and layer the engine writes the token's K/V at row ``head_lens(layer)[k]`` of each KV
    head of its cache, calls ``append(layer, 1)`` and ``push_queries(layer, q)`` (post-rotary
    queries [H, n, d]); when ``due()``, ``round(caches)`` scores, evicts down to the budget and
    compacts the caches in place (the window and the sinks always stay).

    ``Context.stream(params, stream_params)`` or ``Stream(ctx, params, stream_params)``. Every
    call goes through the context (its lock). ``close()`` or ``with`` frees the stream; closing
    the context closes it too, and later calls raise ``defkv.Error`` (INVALID_STATE).
    Errors leave the stream and the caches unchanged.
    """

    def __init__(self, context, params, stream_params):
        fn = "Context.stream"
        self._s = None
        if not isinstance(context, Context):
            raise Error(Status.INVALID_ARGUMENT, "%s: context must be a defkv.Context" % fn)
        if not isinstance(params, Params):
            raise Error(Status.INVALID_ARGUMENT, "%s: params must be a defkv.Params" % fn)
        if not isinstance(stream_params, StreamParams):
            raise Error(Status.INVALID_ARGUMENT, "%s: stream_params must be a defkv.StreamParams" % fn)
        self._context = context
        with context._lock:
            context._open(fn)
            s = _n.defkvb_stream_create(context._ctx, params._raw, stream_params._raw)
            if s is None:
                context._fail(fn, _n.defkvb_last_create_status())
            self._s = s
            # The shape as created (stream_params may change afterwards).
            self.n_layers, self.n_kv_heads = int(stream_params.n_layers), int(stream_params.n_kv_heads)
            self.capacity = int(stream_params.capacity)
            context._streams.add(self)

    def _destroy(self):
        """Frees the C stream (the context's lock is held, or the stream is unreachable)."""
        if self._s is not None:
            _n.defkv_stream_destroy(self._s)
            self._s = None

    def close(self):
        """Frees the stream (idempotent)."""
        with self._context._lock:
            self._destroy()
            self._context._streams.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_s", None) is not None:
            self.close()

    def _open(self, fn):
        if self._s is None or self._context._ctx is None:
            raise Error(Status.INVALID_STATE, "%s: the stream is closed (or its context is)" % fn)

    def append(self, layer, n):
        """Registers n new entries the engine wrote after the last live row of every head of
        layer (at rows head_lens(layer)[k] onwards)."""
        fn = "Stream.append"
        layer, n = _int32(fn, "layer", layer), _int32(fn, "n", n)
        with self._context._lock:
            self._open(fn)
            st = _n.defkv_stream_append(self._s, layer, n)
            if st < 0:
                self._context._fail(fn, st)

    def push_queries(self, layer, queries):
        """Pushes the post-rotary queries [H, n, d] of the newest n steps of layer (a NumPy
        array or a DLPack tensor; copied: the stream keeps the last window of them). Each call
        counts n steps towards due()."""
        fn = "Stream.push_queries"
        layer = _int32(fn, "layer", layer)
        with self._context._lock:
            self._open(fn)
            v = _View(fn, "queries", queries, False)
            if v.dltensor is not None:
                st = _n.defkvb_stream_push_dlqueries(self._s, layer, v.dltensor)
                if st < 0 and _n.defkvb_dlpack_error():
                    raise Error(st, _caller_message(fn, _n.defkvb_dlpack_error()).replace(": ", ": queries: ", 1))
            else:
                st = _n.defkvb_stream_push_queries(self._s, layer, *v._args())
            if st < 0:
                self._context._fail(fn, st)

    def due(self):
        """True when a round is due: interval steps pushed to some layer since the last round,
        or more than budget + slack entries per head in what a round's budget covers."""
        fn = "Stream.due"
        with self._context._lock:
            self._open(fn)
            d = _n.defkvb_stream_due(self._s)
            if d < 0:
                self._context._fail(fn, d)
            return d != 0

    def head_lens(self, layer):
        """The live entries of each KV head of layer (int32 array [Hk]): where the next token's
        K/V go."""
        fn = "Stream.head_lens"
        layer = _int32(fn, "layer", layer)
        with self._context._lock:
            self._open(fn)
            lens = np.zeros(self.n_kv_heads + 1, np.int32)  # never empty
            st = _n.defkvb_stream_head_lens(self._s, layer, lens.__array_interface__["data"][0])
            if st < 0:
                self._context._fail(fn, st)
            return lens[:self.n_kv_heads]

    def round(self, caches, *, selections=True):
        """Runs a round over every layer: caches, one StreamCache (or dict of its fields) per
        layer, are compacted in place (rows past a head's new length are left as they were; a
        paged cache's pages past ceil(head_len / page_size) are no longer used). Returns one
        Selection per layer (head_lens and cu_seqlens per KV head, indices the kept rows of the
        live entries before the round, keep_mask and scores [Hk * capacity], zero past a head's
        length), or None with selections=False."""
        fn = "Stream.round"
        try:
            caches = [c if isinstance(c, StreamCache) else StreamCache(**c) for c in caches]
        except TypeError as e:
            raise Error(Status.INVALID_ARGUMENT, "%s: caches must be StreamCache objects (or dicts of keys, values, "
                                                 "paged, o_proj): %s" % (fn, e))
        with self._context._lock:
            self._open(fn)
            if len(caches) != self.n_layers:
                raise Error(Status.INVALID_ARGUMENT, "%s: %d caches, expected one per layer (%d)"
                            % (fn, len(caches), self.n_layers))
            hk, cap, nl = self.n_kv_heads, self.capacity, self.n_layers
            rc = _n.defkvb_stream_caches_new(nl)
            if rc is None:
                raise Error(Status.OUT_OF_MEMORY, "%s: could not allocate the caches' description" % fn)
            keep, paged = [], []  # what the description points at: alive until the call returns
            try:
                for l, c in enumerate(caches):
                    if c.paged is not None and not isinstance(c.paged, PagedKV):
                        raise Error(Status.INVALID_ARGUMENT, "%s: caches[%d].paged must be a PagedKV" % (fn, l))
                    for which, name, t in ((0, "keys", c.keys), (1, "values", c.values), (2, "o_proj", c.o_proj)):
                        if t is None:
                            continue
                        what = "caches[%d].%s" % (l, name)
                        v = _View(fn, what, t, which < 2)
                        v.set_stream_cache(fn, what, rc, l, which)
                        keep.append(v)
                    if c.paged is not None:
                        rows = hk if c.paged.layout == PagedKV.HEAD else 1
                        p, k, _ = c.paged._build(fn, "caches[%d].paged" % l, rows, None, True)
                        paged.append(p)
                        keep.append(k)
                        _n.defkvb_stream_caches_set_paged(rc, l, p)
                a = lambda x: x.__array_interface__["data"][0]
                if not selections:
                    st = _n.defkvb_stream_round(self._s, rc, nl, hk, cap, 0, 0, 0, 0, 0)
                    if st < 0:
                        self._context._fail(fn, st)
                    return None
                per = hk * cap
                hl = np.zeros(nl * hk, np.int32)
                cu = np.zeros(nl * (hk + 1), np.int32)
                idx = np.zeros(nl * per + 1, np.int32)  # never empty (capacity 0 is the library's error)
                km = np.zeros(nl * per + 1, np.uint8)
                sc = np.zeros(nl * per + 1, np.float32)
                st = _n.defkvb_stream_round(self._s, rc, nl, hk, cap, a(hl), a(cu), a(idx), a(km), a(sc))
                if st < 0:
                    self._context._fail(fn, st)
                out = []
                for l in range(nl):
                    sel = Selection.__new__(Selection)
                    sel.head_lens = hl[l * hk:(l + 1) * hk]
                    sel.cu_seqlens = cu[l * (hk + 1):(l + 1) * (hk + 1)]
                    sel._indices = idx[l * per:(l + 1) * per]
                    sel._capacity = per
                    sel.keep_mask = km[l * per:(l + 1) * per]
                    sel.scores = sc[l * per:(l + 1) * per]
                    out.append(sel)
                return out
            finally:
                for p in paged:
                    _n.defkvb_paged_free(p)
                _n.defkvb_stream_caches_free(rc)
