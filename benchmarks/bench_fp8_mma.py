"""FP8 products against FP8 dequantized to bf16, at the DeepSeek-V3.2 decode shape (batch 64, s_q 2,
128 heads, top-k 2048, s_kv 32768), side by side in one run: the warp-specialized kernel with bf16
keys, with an e4m3 latent (FlashMLA's layout and one scale a row) dequantized into bf16 MMAs (one
scale a row also folded into the scores and P, over f16 MMAs: the default), and
the three FP8-products kernels (e4m3 products, one scale a row): scores and values in separate
warpgroups (gluon_fp8_mma_split, the one MLA_COMPILER_FP8_MMA=1 dispatches to), V^T from
registers with both consumers taking scores and values (gluon_fp8_mma_vregs) and V transposed in
shared memory (gluon_fp8_mma), and the split kernel with two-term operands (RESIDUAL_LAUNCH: Q's
latent and P' each as e4m3 plus its e4m3 residual, the exact FP8 arithmetic at twice the e4m3
products). Also the measured ceilings (bf16 and e4m3
matmul rate, device-to-device copy) and each kernel's error against the exact references.
Timed from CUDA graphs in interleaved rounds (medians).

Against the roofline: each kernel's floor is the larger of its bytes over the copy bandwidth and
its products over the matmul rates of their operand types (e4m3 for the FP8-products kernels'
latent products, bf16 for the rest and for every rope product), and "of floor" is that floor
over its time. The targets' lines give the products' floor as a percentage of each target's
time (over 100 % cannot be met at the measured rates), for 16-bit products (what the layout's
own error needs: any e4m3 product adds error of its own) and for e4m3 ones.

    python benchmarks/bench_fp8_mma.py --rounds 5 --out fp8_mma.json
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_sparse_mla import bench, ceilings, decode_inputs, flops_fwd, fp8_key_sets, graphed_rounds, rel, write_results  # noqa: E402

from mla_compiler.kernels import fp8_reference as fr  # noqa: E402
from mla_compiler.kernels import gluon_fp8_mma as fm  # noqa: E402
from mla_compiler.kernels import gluon_fp8_mma_split as fs  # noqa: E402
from mla_compiler.kernels import gluon_fp8_mma_vregs as fv  # noqa: E402
from mla_compiler.kernels import gluon_sparse_mla as ws  # noqa: E402
from mla_compiler.kernels import reference  # noqa: E402

SCALE = 192**-0.5 * (0.1 * math.log(40) + 1) ** 2
DEQUANTIZED = dict(FOLD_SCALE=False)  # the row scale applied to the keys (bf16 MMAs), as before FOLD_SCALE
FP8_ROW_BYTES = 512 + 4 + 128  # e4m3 latent, fp32 scale, bf16 rope


def all_ceilings() -> dict:
    """bench_sparse_mla's ceilings (bf16 matmul, copy) and the e4m3 matmul rate (8192^3)."""
    out = ceilings()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    a8, b8 = a.to(torch.float8_e4m3fn), b.t().contiguous().to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    out["e4m3_tflops"] = 2 * 8192**3 / bench(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16)) / 1e9
    return out


def needed_bytes(q, idx, s_kv, key_row_bytes: int) -> int:
    """What the step must move at least: each selected key row once, Q, the output, the indices."""
    valid = ((idx >= 0) & (idx < s_kv)).sum().item()
    return valid * key_row_bytes + q.numel() * 2 + q.shape[0] * q.shape[1] * 512 * 2 + idx.numel() * 4


def mma_floor_ms(flops: float, e4m3_terms: int, roof: dict) -> float:
    """The time the products alone take at the measured matmul rates: all at bf16's (0), or the
    latent products (1024 of the 1088 products an element: Q K^T over 512 and P V over 512) at
    e4m3's, ``e4m3_terms`` times (2: each operand with its residual), and the rope's at bf16's."""
    if not e4m3_terms:
        return flops / roof["bf16_tflops"] / 1e9
    latent = flops * 1024 / 1088
    return e4m3_terms * latent / roof["e4m3_tflops"] / 1e9 + (flops - latent) / roof["bf16_tflops"] / 1e9


def target_lines(flops: float, base_ms: float, fp8_row_gb: float, roof: dict) -> list[str]:
    """What each speed target asks of the products: its time, and that time's MMA floor as a
    fraction of it (over 100 % cannot be met) for 16-bit and for e4m3 products."""
    lines = []
    for name, ms in (("1.5x bf16 keys", base_ms / 1.5), ("60% HBM (FP8 rows)", fp8_row_gb / (0.6 * roof["copy_tb_s"]))):
        need = {kind: 100 * mma_floor_ms(flops, int(kind == "e4m3"), roof) / ms for kind in ("16-bit", "e4m3")}
        lines.append(f"target {name}: <= {ms:.4f} ms, the products at {need['16-bit']:.0f} % of the bf16 matmul rate "
                     f"(16-bit products) or {need['e4m3']:.0f} % of the e4m3 and bf16 rates (e4m3 products)")
    return lines


