"""The warp-specialized (Gluon) sparse MLA forward against the Triton forward, at the DeepSeek-V3.2
decode shape (batch 64, s_q 2, 128 heads, topk 2048, s_kv 32768), for bf16 keys and the two FP8
latents (FlashMLA's 656-byte layout, e4m3 with one scale a row). Timed in interleaved rounds;
the check part compares against the pure-torch references on awkward inputs first.

    python benchmarks/bench_ws_decode.py check          # correctness, small shapes
    python benchmarks/bench_ws_decode.py time --rounds 5 --out ws.json
    python benchmarks/bench_ws_decode.py stress --repeats 200   # bitwise repeatability
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_sparse_mla import bench, decode_inputs, flops_fwd, fp8_key_sets, prefill_inputs, rel, write_results  # noqa: E402

from mla_compiler.kernels import fp8_reference as fr  # noqa: E402
from mla_compiler.kernels.awkward_inputs import awkward_inputs, poison_unselected  # noqa: E402
from mla_compiler.kernels import gluon_sparse_mla as gk  # noqa: E402
from mla_compiler.kernels import reference  # noqa: E402
from mla_compiler.kernels import triton_sparse_mla as tk  # noqa: E402

SCALE = 192**-0.5 * (0.1 * math.log(40) + 1) ** 2


def triton_only(fn):
    """fn with the warp-specialized kernel switched off (the Triton forward's own numbers)."""
    def run():
        os.environ[gk.ENV_OFF] = "0"
        try:
            return fn()
        finally:
            del os.environ[gk.ENV_OFF]
    return run


def check() -> int:
    failures = 0
    for heads, topk in ((80, 200), (128, 2048), (64, 64)):
        q, kv, idx = awkward_inputs(heads=heads, topk=topk)
        clean = kv.clone()
        poison_unselected(kv)
        ref_out, ref_lse = reference.sparse_attn_reference(q, kv, idx, SCALE, 512)
        out, lse = gk.forward(q, kv[:, 0, :512], None, kv[:, 0, 512:], idx, SCALE)
        fin = torch.isfinite(ref_lse)
        err, dl = rel(out, ref_out), (lse[fin] - ref_lse[fin]).abs().max().item()
        ok = err < 1e-2 and dl < 1e-3 and torch.isinf(lse[2]).all().item() and (out[2] == 0).all().item()
        print(f"bf16 keys h{heads} topk{topk}: rel err {err:.2e}, max |dlse| {dl:.2e}: {'ok' if ok else 'FAIL'}", flush=True)
        failures += not ok
        # FP8: quantize the clean keys, then poison the unselected rows of every part.
        for name, parts in fp8_key_sets(clean).items():
            latent, scale, rope = parts
            poison_unselected(latent, scale, rope)
            r_out, r_lse = fr.sparse_attn_fp8kv_reference(q, latent, scale, rope, idx, SCALE, 512)
            for label, launch in (("", None), (" one-ring", dict(CHUNK_BUFFERS=False, FOLD_SCALE=False)),
                                  (" unsplit", dict(SPLIT_S=False, CHUNK_BUFFERS=False, FOLD_SCALE=False)), (" dequantized", dict(FOLD_SCALE=False)), (" producer-default", dict(PRODUCER_DEFAULT=True, CONSUMER_REGS=192, PRODUCER_REGS=120)),
                                  (" in-registers", dict(IN_SLOT=False, CONSUMER_REGS=192, PRODUCER_REGS=120, PRODUCER_DEFAULT=True))):
                out, lse = gk.forward(q, latent, scale, rope, idx, SCALE, launch=launch)
                err, dl = rel(out, r_out), (lse[fin] - r_lse[fin]).abs().max().item()
                ok = err < 1e-2 and dl < 1e-3 and torch.isinf(lse[2]).all().item() and (out[2] == 0).all().item()
                print(f"FP8 {name}{label} h{heads} topk{topk}: rel err {err:.2e}, max |dlse| {dl:.2e}: {'ok' if ok else 'FAIL'}", flush=True)
                failures += not ok
    return failures


def stress(repeats: int) -> int:
    """Bitwise repeatability under back-to-back launches: a hand-off race between the partitions
    would show as an output that differs from the first run's."""
    bad = 0
    for shape, make in (("decode", decode_inputs), ("awkward h80", lambda: awkward_inputs(t=300))):
        q, kv, idx = make()
        kv = torch.nan_to_num(kv)
        fp8 = fp8_key_sets(kv)
        for name, fn in (
            ("bf16", lambda: gk.forward(q, kv[:, 0, :512], None, kv[:, 0, 512:], idx, SCALE)),
            ("FP8 FlashMLA", lambda: gk.forward(q, *fp8["flashmla"], idx, SCALE)),
            ("FP8 row", lambda: gk.forward(q, *fp8["row"], idx, SCALE)),
        ):
            first, lse0 = fn()
            diff = 0
            for _ in range(repeats):
                out, lse = fn()
                diff += int(not (torch.equal(out, first) and torch.equal(lse, lse0)))
            print(f"stress {shape} {name}: {repeats} launches, {diff} differ from the first", flush=True)
            bad += diff
    return bad


def timing(rounds: int, launches: list[dict], out_path: str | None, shape: str) -> None:
    q, kv, idx = decode_inputs() if shape == "decode" else prefill_inputs()
    fl = flops_fwd(idx, q.shape[1], 576, 512, kv.shape[0])
    fp8 = fp8_key_sets(kv)
    ref_out, _ = triton_only(lambda: tk.forward(q, kv, idx, SCALE, 512))()
    cands = [
        ("triton bf16", triton_only(lambda: tk.forward(q, kv, idx, SCALE, 512))),
        ("triton FP8 FlashMLA", triton_only(lambda: tk.forward_fp8(q, *fp8["flashmla"], idx, SCALE, 512))),
        ("triton FP8 row", triton_only(lambda: tk.forward_fp8(q, *fp8["row"], idx, SCALE, 512))),
        ("dispatch bf16 (policy)", lambda: tk.forward(q, kv, idx, SCALE, 512)),
        ("dispatch FP8 FlashMLA (policy)", lambda: tk.forward_fp8(q, *fp8["flashmla"], idx, SCALE, 512)),
        ("dispatch FP8 row (policy)", lambda: tk.forward_fp8(q, *fp8["row"], idx, SCALE, 512)),
    ]
    for cfg in launches:
        tag = f"{cfg['CONSUMER_REGS']}/{cfg['PRODUCER_REGS']} n{cfg['BLOCK_N']} s{cfg['STAGES']}{' in-slot' if cfg['IN_SLOT'] else ''}{' split' if cfg['SPLIT_S'] else ''}{' pd' if cfg['PRODUCER_DEFAULT'] else ''}{' chunked' if cfg['CHUNKED'] else ''}{' chunk-buffers' if cfg['CHUNK_BUFFERS'] else ''}{' fold' if cfg['FOLD_SCALE'] else ''}"
        cands += [
            (f"ws bf16 {tag}", lambda c=cfg: gk.forward(q, kv[:, 0, :512], None, kv[:, 0, 512:], idx, SCALE, launch=c)),
            (f"ws FP8 FlashMLA {tag}", lambda c=cfg: gk.forward(q, *fp8["flashmla"], idx, SCALE, launch=c)),
            (f"ws FP8 row {tag}", lambda c=cfg: gk.forward(q, *fp8["row"], idx, SCALE, launch=c)),
        ]
    errs, times = {}, {name: [] for name, _ in cands}
    for name, fn in cands:
        try:
            out, _ = fn()
            torch.cuda.synchronize()
            errs[name] = rel(out, ref_out)
        except Exception as exc:  # a launch that does not fit: reported, not timed
            errs[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(f"{name}: {errs[name]}", flush=True)
    live = [(n, f) for n, f in cands if not isinstance(errs[n], str)]
    for _ in range(rounds):
        for name, fn in live:
            times[name].append(bench(fn))
    rows = []
    base = statistics.median(times["triton bf16"])
    for name, _ in live:
        ms = statistics.median(times[name])
        rows.append(dict(impl=name, ms=ms, tflops=fl / ms / 1e9, vs_triton_bf16=base / ms, err_vs_bf16_keys=errs[name],
                         spread=max(times[name]) / min(times[name])))
    print(f"\n[{shape}] {'impl':35s} {'ms':>7s} {'TFLOPS':>7s} {'vs bf16':>8s} {'err':>9s} {'spread':>6s}")
    for r in rows:
        print(f"{r['impl']:44s} {r['ms']:7.3f} {r['tflops']:7.0f} {r['vs_triton_bf16']:7.2f}x {r['err_vs_bf16_keys']:9.2e} {r['spread']:6.2f}")
    if out_path:
        write_results(out_path, shape=shape, rows=rows, errors={k: v for k, v in errs.items() if isinstance(v, str)})


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("part", choices=["check", "time", "stress"])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--launches", default="216/72/64/2/1", help="consumer regs/producer regs/BLOCK_N/STAGES/IN_SLOT 0|1[/SPLIT_S 0|1[/PRODUCER_DEFAULT 0|1[/CHUNKED 0|1[/CHUNK_BUFFERS 0|1]]]], comma-separated")
    p.add_argument("--shape", choices=["decode", "prefill"], default="decode")
    p.add_argument("--out")
    a = p.parse_args()
    if a.part == "check":
        return 1 if check() else 0
    if a.part == "stress":
        return 1 if stress(a.repeats) else 0
    launches = []
    for spec in a.launches.split(","):
        c, pr, n, s, f, *opt = (int(x) for x in spec.split("/"))
        opt = opt + [1, 0, 0, 0][len(opt):]
        # FOLD_SCALE (the default for FP8 rows) where the launch can take it (CHUNK_BUFFERS, SPLIT_S).
        launches.append(dict(CONSUMER_REGS=c, PRODUCER_REGS=pr, BLOCK_N=n, STAGES=s, IN_SLOT=bool(f), SPLIT_S=bool(opt[0]),
                             PRODUCER_DEFAULT=bool(opt[1]), CHUNKED=bool(opt[2]), CHUNK_BUFFERS=bool(opt[3]),
                             FOLD_SCALE=bool(opt[0] and opt[3])))
    timing(a.rounds, launches, a.out, a.shape)
    return 0


if __name__ == "__main__":
    sys.exit(main())
