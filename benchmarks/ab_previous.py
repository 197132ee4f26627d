"""The sparse MLA forwards as they are against the same forwards at an earlier commit (prepared by
ab_prepare.sh under benchmarks/_ab/), in one process at the V3.2 decode shape (batch 64, s_q 2,
top-k 2048; 128 heads: the warp-specialized kernel and the vregs FP8-products one; --heads 16: the
few-head kernel, bf16 keys and both FP8 layouts): each pair's outputs compared (a change meant to
keep the arithmetic must give the same bits), then all timed from CUDA graphs in interleaved rounds
(medians). Extra arguments are launch dicts (JSON) of the FP8-products kernel (gluon_fp8_mma_vregs,
128 heads), timed too.

    bash benchmarks/ab_prepare.sh REV && python benchmarks/ab_previous.py [--rounds 5] [--heads 16] [--only ws] [--scale v3.2]
        ['{"STEP_KEYS": 64}' ...]

``--scale``: the softmax scale, 576^-0.5 (default) or V3.2's (bench_fp8_mma.SCALE, YaRN's mscale
folded in: larger scores, so the FP8-products kernel's lazy reference moves more often).
"""

import argparse
import json
import os
import statistics
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [here, os.path.join(here, "_ab"), os.path.dirname(here)]

from bench_fp8_mma import SCALE as V32_SCALE  # noqa: E402
from bench_sparse_mla import decode_inputs, fp8_key_sets, graphed_rounds  # noqa: E402

from mla_compiler.kernels import gluon_fewhead as fh  # noqa: E402
from mla_compiler.kernels import gluon_fp8_mma_vregs as fv  # noqa: E402
from mla_compiler.kernels import gluon_sparse_mla as ws  # noqa: E402
from old_mla_compiler.kernels import gluon_fewhead as fh_old  # noqa: E402
from old_mla_compiler.kernels import gluon_fp8_mma_vregs as fv_old  # noqa: E402
from old_mla_compiler.kernels import gluon_sparse_mla as ws_old  # noqa: E402


DEQUANTIZED_HOISTED = {"FOLD_SCALE": False, "Q_IN_LOOP": False}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--heads", type=int, default=128, choices=[16, 128])
    p.add_argument("--only", default="", help="only the pairs whose name contains this")
    p.add_argument("--scale", choices=["576", "v3.2"], default="576", help="softmax scale: 576^-0.5, or V3.2's (bench_fp8_mma.SCALE)")
    p.add_argument("--out")
    p.add_argument("launches", nargs="*", type=json.loads)
    a = p.parse_args()
    rev = open(os.path.join(here, "_ab", "REV")).read().strip()
    q, kv, idx = decode_inputs(heads=a.heads)
    keys = fp8_key_sets(kv)
    rows = keys["row"]
    bf16 = (kv[:, 0, :512], None, kv[:, 0, 512:])
    scale = 576**-0.5 if a.scale == "576" else V32_SCALE
    if a.heads == 16:
        pairs = {f"few-head {name}": (lambda k=k: fh.forward(q, *k, idx, scale), lambda k=k: fh_old.forward(q, *k, idx, scale))
                 for name, k in (("FP8 row", rows), ("FP8 FlashMLA", keys["flashmla"]))}
    else:
        pairs = {
            "ws bf16 keys": (lambda: ws.forward(q, *bf16, idx, scale), lambda: ws_old.forward(q, *bf16, idx, scale)),
            "ws FP8 row (default launch)": (lambda: ws.forward(q, *rows, idx, scale), lambda: ws_old.forward(q, *rows, idx, scale)),
            "ws FP8 FlashMLA (default launch)": (lambda: ws.forward(q, *keys["flashmla"], idx, scale),
                                                 lambda: ws_old.forward(q, *keys["flashmla"], idx, scale)),
            # Before FOLD_SCALE this was the FP8 rows' default launch.
            "ws FP8 row (dequantized, Q hoisted)": (lambda: ws.forward(q, *rows, idx, scale, launch=DEQUANTIZED_HOISTED),
                                                    lambda: ws_old.forward(q, *rows, idx, scale)),
            "FP8 products (vregs)": (lambda: fv.forward(q, *rows, idx, scale), lambda: fv_old.forward(q, *rows, idx, scale)),
        }
    pairs = {name: pair for name, pair in pairs.items() if a.only in name}
    cands, same = {}, {}
    for name, (now, then) in pairs.items():
        (o_now, l_now), (o_then, l_then) = now(), then()
        same[name] = dict(out=(o_now.float() - o_then.float()).abs().max().item(), lse=(l_now - l_then).abs().max().item())
        print(f"{name}: largest difference from {rev}: out {same[name]['out']:.3g}, lse {same[name]['lse']:.3g}", flush=True)
        cands[name], cands[f"{name} at {rev}"] = now, then
    if a.heads == 16:  # the reference point (bf16 keys: the same kernel at both commits)
        cands["few-head bf16 keys"] = lambda: fh.forward(q, *bf16, idx, scale)
    for launch in a.launches:
        cands[f"FP8 products (vregs) {launch}"] = lambda launch=launch: fv.forward(q, *rows, idx, scale, launch=launch)
    times = graphed_rounds(cands, a.rounds)
    result = {name: dict(ms=statistics.median(t), spread=max(t) / min(t)) for name, t in times.items()}
    for name, r in result.items():
        print(f"{name:60s} {r['ms']:.4f} ms  spread {r['spread']:.3f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(against=rev, same=same, times=result), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
