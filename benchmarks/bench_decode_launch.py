"""Decode launch choices timed in interleaved rounds: few heads (16 a GPU, DeepSeek-V3.2 at TP 8)
and small batch, where one program per (token, head block) leaves SMs idle and single timings of
random-gather kernels move between runs. Each round times every candidate once, in order; the table
gives the median over rounds and the spread (max/min). Each candidate is timed as a CUDA-graph
replay (``--eager``: as a call), so the host's dispatch and launch overhead, which exceeds a
few-head decode kernel's 0.08 ms on a busy host, is not counted.

    python benchmarks/bench_decode_launch.py --rounds 5 --out decode_launch.json
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_sparse_mla import bench, decode_inputs, fp8_key_sets, graphed, write_results  # noqa: E402

from mla_compiler.kernels import triton_sparse_mla as tk  # noqa: E402

SCALE = 192**-0.5 * (0.1 * math.log(40) + 1) ** 2


def candidates(heads: int, tokens: int) -> list[tuple[str, dict]]:
    """(label, launch) pairs of the Triton kernel: the policy (None) and the alternatives the
    sweep found close."""
    block_h = tk.LaunchPolicy.heads(heads)
    few = tokens * math.ceil(heads / block_h) < 256
    out = [("policy", None)]
    for n, w, st in ((64, 8, 2), (64, 8, 3), (32, 4, 3), (32, 4, 1)):
        for sp in (1,) if not few else (2, 4) if tokens * math.ceil(heads / block_h) > 64 else (1, 4, 8):
            out.append((f"{n}x{w}w{st}s split{sp}", dict(BLOCK_H=block_h, BLOCK_N=n, num_warps=w, num_stages=st, SPLITS=sp)))
    return out


# With few heads (16 a GPU): the Triton kernel's best launches of the last sweep per key type
# (benchmarks/RESULTS.md), and the few-head Gluon kernel's launches.
FEW_HEAD_TRITON = {
    "bf16": [dict(BLOCK_N=32, num_warps=4, num_stages=3, SPLITS=2)],
    "fp8 FlashMLA": [dict(BLOCK_N=32, num_warps=4, num_stages=1, SPLITS=2, DEQUANT=tk.DEQUANT_FP32)],
    "fp8 row": [dict(BLOCK_N=64, num_warps=8, num_stages=1, SPLITS=2, DEQUANT=tk.DEQUANT_FP32, PREFETCH=True),
                dict(BLOCK_N=32, num_warps=4, num_stages=3, SPLITS=2, DEQUANT=tk.DEQUANT_FOLD, PREFETCH=True)],
}
# REG_A: the keys read from the ring slot into the MMAs' registers (gluon_fewhead_rega), 4 / 3 slots.
REG_A_GLUON = [dict(WGMMA=True, REG_A=True), dict(WGMMA=True, REG_A=True, STAGES=3)]
FEW_HEAD_GLUON = {
    "bf16": [dict(BLOCK_N=64, STAGES=2), dict(BLOCK_N=32, STAGES=3, QK_CHAINS=4)],
    "fp8 FlashMLA": [dict(WS=False), dict(WS=True, Q_HELD=True), dict(WGMMA=True), dict(WGMMA=True, L2_AHEAD=4), dict(WGMMA=True, F16=False),
                     dict(WGMMA=True, F16=False, L2_AHEAD=4), dict(WGMMA=True, DQ_WARPS=8), dict(WGMMA=True, DQ_WARPS=8, L2_AHEAD=4)]
    + REG_A_GLUON,
    "fp8 row": [dict(WS=False), dict(WS=True, Q_HELD=True), dict(WGMMA=True), dict(WGMMA=True, L2_AHEAD=4), dict(WGMMA=True, F16=False),
                     dict(WGMMA=True, F16=False, L2_AHEAD=4), dict(WGMMA=True, DQ_WARPS=8), dict(WGMMA=True, DQ_WARPS=8, L2_AHEAD=4)]
    + REG_A_GLUON,
}


# --quick (few heads): the policy and these few-head launches only, a minute of GPU time.
QUICK_GLUON = {"bf16": [dict(BLOCK_N=64, STAGES=2)],
               "fp8 FlashMLA": [dict(WGMMA=True), dict(WGMMA=True, F16=False), dict(WGMMA=True, DQ_WARPS=8)] + REG_A_GLUON,
               "fp8 row": [dict(WGMMA=True), dict(WGMMA=True, F16=False), dict(WGMMA=True, DQ_WARPS=8)] + REG_A_GLUON}


def shape_rows(name: str, batch: int, heads: int, rounds: int, quick: bool = False, graphs: bool = True) -> list[dict]:
    q, kv, idx = decode_inputs(batch=batch, heads=heads)
    t = q.shape[0]
    fp8 = fp8_key_sets(kv)
    keys = {
        "bf16": lambda cfg: tk.forward(q, kv, idx, SCALE, 512, launch=cfg),
        "fp8 FlashMLA": lambda cfg: tk.forward_fp8(q, *fp8["flashmla"], idx, SCALE, 512, launch=cfg),
        "fp8 row": lambda cfg: tk.forward_fp8(q, *fp8["row"], idx, SCALE, 512, launch=cfg),
    }
    runs = []
    if heads < 64:
        from mla_compiler.kernels import gluon_fewhead as fh

        block_h = tk.LaunchPolicy.heads(heads)
        operands = {"bf16": (kv[:, 0, :512], None, kv[:, 0, 512:]), "fp8 FlashMLA": fp8["flashmla"], "fp8 row": fp8["row"]}
        for key, fn in keys.items():
            runs.append((key, "policy", fn, None))
            for cfg in () if quick else FEW_HEAD_TRITON[key]:
                runs.append((key, f"triton {cfg}", fn, dict(cfg, BLOCK_H=block_h)))
            for cfg in (QUICK_GLUON if quick else FEW_HEAD_GLUON)[key]:
                for sp in (None,) if cfg.get("WGMMA") else (None, 1, 2):  # its split choice is the same as the others'
                    launch = dict(cfg) if sp is None else dict(cfg, SPLITS=sp)
                    runs.append((key, f"few-head {launch}", lambda cfg, ops=operands[key]: fh.forward(q, *ops, idx, SCALE, launch=cfg), launch))
    else:
        forms = {"bf16": [{}], "fp8 FlashMLA": [dict(DEQUANT=tk.DEQUANT_FP32)],
                 "fp8 row": [dict(DEQUANT=tk.DEQUANT_FP32), dict(DEQUANT=tk.DEQUANT_FOLD, PREFETCH=True)]}
        for key, fn in keys.items():
            for label, cfg in candidates(heads, t):
                for form in forms[key] if cfg is not None else [{}]:
                    full = None if cfg is None else dict(cfg, **form)
                    runs.append((key, label + ("" if not form else f" {form}"), fn, full))
    times: dict = {}
    failed: set = set()
    replays: dict = {}
    # Round 0 compiles (and, with graphs, captures) every launch and is not kept: a launch timed
    # right after seconds of compilation otherwise runs on an idle-clocked GPU (spreads near 2 in
    # the first rows).
    for r in range(rounds + 1):
        for key, label, fn, full in runs:
            if (key, label) in failed:
                continue
            try:
                if (key, label) not in replays:
                    replays[(key, label)] = graphed(lambda fn=fn, full=full: fn(full)) if graphs else (lambda fn=fn, full=full: fn(full))
                ms = bench(replays[(key, label)], warmup_ms=25, rep_ms=100 if r else 10)
            except Exception as exc:  # noqa: BLE001 - a launch that does not fit is a row
                failed.add((key, label))
                times[(key, label)] = [float("nan")]
                print(f"{key} {label}: {type(exc).__name__}", flush=True)
                continue
            if r:
                times.setdefault((key, label), []).append(ms)
    rows = []
    for (key, label), ts in times.items():
        rows.append(dict(shape=name, keys=key, launch=label, ms=statistics.median(ts), spread=max(ts) / min(ts), ms_rounds=ts))
        print(f"{name:<16} {key:<13} {label:<60} {rows[-1]['ms']:.4f} ms  spread {rows[-1]['spread']:.2f}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "decode_launch.json"))
    parser.add_argument("--quick", action="store_true", help="few heads: the policy and the default few-head launches only")
    parser.add_argument("--shapes", default="b64 h16,b2 h128,b8 h128", help="comma-separated subset of the shape names")
    parser.add_argument("--eager", action="store_true",
                        help="time eager calls instead of CUDA-graph replays (then the host's launch overhead counts wherever it "
                             "exceeds the kernel's time)")
    args = parser.parse_args()
    rows = []
    wanted = args.shapes.split(",")
    for name, batch, heads in (("b64 h16", 64, 16), ("b2 h128", 2, 128), ("b8 h128", 8, 128), ("b64 h128", 64, 128)):
        if name not in wanted:
            continue
        rows += shape_rows(name, batch, heads, args.rounds, args.quick, not args.eager)
        torch.cuda.empty_cache()
    write_results(args.out, timing="eager" if args.eager else "cuda graph replay", rows=rows)
    print("\nfastest per shape and keys (median of rounds):")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for keys in dict.fromkeys(r["keys"] for r in rows):
            mine = [r for r in rows if r["shape"] == shape and r["keys"] == keys and r["ms"] == r["ms"]]
            best = min(mine, key=lambda r: r["ms"])
            pol = next(r for r in mine if r["launch"] == "policy")
            print(f"{shape:<10} {keys:<13} policy {pol['ms']:.4f} ms | best {best['ms']:.4f} ms ({best['launch']}, spread {best['spread']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
