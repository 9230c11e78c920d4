"""Minimal safetensors reading/writing for the CLI tests (standard library only).

Independent of the C++ reader under test: it parses the format from its description."""
import json
import struct

DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
              "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_FMT = {"F32": "f", "F64": "d", "I32": "i", "I64": "q", "U8": "B", "F16": "e"}


def read_raw(path):
    """Returns (header dict without __metadata__, metadata dict, data bytes)."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {}) or {}
    return header, meta, blob[8 + n:]


def tensor_bytes(header, data, name):
    b, e = header[name]["data_offsets"]
    return data[b:e]


def values(header, data, name):
    info = header[name]
    raw = tensor_bytes(header, data, name)
    code = _FMT[info["dtype"]]
    size = struct.calcsize("<" + code)
    return list(struct.unpack("<%d%s" % (len(raw) // size, code), raw))


def write_raw(path, tensors, meta, header_len_override=None, raw_header=None):
    """tensors: list of (name, dtype, shape, bytes). Writes a valid file unless overridden."""
    header = {}
    if meta:
        header["__metadata__"] = meta
    off = 0
    body = b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        body += raw
    h = raw_header if raw_header is not None else json.dumps(header).encode("utf-8")
    while len(h) % 8:
        h += b" "
    n = len(h) if header_len_override is None else header_len_override
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + h + body)


def tensors_of(path):
    """List of (name, dtype, shape, bytes) in offset order, plus metadata."""
    header, meta, data = read_raw(path)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return [(k, v["dtype"], v["shape"], tensor_bytes(header, data, k)) for k, v in items], meta
