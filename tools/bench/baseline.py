#!/usr/bin/python3
"""A straightforward PyTorch implementation of defkv's methods, written from the spec
(docs/algorithm.md in the shared docs) in the style of the kvpress presses users run today:
repeat_kv, one batched matmul for the window attention, a float32 softmax, per-head products
with o_proj for the projected value norm (materialised, then an L1 norm), torch.topk for the
selection. It is the side-by-side reference of `defkv bench`, not a second implementation of
the library: nothing here is tuned.

usage: baseline.py WORKDIR
WORKDIR holds meta.json and q.bin, k.bin, v.bin, o.bin (written by `defkv bench`). Writes
result.json (median/min seconds per method, phase times for defensivekv) and keep_<method>.bin
(uint8 [Hk, L] keep masks) there."""
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


def load(path, dtype, shape):
    if dtype == 'f32':
        return torch.from_numpy(np.fromfile(path, dtype=np.float32).reshape(shape))
    if dtype == 'f16':
        return torch.from_numpy(np.fromfile(path, dtype=np.float16).reshape(shape))
    raw = np.fromfile(path, dtype=np.int16).reshape(shape)
    return torch.from_numpy(raw).view(torch.bfloat16)


class Layer:
    def __init__(self, meta, q, k, v, o):
        self.H, self.Hk, self.d, self.D = meta['H'], meta['Hk'], meta['d'], meta['D']
        self.L, self.W = meta['L'], meta['W']
        self.P = self.L - self.W
        self.G = self.H // self.Hk
        self.r = meta['ratio']
        self.n = int(self.L * (1 - self.r))
        self.q, self.k, self.v, self.o = q, k, v, o
        self.kernel = 5


def window_attention(ly):
    """A[h, w, j]: causal softmax of scale * Q.K over j <= P + w, float32."""
    q = ly.q.float()
    k = ly.k.float().repeat_interleave(ly.G, dim=0)  # repeat_kv
    logits = torch.matmul(q, k.transpose(1, 2)) / (ly.d ** 0.5)
    j = torch.arange(ly.L)
    w = torch.arange(ly.W)
    mask = j[None, :] > (ly.P + w)[:, None]
    logits = logits.masked_fill(mask[None], float('-inf'))
    return torch.softmax(logits, dim=-1, dtype=torch.float32)