def sample_errors(q, kv, idx, fp8) -> dict:
    """Each kernel's relative error on the first 8 query tokens: against the exact FP8 reference
    (keys e4m3 x scale in fp32) and against bf16 keys."""
    qs, ids = q[:8], idx[:8]
    bf16_out, _ = reference.sparse_attn_reference(qs, kv, ids, SCALE, 512)
    out = {}
    for name, parts, fn in (
        ("ws FP8 row (scale folded, f16)", fp8["row"], lambda p: ws.forward(qs, *p, ids, SCALE)),
        ("ws FP8 row (dequantized)", fp8["row"], lambda p: ws.forward(qs, *p, ids, SCALE, launch=DEQUANTIZED)),
        ("FP8 products row, split warpgroups", fp8["row"], lambda p: fs.forward(qs, *p, ids, SCALE)),
        ("FP8 products row, two-term operands", fp8["row"], lambda p: fs.forward(qs, *p, ids, SCALE, launch=fs.RESIDUAL_LAUNCH)),
        ("FP8 products row, V from registers", fp8["row"], lambda p: fv.forward(qs, *p, ids, SCALE)),
        ("FP8 products row, V transposed", fp8["row"], lambda p: fm.forward(qs, *p, ids, SCALE)),
        ("ws FP8 FlashMLA (dequantized)", fp8["flashmla"], lambda p: ws.forward(qs, *p, ids, SCALE)),
    ):
        exact, _ = fr.sparse_attn_fp8kv_reference(qs, *parts, ids, SCALE, 512, exact_keys=True)
        got, _ = fn(parts)
        out[name] = dict(vs_exact_fp8=rel(got, exact), vs_bf16_keys=rel(got, bf16_out), layout_vs_bf16_keys=rel(exact, bf16_out))
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    a = p.parse_args()
    q, kv, idx = decode_inputs()
    s_kv = kv.shape[0]
    fl = flops_fwd(idx, q.shape[1], 576, 512, s_kv)
    fp8 = fp8_key_sets(kv)
    lat, rope = kv[:, 0, :512], kv[:, 0, 512:]
    # (name, call, bytes a key row, e4m3 terms of the latent products: 0 for 16-bit products)
    cands = [
        ("ws bf16 keys", lambda: ws.forward(q, lat, None, rope, idx, SCALE), 576 * 2, 0),
        ("ws FP8 FlashMLA (dequantized)", lambda: ws.forward(q, *fp8["flashmla"], idx, SCALE), 656, 0),
        ("ws FP8 row (scale folded, f16)", lambda: ws.forward(q, *fp8["row"], idx, SCALE), FP8_ROW_BYTES, 0),
        ("ws FP8 row (dequantized)", lambda: ws.forward(q, *fp8["row"], idx, SCALE, launch=DEQUANTIZED), FP8_ROW_BYTES, 0),
        ("FP8 products row, split warpgroups", lambda: fs.forward(q, *fp8["row"], idx, SCALE), FP8_ROW_BYTES, 1),
        ("FP8 products row, two-term operands", lambda: fs.forward(q, *fp8["row"], idx, SCALE, launch=fs.RESIDUAL_LAUNCH), FP8_ROW_BYTES, 2),
        ("FP8 products row, V from registers", lambda: fv.forward(q, *fp8["row"], idx, SCALE), FP8_ROW_BYTES, 1),
        ("FP8 products row, V transposed", lambda: fm.forward(q, *fp8["row"], idx, SCALE), FP8_ROW_BYTES, 1),
    ]
    times = graphed_rounds({name: fn for name, fn, _, _ in cands}, a.rounds)
    roof = all_ceilings()
    errors = sample_errors(q, kv, idx, fp8)
    base = statistics.median(times["ws bf16 keys"])
    rows = []
    for name, _, row_bytes, e4m3_terms in cands:
        ms = statistics.median(times[name])
        gb = needed_bytes(q, idx, s_kv, row_bytes) / 1e9
        floor = max(gb / roof["copy_tb_s"], mma_floor_ms(fl, e4m3_terms, roof))
        # HBM fraction: the bytes needed over the time, against the measured copy bandwidth.
        rows.append(dict(impl=name, ms=ms, tflops=fl / ms / 1e9, vs_bf16_keys=base / ms, needed_gb=gb,
                         hbm_fraction=gb / ms / roof["copy_tb_s"], floor_ms=floor, of_floor=floor / ms,
                         spread=max(times[name]) / min(times[name])))
    targets = target_lines(fl, base, needed_bytes(q, idx, s_kv, FP8_ROW_BYTES) / 1e9, roof)
    print(f"\nceilings: bf16 {roof['bf16_tflops']:.0f} TFLOPS, e4m3 {roof['e4m3_tflops']:.0f} TFLOPS, copy {roof['copy_tb_s']:.2f} TB/s")
    for name, e in errors.items():
        print(f"error {name}: vs exact FP8 {e['vs_exact_fp8']:.2e}, vs bf16 keys {e['vs_bf16_keys']:.2e} (layout alone {e['layout_vs_bf16_keys']:.2e})")
    for line in targets:
        print(line)
    print(f"\n{'impl':36s} {'ms':>7s} {'TFLOPS':>7s} {'vs bf16':>8s} {'HBM %':>6s} {'floor':>7s} {'of floor':>8s} {'spread':>6s}")
    for r in rows:
        print(f"{r['impl']:36s} {r['ms']:7.4f} {r['tflops']:7.0f} {r['vs_bf16_keys']:7.2f}x {100 * r['hbm_fraction']:6.1f} "
              f"{r['floor_ms']:7.4f} {100 * r['of_floor']:7.1f}% {r['spread']:6.2f}")
    if a.out:
        write_results(a.out, ceilings=roof, errors=errors, rows=rows, targets=targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
