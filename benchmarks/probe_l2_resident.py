"""How much of each decode kernel's time is its gathers from HBM: the V3.2 decode shape (batch 64,
s_q 2, 128 heads, top-k 2048 of 32768) timed as benchmarked, and again with every token's top-k a
random order of the same 2048 cache rows, which then stay in L2 (1.3 MB of FP8 rows, 2.4 MB of
bf16 keys). The work is the same (as many valid keys a token, the same products); only where the
gathered rows come from differs. A kernel that runs much faster from L2 waits on its gathers; one
that does not is bound by its own schedule. CUDA graphs, interleaved rounds, medians.

    python benchmarks/probe_l2_resident.py [--rounds 5] [--out probe.json]
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_fp8_mma import SCALE  # noqa: E402
from bench_sparse_mla import decode_inputs, fp8_key_sets, graphed_rounds, write_results  # noqa: E402

from mla_compiler.kernels import gluon_fp8_mma_vregs as fv  # noqa: E402
from mla_compiler.kernels import gluon_sparse_mla as ws  # noqa: E402


def l2_resident_indices(idx: torch.Tensor, rows: int = 2048, seed: int = 1) -> torch.Tensor:
    """Indices shaped as ``idx`` [T, 1, topk] (topk <= rows) where each token's are a random order
    of cache rows 0 .. rows - 1."""
    t, _, topk = idx.shape
    if topk > rows:
        raise ValueError(f"l2_resident_indices: top-k {topk} > rows {rows}; pass rows >= top-k")
    g = torch.Generator(device=idx.device).manual_seed(seed)
    order = torch.rand(t, rows, device=idx.device, generator=g).argsort(-1)[:, :topk]
    return order.to(idx.dtype).view(t, 1, topk)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out")
    a = p.parse_args()
    q, kv, idx = decode_inputs()
    near = l2_resident_indices(idx)
    rows = fp8_key_sets(kv)["row"]
    bf16 = (kv[:, 0, :512], None, kv[:, 0, 512:])
    kernels = {
        "ws bf16 keys": lambda i: ws.forward(q, *bf16, i, SCALE),
        "ws FP8 row (scale folded)": lambda i: ws.forward(q, *rows, i, SCALE),
        "FP8 products (vregs)": lambda i: fv.forward(q, *rows, i, SCALE),
    }
    cands = {}
    for name, fn in kernels.items():
        cands[f"{name}, HBM gathers"] = lambda fn=fn: fn(idx)
        cands[f"{name}, L2-resident rows"] = lambda fn=fn: fn(near)
    times = graphed_rounds(cands, a.rounds)
    result = {name: dict(ms=statistics.median(t), spread=max(t) / min(t)) for name, t in times.items()}
    print(f"\n{'kernel':48s} {'HBM ms':>8s} {'L2 ms':>8s} {'L2 / HBM':>9s}")
    for name in kernels:
        hbm, l2 = result[f"{name}, HBM gathers"]["ms"], result[f"{name}, L2-resident rows"]["ms"]
        print(f"{name:48s} {hbm:8.4f} {l2:8.4f} {l2 / hbm:9.3f}")
    if a.out:
        write_results(a.out, times=result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