def pool(x, kernel):
    shape = x.shape
    y = F.avg_pool1d(x.reshape(-1, 1, shape[-1]), kernel_size=kernel, padding=kernel // 2, stride=1)
    return y.reshape(shape)


def projected_norm(ly, n_tokens):
    """pn[k, j] = mean_g || V[k, j] Wo_{kG+g} ||_1, head by head as kvpress does."""
    v = ly.v.float()
    wo = ly.o.float().t().reshape(ly.H, ly.d, ly.D)  # Wo_h = o_proj[:, h*d:(h+1)*d]^T
    norms = []
    for h in range(ly.H):
        prod = torch.matmul(v[h // ly.G, :n_tokens], wo[h])  # [n_tokens, D], materialised
        norms.append(prod.abs().sum(dim=-1))
    return torch.stack(norms).reshape(ly.Hk, ly.G, n_tokens).mean(dim=1)


def snap_scores(ly, A):
    s = pool(A[:, :, :ly.P].mean(dim=1), ly.kernel)  # [H, P]
    s = s.reshape(ly.Hk, ly.G, ly.P).mean(dim=1)
    full = torch.empty(ly.Hk, ly.L)
    full[:, :ly.P] = s
    full[:, ly.P:] = s.max()
    return full


def keep_per_head(scores, n):
    keep = torch.zeros(scores.shape, dtype=torch.uint8)
    idx = scores.topk(min(n, scores.shape[1]), dim=-1).indices
    keep.scatter_(1, idx, 1)
    return keep


def keep_flat(scores, total):
    keep = torch.zeros(scores.numel(), dtype=torch.uint8)
    keep[scores.flatten().topk(min(total, scores.numel())).indices] = 1
    return keep.reshape(scores.shape)


def top_mask(scores, count):
    m = torch.zeros(scores.shape, dtype=torch.bool)
    if count > 0:
        m.scatter_(1, scores.topk(min(count, scores.shape[1]), dim=-1).indices, True)
    return m


INF = float('inf')


def snapkv(ly):
    s = snap_scores(ly, window_attention(ly))
    s[:, ly.P:] = INF
    return keep_per_head(s, ly.n)


def ada_snapkv(ly):
    s = snap_scores(ly, window_attention(ly))
    safe = top_mask(s[:, :ly.P], int(ly.L * (1 - ly.r) * 0.2))
    s[:, :ly.P][safe] = INF
    s[:, ly.P:] = INF
    return keep_flat(s, int(ly.L * (1 - ly.r) * ly.Hk))


def criticalkv(ly):
    s = snap_scores(ly, window_attention(ly))
    must = top_mask(s, int((1 - ly.r) * ly.L * 0.5))
    s2 = (s + 1e-4) * projected_norm(ly, ly.L)
    s2[must] = INF
    return keep_per_head(s2, ly.n)


def defensive_parts(ly, phases=None):
    t0 = time.perf_counter()
    A = window_attention(ly)
    prefix = A[:, :, :ly.P]
    S = pool(prefix, ly.kernel)
    base = prefix.sum(dim=-1, keepdim=True)
    S = S * base / S.sum(dim=-1, keepdim=True)
    m = S.reshape(ly.Hk, ly.G * ly.W, ly.P).amax(dim=1)
    m = torch.maximum(m, m.mean(dim=-1, keepdim=True))
    a = prefix.reshape(ly.Hk, ly.G * ly.W, ly.P).mean(dim=1)
    omega = A[:, :, max(0, ly.P - ly.W):ly.P].sum(dim=-1).mean().item()
    t1 = time.perf_counter()
    pn = projected_norm(ly, ly.P)
    t2 = time.perf_counter()
    s = m * pn / pn.sum(dim=0, keepdim=True)
    a = a / a.sum(dim=-1, keepdim=True)
    tau = 0.9 - omega
    order = a.sort(dim=-1, descending=True)
    csum = order.values.cumsum(dim=-1)
    cap = int(ly.P * (1 - ly.r) - ly.W)
    full = torch.empty(ly.Hk, ly.L)
    full[:, :ly.P] = s
    for k in range(ly.Hk):
        reached = torch.nonzero(csum[k] >= tau)
        c = int(reached[0]) if reached.numel() else 0
        c = max(0, min(c, cap))
        full[k, order.indices[k, :c]] = INF
    full[:, ly.P:] = INF
    keep = keep_flat(full, int(ly.L * (1 - ly.r) * ly.Hk))
    if phases is not None:
        phases['attention'] = t1 - t0
        phases['projected_norm'] = t2 - t1
        phases['rest'] = time.perf_counter() - t2
    return keep


def defensivekv(ly):
    return defensive_parts(ly)


def knorm(ly):
    return keep_per_head(-ly.k.float().norm(dim=-1), ly.n)


def tova(ly):
    q = ly.q[:, ly.W - 1].float()  # [H, d]
    k = ly.k.float().repeat_interleave(ly.G, dim=0)
    a = torch.softmax(torch.einsum('hd,hld->hl', q, k) / (ly.d ** 0.5), dim=-1, dtype=torch.float32)
    s = a.mean(dim=0)[None].repeat(ly.Hk, 1)
    s[:, ly.L - 1] = INF
    return keep_per_head(s, ly.n)


def streamingllm(ly):
    keep = torch.zeros(ly.Hk, ly.L, dtype=torch.uint8)
    keep[:, :4] = 1
    keep[:, ly.L - (ly.n - 4):] = 1
    return keep


METHODS = {'snapkv': snapkv, 'ada-snapkv': ada_snapkv, 'criticalkv': criticalkv, 'defensivekv': defensivekv,
           'knorm': knorm, 'tova': tova, 'streamingllm': streamingllm}


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    wd = sys.argv[1]
    meta = json.load(open(os.path.join(wd, 'meta.json')))
    torch.set_num_threads(int(meta['threads']))
    H, Hk, d, D, L, W, dt = (meta[x] for x in ('H', 'Hk', 'd', 'D', 'L', 'W', 'dtype'))
    ly = Layer(meta, load(os.path.join(wd, 'q.bin'), dt, (H, W, d)), load(os.path.join(wd, 'k.bin'), dt, (Hk, L, d)),
               load(os.path.join(wd, 'v.bin'), dt, (Hk, L, d)), load(os.path.join(wd, 'o.bin'), dt, (D, H * d)))
    result = {'torch_version': torch.__version__, 'threads': torch.get_num_threads()}
    with torch.no_grad():
        for name in meta['methods']:
            fn = METHODS.get(name)
            if fn is None:
                result[name] = {'error': 'not implemented in the baseline'}
                continue
            keep = fn(ly)  # warm-up, and the keep set that is compared before any timing counts
            keep.numpy().astype(np.uint8).tofile(os.path.join(wd, f'keep_{name}.bin'))
            times = []
            phase_runs = []
            for _ in range(int(meta['repeats'])):
                t0 = time.perf_counter()
                if name == 'defensivekv':
                    ph = {}
                    defensive_parts(ly, ph)
                    phase_runs.append(ph)
                else:
                    fn(ly)
                times.append(time.perf_counter() - t0)
            entry = {'median_s': float(np.median(times)), 'min_s': float(min(times))}
            if phase_runs:
                entry['phases'] = {k: float(np.median([p[k] for p in phase_runs])) for k in phase_runs[0]}
            result[name] = entry
    json.dump(result, open(os.path.join(wd, 'result.json'), 'w'), indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
