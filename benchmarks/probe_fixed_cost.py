"""How much of a decode program's time is fixed (prologue, epilogue, the first blocks' latency)
and how much is per key: each kernel timed at the V3.2 decode shape (batch 64, s_q 2, 128
heads) over several top-k, and a straight line fitted to ms against top-k. The intercept is
what a persistent grid (the next program's first copies under this one's epilogue) could hide
at most. CUDA graphs, interleaved rounds, medians.

    python benchmarks/probe_fixed_cost.py [--rounds 5] [--topk 256 512 1024 2048] [--out probe.json]
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_fp8_mma import SCALE  # noqa: E402
from bench_sparse_mla import decode_inputs, fp8_key_sets, graphed_rounds, write_results  # noqa: E402

from mla_compiler.kernels import gluon_fp8_mma_split as fs  # noqa: E402
from mla_compiler.kernels import gluon_fp8_mma_vregs as fv  # noqa: E402
from mla_compiler.kernels import gluon_sparse_mla as ws  # noqa: E402


def fit(xs, ys):
    """Least-squares line y = a + b x: (a, b)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--topk", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--out")
    a = p.parse_args()
    fns = {}
    for topk in a.topk:
        q, kv, idx = decode_inputs(topk=topk)
        row = fp8_key_sets(kv)["row"]
        lat, rope = kv[:, 0, :512], kv[:, 0, 512:]
        fns[("FP8 products (vregs)", topk)] = lambda q=q, row=row, idx=idx: fv.forward(q, *row, idx, SCALE)
        fns[("FP8 products (split)", topk)] = lambda q=q, row=row, idx=idx: fs.forward(q, *row, idx, SCALE)
        # Nothing copied (PROBE=2, the output is wrong): the consumers' pace alone.
        fns[("split, consumers alone", topk)] = lambda q=q, row=row, idx=idx: fs.forward(q, *row, idx, SCALE, launch=dict(PROBE=2))
        fns[("ws bf16 keys", topk)] = lambda q=q, lat=lat, rope=rope, idx=idx: ws.forward(q, lat, None, rope, idx, SCALE)
        fns[("ws FP8 row (default launch)", topk)] = lambda q=q, row=row, idx=idx: ws.forward(q, *row, idx, SCALE)
    times = graphed_rounds(fns, a.rounds)
    rows = []
    for name in dict.fromkeys(k[0] for k in fns):
        ms = [statistics.median(times[(name, k)]) for k in a.topk]
        fixed, per_key = fit(a.topk, ms)
        at_2048 = fixed + per_key * 2048
        rows.append(dict(impl=name, topk=a.topk, ms=ms, fixed_ms=fixed, per_1k_keys_ms=per_key * 1024, fixed_share_at_2048=fixed / at_2048))
    print(f"\n{'kernel':28} " + " ".join(f"{'k=' + str(k):>9}" for k in a.topk) + f" {'fixed ms':>9} {'ms/1k keys':>10} {'fixed share':>11}")
    for r in rows:
        print(f"{r['impl']:28} " + " ".join(f"{m:9.4f}" for m in r["ms"])
              + f" {r['fixed_ms']:9.4f} {r['per_1k_keys_ms']:10.4f} {100 * r['fixed_share_at_2048']:10.1f}%")
    if a.out:
        write_results(a.out, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
