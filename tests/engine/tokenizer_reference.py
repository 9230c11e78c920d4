#!/usr/bin/env python3
"""Checks the engine's tokenizer against an independent implementation: Hugging Face
`tokenizers` built from the vocabulary and merges stored in the GGUF file, with SmolLM2's
pre-tokenizer (individual digits, then byte-level GPT-2 split). Exit 77 (CTest skip) when the
`tokenizers` module or the cached model/text is missing.

usage: tokenizer_reference.py ENGINE MODEL TEXT MAX_CHARS
"""
import os
import struct
import subprocess
import sys

SKIP = 77


def read_gguf_vocab(path):
    with open(path, "rb") as f:
        def r(fmt):
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))

        if f.read(4) != b"GGUF":
            raise SystemExit(f"{path}: not a GGUF file")
        r("I")
        _, nkv = r("QQ")
        sizes = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

        def rs():
            (n,) = r("Q")
            return f.read(n).decode("utf-8")

        def rv(t):
            if t == 8:
                return rs()
            if t == 9:
                at, n = r("IQ")
                return [rv(at) for _ in range(n)]
            return r(sizes[t])[0]

        meta = {}
        for _ in range(nkv):
            k = rs()
            (t,) = r("I")
            meta[k] = rv(t)
    return meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]


def main():
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    engine, model, text_path, max_chars = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers
    except ImportError:
        print(f"SKIPPED: the Python module 'tokenizers' is not installed for {sys.executable} "
              "(tools/install-deps.sh makes ~/.cache/defkv/venv with it; or set DEFKV_TOKENIZERS_PYTHON "
              "to an interpreter that has it)")
        return SKIP
    for p in (model, text_path):
        if not os.path.isfile(p):
            print(f"SKIPPED: {p} is not cached; run tools/engine/fetch_assets.sh")
            return SKIP
    tokens, merges = read_gguf_vocab(model)
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                              merges=[tuple(m.split(" ")) for m in merges]))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    # The same normalisation as the engine's load_text: no BOM, LF line ends, from chapter 1.
    text = open(text_path, "rb").read().decode("utf-8").lstrip("\ufeff").replace("\r\n", "\n")
    first = text.find("CHAPTER 1. Loomings.")
    again = text.find("CHAPTER 1. Loomings.", first + 10) if first >= 0 else -1
    if again >= 0:
        first = again
    if first >= 0:
        text = text[first:]
    if len(text) > max_chars:
        cut = text.rfind("\n", 0, max_chars)
        text = text[:cut if cut >= max_chars // 2 else max_chars]
    ref = tk.encode(text).ids
    out = subprocess.run([engine, "tokenize", "--model", model, "--text", text_path, "--max-chars", str(max_chars)],
                         capture_output=True, text=True, check=True).stdout
    ours = [int(x) for x in out.split()]
    if not ref:
        print("FAIL: the reference produced no tokens")
        return 1
    for i, (a, b) in enumerate(zip(ref, ours)):
        if a != b:
            print(f"FAIL: first difference at token {i}: reference {ref[i:i + 5]}, engine {ours[i:i + 5]}, "
                  f"text {tk.decode(ref[max(0, i - 3):i + 5])!r}")
            return 1
    if len(ref) != len(ours):
        print(f"FAIL: reference has {len(ref)} tokens, engine {len(ours)}")
        return 1
    print(f"PASS: {len(ref)} tokens identical to Hugging Face tokenizers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
