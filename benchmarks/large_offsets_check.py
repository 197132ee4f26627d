"""Sparse MLA where element offsets pass 2^31: q of 32768 tokens x 128 heads x 576 is 2.4e9
elements, so a kernel that multiplied a token index by a stride in int32 would read and write the
wrong rows for the last tokens. Checks the forward (bf16 keys, both kernels; FP8 FlashMLA layout)
and the backward on the last tokens against the references run on those tokens alone.

The first tokens select keys from the lower half of the cache only and the last ``--tail`` tokens
from the upper half, so dKV's upper half is theirs alone and is checked against the reference too.

    python benchmarks/large_offsets_check.py                 # CUDA, ~20 GB
    python benchmarks/large_offsets_check.py --tokens 64 --heads 4   # a dry run of the logic
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mla_compiler.kernels import fp8_reference as fr  # noqa: E402
from mla_compiler.kernels import gluon_sparse_mla as gk  # noqa: E402
from mla_compiler.kernels import reference  # noqa: E402
from mla_compiler.kernels import triton_sparse_mla as tk  # noqa: E402

SCALE = 576**-0.5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(tokens: int, heads: int, s_kv: int, topk: int, tail: int, device: str):
    g = torch.Generator(device=device).manual_seed(11)
    q = torch.randn(tokens, heads, 576, device=device, dtype=torch.bfloat16, generator=g)
    kv = torch.randn(s_kv, 1, 576, device=device, dtype=torch.bfloat16, generator=g)
    half = s_kv // 2
    idx = torch.randint(0, half, (tokens, 1, topk), device=device, dtype=torch.int32, generator=g)
    idx[-tail:] = torch.randint(half, s_kv, (tail, 1, topk), device=device, dtype=torch.int32, generator=g)
    idx[-tail:, :, ::5] = -1  # invalid slots in the checked tokens too
    return q, kv, idx


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--heads", type=int, default=128)
    p.add_argument("--s-kv", type=int, default=4096)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--tail", type=int, default=4)
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, kv, idx = inputs(a.tokens, a.heads, a.s_kv, a.topk, a.tail, device)
    print(f"q {tuple(q.shape)}: {q.numel():.3e} elements ({'past' if q.numel() > 2**31 else 'below'} 2^31)", flush=True)
    tail = slice(a.tokens - a.tail, a.tokens)
    failures = 0

    def report(name: str, err: float, limit: float) -> None:
        nonlocal failures
        ok = err < limit
        failures += not ok
        print(f"{name}: rel err {err:.2e} ({'ok' if ok else 'FAIL'})", flush=True)

    ref_out, ref_lse = reference.sparse_attn_reference(q[tail], kv, idx[tail], SCALE, 512)
    for label, env in (("triton", "0"), ("dispatch", None)):  # the dispatch's output is the one kept
        if env is not None:
            os.environ[gk.ENV_OFF] = env
        try:
            out, lse = tk.forward(q, kv, idx, SCALE, 512)
        finally:
            os.environ.pop(gk.ENV_OFF, None)
        report(f"forward bf16 keys ({label}) out", rel(out[tail], ref_out), 1e-2)
        report(f"forward bf16 keys ({label}) lse", rel(lse[tail], ref_lse), 1e-4)

    latent, scale, rope = fr.flashmla_views(fr.quantize_flashmla(kv[:, 0, :512].float(), kv[:, 0, 512:]))
    r_out, r_lse = fr.sparse_attn_fp8kv_reference(q[tail], latent, scale, rope, idx[tail], SCALE, 512)
    for label, env in (("dispatch", None), ("triton", "0")):
        if env is not None:
            os.environ[gk.ENV_OFF] = env
        try:
            f_out, f_lse = tk.forward_fp8(q, latent, scale, rope, idx, SCALE, 512)
        finally:
            os.environ.pop(gk.ENV_OFF, None)
        report(f"forward FP8 FlashMLA ({label}) out", rel(f_out[tail], r_out), 1e-2)
        report(f"forward FP8 FlashMLA ({label}) lse", rel(f_lse[tail], r_lse), 1e-4)
        del f_out, f_lse

    dout = torch.randn_like(out)
    dq, dkv, _ = tk.backward(dout, None, q, kv, out, lse, idx, SCALE, 512)
    ref_dq, ref_dkv, _ = reference.sparse_attn_backward_reference(dout[tail], None, q[tail], kv, out[tail], lse[tail], idx[tail], SCALE, 512)
    upper = slice(a.s_kv // 2, a.s_kv)
    report("backward dq", rel(dq[tail], ref_dq), 2e-2)
    report("backward dkv (rows only the last tokens select)", rel(dkv[upper], ref_dkv[upper]), 2e-2)
    print("LARGE OFFSETS", "FAILED" if failures else "OK", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
