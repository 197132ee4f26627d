"""Where the FP8-products kernels' error comes from (CPU, no GPU needed): on tokens of the V3.2
decode shape's inputs (bench_sparse_mla.decode_inputs' distribution: 128 heads, top-k 2048 of
32768, V3.2's softmax scale), the output of the FP8 attention with Q's latent and P' each exact,
rounded to e4m3 (one term) or as two e4m3 terms (``gluon_fp8_mma.e4m3_terms``), against the
exact FP8 arithmetic (keys e4m3 x scale, the rest fp32) and against bf16 keys. One softmax over
all keys (P' under the row's maximum, the largest P' 2^8), not the kernels' blocks; then the
kernels' own arithmetic (``reference_fp8_mma``: 64-key blocks, P' under the lazy reference,
which after a move leaves a row's largest P' at 2 or less, so more of P' meets e4m3's smallest
step 2^-9) with one and two terms, and with two terms under ``tensor_core_model``'s accumulation
in the split kernel's two orders.

    python benchmarks/fp8_error_sources.py [--tokens 4]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mla_compiler.kernels import fp8_reference as fr  # noqa: E402
from mla_compiler.kernels.gluon_fp8_mma import e4m3_terms, quantize_q_rows, reference_fp8_mma  # noqa: E402
from mla_compiler.kernels.tensor_core_model import HOPPER_BITS  # noqa: E402

SCALE = 192**-0.5 * (0.1 * math.log(40) + 1) ** 2


def attend(q, latent, sig, rope, ids, q_terms: int, p_terms: int) -> torch.Tensor:
    """One token's output [H, 512]: terms 0 = exact (fp32), 1 or 2 = that many e4m3 terms."""
    k8, s_k, r = latent[ids].float(), sig[ids].float().reshape(-1), rope[ids].float()
    _, qs = quantize_q_rows(q[:, :512])
    x = q[:, :512].float() / qs[:, None]
    q_lat = x if q_terms == 0 else e4m3_terms(x, q_terms)
    s = (q_lat @ k8.T) * qs[:, None] * s_k[None] + q[:, 512:].float() @ r.T
    p = torch.exp2((s - s.amax(-1, keepdim=True)) * SCALE * math.log2(math.e))
    unit = 2.0**8 / s_k.max()  # P' = P sigma under a reference, at most 2^8
    p_prime = p * s_k[None] * unit
    if p_terms:
        p_prime = e4m3_terms(p_prime, p_terms)
    return (p_prime @ k8) / unit / p.sum(-1, keepdim=True)


def main() -> int:
    a = argparse.ArgumentParser()
    a.add_argument("--tokens", type=int, default=4)
    args = a.parse_args()
    torch.manual_seed(0)
    s_kv, heads, topk = 32768, 128, 2048
    q = torch.randn(args.tokens, heads, 576).to(torch.bfloat16)
    kv = torch.randn(s_kv, 1, 576).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(s_kv)[:topk] for _ in range(args.tokens)])
    latent, sig, rope = fr.quantize_keys(kv, "row")

    def run(q_terms, p_terms):
        return torch.stack([attend(q[t], latent, sig, rope, idx[t], q_terms, p_terms) for t in range(args.tokens)])

    bf16 = torch.stack([torch.softmax(q[t].float() @ kv[idx[t], 0].float().T * SCALE, -1) @ kv[idx[t], 0, :512].float()
                        for t in range(args.tokens)])

    def rel(x, y):
        return ((x - y).norm() / y.norm()).item()

    exact = run(0, 0)
    print(f"the layout alone (exact FP8 against bf16 keys): {rel(exact, bf16):.3e}")
    print(f"{'Q':>8s} {'P':>8s} {'vs exact FP8':>13s} {'vs bf16 keys':>13s}")
    names = {0: "exact", 1: "e4m3", 2: "2 terms"}
    for q_terms in (0, 1, 2):
        for p_terms in (0, 1, 2):
            out = run(q_terms, p_terms)
            print(f"{names[q_terms]:>8s} {names[p_terms]:>8s} {rel(out, exact):13.3e} {rel(out, bf16):13.3e}")
    ids = idx.to(torch.int32).view(args.tokens, 1, topk)
    for terms in (1, 2):
        out, _ = reference_fp8_mma(q, latent, sig, rope, ids, SCALE, block_n=64, lazy=True, terms=terms)
        print(f"the kernels' arithmetic, {terms} term(s): {rel(out, exact):.3e} against exact FP8, {rel(out, bf16):.3e} against bf16 keys")
    for first in (False, True):  # the tensor cores' accumulation (tensor_core_model), as the split kernel orders the terms
        out, _ = reference_fp8_mma(q, latent, sig, rope, ids, SCALE, block_n=64, lazy=True, terms=2, residuals_first=first,
                                   tc_bits=HOPPER_BITS)
        print(f"  with the tensor cores' accumulation modelled, residual terms {'first' if first else 'last'}: "
              f"{rel(out, exact):.3e} against exact FP8, {rel(out, bf16):.3e} against bf16 keys")
    return 0


if __name__ == "__main__":
    sys.exit(main())
