"""The Triton backward (three passes: dS/P, dQ, dKV) at the DeepSeek-V3.2 prefill shape (4096
queries, 128 heads, top-k 2048) with a short cache that fits in L2 (8192 keys, 9.4 MB) and long
ones that do not (up to 131072 keys, 151 MB), where the order in which programs gather the keys
decides how often they come from HBM. ``--baseline MODULE`` times another copy of the kernel
module in the same rounds, interleaved (an A/B of a kernel change on one device).

    python benchmarks/bench_backward_long.py --out bwd.json
    python benchmarks/bench_backward_long.py --baseline mla_compiler.kernels.old_copy
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_sparse_mla import bench, prefill_inputs, write_results  # noqa: E402

from mla_compiler.kernels import triton_sparse_mla as tk  # noqa: E402

SCALE = 576**-0.5


def flops_bwd(idx: torch.Tensor, heads: int, s_kv: int) -> float:
    """2.5x the forward's products over the valid slots (dS: Q K^T and dO V^T; dQ; dK and dV)."""
    valid = ((idx >= 0) & (idx < s_kv)).sum().item()
    return valid * heads * (576 + 512) * 2 * 2.5


def kernel_times(fn) -> str:
    """GPU milliseconds per kernel name over one call of ``fn`` (torch.profiler), largest first."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    return ", ".join(f"{e.key[:40]} {e.device_time_total / 1e3:.2f}" for e in rows[:6])


def case(s_kv: int, impls: dict, rounds: int) -> list[dict]:
    """One cache length's rows; its tensors are freed when it returns."""
    q, kv, idx = prefill_inputs(s_kv=s_kv)
    out, lse = tk.forward(q, kv, idx, SCALE, 512)
    dout = torch.randn_like(out)
    fl = flops_bwd(idx, q.shape[1], s_kv)
    ref = None
    for name, mod in impls.items():
        dq, dkv, _ = mod.backward(dout, None, q, kv, out, lse, idx, SCALE, 512)
        if ref is None:
            ref = (dq, dkv)
        else:  # the same gradients (dKV's fp32 atomics add in any order)
            for got, want in zip((dq, dkv), ref):
                err = ((got.float() - want.float()).norm() / want.float().norm()).item()
                print(f"s_kv {s_kv} {name}: rel diff {err:.2e} vs the first", flush=True)
    times = {name: [] for name in impls}
    for _ in range(rounds):
        for name, mod in impls.items():
            times[name].append(bench(lambda m=mod: m.backward(dout, None, q, kv, out, lse, idx, SCALE, 512)))
    print(f"s_kv {s_kv} kernels of one backward: {kernel_times(lambda: tk.backward(dout, None, q, kv, out, lse, idx, SCALE, 512))}", flush=True)
    rows = []
    for name in impls:
        ms = statistics.median(times[name])
        rows.append(dict(s_kv=s_kv, impl=name, ms=ms, tflops=fl / ms / 1e9, spread=max(times[name]) / min(times[name])))
        print(f"s_kv {s_kv:7d} {name:9s} {ms:8.2f} ms {fl / ms / 1e9:6.0f} TFLOPS spread {rows[-1]['spread']:.3f}", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--s-kv", default="8192,65536,131072", help="cache lengths, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline", help="module path of another copy of triton_sparse_mla, timed interleaved")
    p.add_argument("--out")
    a = p.parse_args()
    impls = {"backward": tk}
    if a.baseline:
        impls["baseline"] = importlib.import_module(a.baseline)
    rows = []
    for s_kv in (int(x) for x in a.s_kv.split(",")):
        rows += case(s_kv, impls, a.rounds)
        torch.cuda.empty_cache()
    if a.out:
        write_results(a.out, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
