"""One warp-specialized few-head FP8 launch against the FP8 reference, before anything slower
runs (a hang here is the hand-over's barriers): prints the error and the time of one call.
With --repeats N, back-to-back launches of both few-head FP8 kernels at the V3.2 decode shape
(batch 64, s_q 2, 16 heads, top-k 2048) and at the awkward inputs must give the first launch's
out and lse bit for bit: a hand-over race would show as a launch that differs.

    PYTHONPATH=. python3 benchmarks/fewhead_ws_smoke.py [--repeats 200]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from bench_sparse_mla import decode_inputs  # noqa: E402

from mla_compiler.kernels import fp8_reference as fr  # noqa: E402
from mla_compiler.kernels import gluon_fewhead as fh  # noqa: E402
from mla_compiler.kernels.awkward_inputs import awkward_inputs  # noqa: E402

SCALE = 576**-0.5


def smoke() -> None:
    q, kv, idx = awkward_inputs(heads=16, topk=2048)
    for layout in ("flashmla", "row"):
        latent, scale, rope = fr.quantize_keys(kv, layout)
        ref, ref_lse = fr.sparse_attn_fp8kv_reference(q, latent, scale, rope, idx, SCALE, 512)
        for launch in (dict(WS=True), dict(WGMMA=True), dict(WGMMA=True, SPLITS=1), dict(WGMMA=True, TILES=1, STAGES=5), dict(WGMMA=True, F16=False),
                       dict(WGMMA=True, F16=False, SPLITS=1)):
            t0 = time.time()
            out, lse = fh.forward(q, latent, scale, rope, idx, SCALE, launch=launch)
            torch.cuda.synchronize()
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            lse_err = (lse - ref_lse).abs().max().item()
            print(f"{layout} {launch}: rel err {err:.2e}, max |lse diff| {lse_err:.2e}, first call {time.time() - t0:.1f} s, "
                  f"launch {fh.LAST_LAUNCH}", flush=True)


def stress(repeats: int) -> int:
    bad = 0
    shapes = (("decode b64 h16", lambda: decode_inputs(heads=16)), ("awkward h16", lambda: awkward_inputs(heads=16, topk=2048)))
    for shape, make in shapes:
        q, kv, idx = make()
        kv = torch.nan_to_num(kv)
        for layout in ("flashmla", "row"):
            keys = fr.quantize_keys(kv, layout)
            for launch in (dict(WS=True), dict(WGMMA=True), dict(WGMMA=True, TILES=1, STAGES=5), dict(WS=False), dict(WGMMA=True, F16=False)):
                first, lse0 = fh.forward(q, *keys, idx, SCALE, launch=launch)
                diff = 0
                for _ in range(repeats):
                    out, lse = fh.forward(q, *keys, idx, SCALE, launch=launch)
                    diff += int(not (torch.equal(out, first) and torch.equal(lse, lse0)))
                print(f"stress {shape} {layout} {launch}: {repeats} launches, {diff} differ from the first", flush=True)
                bad += diff
    return bad


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=0)
    args = parser.parse_args()
    smoke()
    if args.repeats:
        raise SystemExit(1 if stress(args.repeats) else 0)
