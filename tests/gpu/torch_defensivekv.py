#!/usr/bin/env python3
"""PyTorch reference timing of DefensiveKV scoring and selection for one Llama-3.1-8B-shaped
layer (H=32, Hk=8, d=128, D=4096, bf16, W=32) on the GPU, the same work cuda_bench times for
defkv: window attention, pooling + mass renormalisation + max over (g, w), the prior-risk clamp,
the projected value norm (token chunks, never the full L x D product), the mass threshold stage
and the head-adaptive top-k. Prints `TORCH L=... ms=...` lines (median of timed runs, wall clock after a synchronize).

    python3 torch_defensivekv.py [L ...]     default: 8192 32768 131072
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

H, HK, D_HEAD, D_MODEL, W, KERNEL = 32, 8, 128, 4096, 32, 5
G = H // HK


def defensivekv(q, k, v, wo, ratio=0.5, chunk=16384):
    L = k.shape[1]
    P = L - W
    scale = D_HEAD ** -0.5
    kk = k.repeat_interleave(G, 0)                                   # [H, L, d]
    logits = torch.matmul(q, kk.transpose(1, 2)).float() * scale     # [H, W, L]
    pos = torch.arange(L, device=q.device)
    causal = pos[None, :] > (P + torch.arange(W, device=q.device))[:, None]
    logits.masked_fill_(causal[None], float("-inf"))
    a = torch.softmax(logits, dim=-1)
    pre = a[..., :P]
    pooled = F.avg_pool1d(pre.reshape(H * W, 1, P), KERNEL, 1, KERNEL // 2).reshape(H, W, P)
    pooled = pooled / pooled.sum(-1, keepdim=True) * pre.sum(-1, keepdim=True)
    mx = pooled.reshape(HK, G * W, P).amax(1)
    mx = torch.maximum(mx, mx.mean(-1, keepdim=True))
    avg = pre.reshape(HK, G * W, P).mean(1)
    omega = a[..., max(0, P - W):P].sum(-1).mean()
    pn = torch.zeros(HK, P, device=q.device, dtype=torch.float32)
    for h in range(H):
        wo_h = wo[:, h * D_HEAD:(h + 1) * D_HEAD]                    # [D, d]
        for t0 in range(0, P, chunk):
            t1 = min(P, t0 + chunk)
            pn[h // G, t0:t1] += torch.matmul(v[h // G, t0:t1], wo_h.t()).float().abs().sum(-1)
    pn /= G
    score = mx * pn / pn.sum(0, keepdim=True)
    full = torch.empty(HK, L, device=q.device)
    full[:, :P] = score
    top = score.max()
    full[:, P:] = top
    # mass threshold stage on the averaged attention
    an = avg / avg.sum(-1, keepdim=True)
    vals, order = an.sort(dim=-1, descending=True)
    cum = vals.cumsum(-1)
    tau = 0.9 - omega
    count = (cum < tau).sum(-1).clamp(max=int(P * (1 - ratio) - W))
    rank = torch.arange(P, device=q.device)[None, :]
    must = torch.zeros(HK, P, dtype=torch.bool, device=q.device)
    must.scatter_(1, order, rank < count[:, None])
    full[:, :P] = torch.where(must, top, full[:, :P])
    budget = int(L * (1 - ratio) * HK)
    keep = torch.topk(full.flatten(), budget).indices
    return keep


def main():
    Ls = [int(x) for x in sys.argv[1:]] or [8192, 32768, 131072]
    # DEFKV_TORCH_DEVICE=cpu runs a smoke test of this script on a machine without a GPU.
    dev = torch.device(os.environ.get("DEFKV_TORCH_DEVICE", "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("SKIPPED: PyTorch sees no CUDA device")
        return 77
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    wo = (torch.rand(D_MODEL, H * D_HEAD, device=dev) * 0.04 - 0.02).to(torch.bfloat16)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"TORCH version={torch.__version__} device=\"{name}\"")
    for L in Ls:
        q = (torch.rand(H, W, D_HEAD, device=dev) * 2 - 1).to(torch.bfloat16)
        k = (torch.rand(HK, L, D_HEAD, device=dev) * 2 - 1).to(torch.bfloat16)
        v = (torch.rand(HK, L, D_HEAD, device=dev) * 2 - 1).to(torch.bfloat16)
        keep = defensivekv(q, k, v, wo)
        sync()
        assert keep.numel() == int(L * 0.5 * HK), keep.numel()
        times = []
        for _ in range(3 if L > 100000 else 5):
            t0 = time.perf_counter()
            defensivekv(q, k, v, wo)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        print(f"TORCH L={L} phase=defensivekv_whole_layer ms={times[len(times) // 2]:.3f}", flush=True)
        del q, k, v
    return 0


if __name__ == "__main__":
    sys.exit(main())
