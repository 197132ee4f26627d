"""Where the FP8-MMA kernel's time goes, at the V3.2 decode shape (128 heads): the kernel under
several launch settings (block size, ring depths, how far the producer copies ahead, split or
whole scores; PROBE_SKIP=1 drops the producer's transposes: the output is then wrong, only the
time counts), beside the dequantizing kernel (row scale) and bf16 keys. Each setting is first
checked against reference_fp8_mma on 8 tokens. CUDA graphs, interleaved rounds, medians.

    python benchmarks/probe_fp8_mma.py [--rounds 3] [--launch '{"BLOCK_N": 32, ...}' ...] [--vregs '{"STAGES": 3}' ...]
        [--split '{"P_STAGES": 2}' ...] [--ws '{"Q_IN_LOOP": true}' ...] [--shape prefill] [--out probe.json]

``--vregs`` adds the kernel without transposes (gluon_fp8_mma_vregs) under the launch given;
``--split`` the kernel with scores and values in separate warpgroups (gluon_fp8_mma_split);
``--ws`` the warp-specialized kernel (bf16 keys and FP8 rows, its default launch: the row scale folded) under the launch given,
checked against its default launch.
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_sparse_mla import decode_inputs, fp8_key_sets, graphed_rounds, prefill_inputs, rel  # noqa: E402

from mla_compiler.kernels import gluon_fp8_mma as fm  # noqa: E402
from mla_compiler.kernels import gluon_fp8_mma_split as fs  # noqa: E402
from mla_compiler.kernels import gluon_fp8_mma_vregs as fv  # noqa: E402
from mla_compiler.kernels import gluon_sparse_mla as ws  # noqa: E402

SETTINGS = [
    {},
    dict(PROBE_SKIP=1),
    dict(PROBE_SKIP=2),
    dict(fm.ONE_PRODUCER),
    dict(fm.ONE_PRODUCER, PROBE_SKIP=1),
    dict(STAGES=3, VT_STAGES=1),
    dict(VT_STAGES=3),
    dict(fm.ONE_PRODUCER, STAGES=3, VT_STAGES=1, AHEAD=2),
    dict(fm.ONE_PRODUCER, SPLIT=0),
    dict(fm.ONE_PRODUCER, SPLIT=0, BLOCK_N=32, STAGES=6, VT_STAGES=2, AHEAD=5),
]


def name_of(launch: dict) -> str:
    return "fp8-mma " + (" ".join(f"{k}={v}" for k, v in launch.items()) or "default")


def first_call(name: str, fn, errors: dict):
    """``fn()``'s result, or None where it raises (a launch that does not compile, launch or pass
    its checks): then reported in ``errors[name]`` and printed, not fatal."""
    try:
        return fn()
    except Exception as e:
        errors[name] = f"failed: {type(e).__name__}: {str(e)[:300]}"
        print(name, errors[name], flush=True)
        return None


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--launch", action="append", type=json.loads, help="a launch dict (JSON); repeat; default: SETTINGS")
    p.add_argument("--vregs", action="append", type=json.loads, default=[],
                   help="a launch dict (JSON) of the kernel without transposes (gluon_fp8_mma_vregs); repeat")
    p.add_argument("--split", action="append", type=json.loads, default=[],
                   help="a launch dict (JSON) of the kernel with scores and values in separate warpgroups (gluon_fp8_mma_split); repeat")
    p.add_argument("--ws", action="append", type=json.loads, default=[],
                   help="a launch dict (JSON) of the warp-specialized kernel (gluon_sparse_mla), timed with bf16 keys and FP8 rows; "
                        "repeat")
    p.add_argument("--shape", choices=["decode", "prefill"], default="decode",
                   help="decode: batch 64, s_q 2, top-k 2048 of 32768; prefill: 4096 queries, top-k 2048 of 8192")
    p.add_argument("--out")
    a = p.parse_args()
    settings = a.launch or SETTINGS
    q, kv, idx = decode_inputs() if a.shape == "decode" else prefill_inputs()
    fp8 = fp8_key_sets(kv)
    scale = 576**-0.5
    errors, cands = {}, {}
    runs = [(fm, launch, name_of(launch)) for launch in settings]
    runs += [(fv, launch, "vregs " + (" ".join(f"{k}={v}" for k, v in launch.items()) or "default")) for launch in a.vregs]
    runs += [(fs, launch, "split " + (" ".join(f"{k}={v}" for k, v in launch.items()) or "default")) for launch in a.split]
    for kernel, launch, name in runs:
        first = first_call(name, lambda kernel=kernel, launch=launch: kernel.forward(q[:8], *fp8["row"], idx[:8], scale, launch=launch),
                           errors)
        if first is None:
            continue
        out, lse = first
        ref = dict(block_n=launch.get("BLOCK_N", 64)) if kernel is fm else kernel.reference_settings(launch)
        ref_out, ref_lse = fm.reference_fp8_mma(q[:8], *fp8["row"], idx[:8], scale, **ref)
        errors[name] = dict(out=rel(out, ref_out), lse=(lse - ref_lse).abs().max().item())
        print(name, errors[name], flush=True)
        cands[name] = lambda kernel=kernel, launch=launch: kernel.forward(q, *fp8["row"], idx, scale, launch=launch)
    cands["ws FP8 row (default launch)"] = lambda: ws.forward(q, *fp8["row"], idx, scale)
    cands["ws bf16 keys"] = lambda: ws.forward(q, kv[:, 0, :512], None, kv[:, 0, 512:], idx, scale)
    for launch in a.ws:
        tag = " ".join(f"{k}={v}" for k, v in launch.items())
        for label, keys in (("ws FP8 row (default launch)", fp8["row"]), ("ws bf16 keys", (kv[:, 0, :512], None, kv[:, 0, 512:]))):
            name = f"{label} {tag}"
            run = lambda launch=launch, keys=keys: ws.forward(q, *keys, idx, scale, launch=launch)  # noqa: E731
            first = first_call(name, run, errors)  # e.g. FOLD_SCALE with bf16 keys fails: not timed
            if first is None:
                continue
            cands[name] = run
            errors[name] = dict(out=rel(first[0], cands[label]()[0]), against="the default launch")
            print(name, errors[name], flush=True)
    times = graphed_rounds(cands, a.rounds)
    base = statistics.median(times["ws bf16 keys"])
    rows = []
    for name in cands:
        ms = statistics.median(times[name])
        rows.append(dict(impl=name, ms=ms, vs_bf16_keys=base / ms, spread=max(times[name]) / min(times[name]), error=errors.get(name)))
    print(f"\n{'impl':72s} {'ms':>7s} {'vs bf16':>8s} {'out err':>8s}")
    for r in rows:
        err = r["error"]["out"] if isinstance(r["error"], dict) else float("nan")
        print(f"{r['impl']:72s} {r['ms']:7.4f} {r['vs_bf16_keys']:7.2f}x {err:8.1e}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(rows=rows, errors=errors), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
