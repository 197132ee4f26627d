"""A model of how Hopper's tensor cores add e4m3 products: what an FP8 warpgroup MMA chain loses
that fp32 arithmetic keeps.

DeepSeek-V3's report (section 3.5.2) describes it: the products of one MMA are aligned by
shifting right to the largest exponent among them and only the highest 14 bits of each are kept,
the rest truncated. SageAttention2 calls the result an FP22 accumulator (13 mantissa bits). A
chain that adds each instruction's products onto a register accumulator (``use_acc``) aligns
that accumulator with them too, which is why DeepGEMM adds partial sums into fp32 registers at
intervals ("promotion"). The model takes that reading: one instruction adds ``k`` products (32
for m64nNk32 e4m3) and the incoming accumulator, each truncated toward zero to the highest
``bits`` bits of the largest one's position (its leading bit and ``bits - 1`` below it), sums
them exactly and rounds the sum to fp32. Finite inputs only. It models e4m3 products only: the
split kernel's bf16 rope product, added onto the scaled scores, is taken in fp32.

Why it matters here: the split kernel's two-term operands (gluon_fp8_mma_split, RESIDUALS=1) add
small residual products onto an accumulator. Issued after the rounded terms' products, each of
those steps is truncated against the whole score's magnitude; issued first, against the
residuals' own. ``benchmarks/fp8_products_accuracy.py`` compares the model with the kernel on
the GPU (at 14 bits it lands within 0.02 of the kernel's lse on extreme scales, H200).
"""

from __future__ import annotations

from typing import Iterable

import torch

HOPPER_BITS = 14  # the bits DeepSeek-V3's report measured
E4M3_STEP_K = 32  # products one e4m3 warpgroup MMA adds (m64nNk32)


def mma_step(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bits: int = HOPPER_BITS) -> torch.Tensor:
    """acc [..., M, N] + a [..., M, K] @ b [..., K, N] as one instruction: the K products and acc
    aligned to the largest of them and truncated toward zero to its highest ``bits`` bits, summed
    exactly, rounded to fp32. Inputs must be finite and exact in float64 (e4m3 values times
    powers of two, fp32 accumulators)."""
    if bits < 2 or (a.shape[-1] + 1) * 2.0**bits > 2.0**53:
        raise ValueError(f"bits={bits}: at least 2, and {a.shape[-1]} products and the accumulator at that many bits must "
                         "sum exactly in float64 (at most 47 bits for 32 products)")
    p = a.double().unsqueeze(-1) * b.double().unsqueeze(-3)  # [..., M, K, N], exact
    c = acc.double()
    big = torch.maximum(p.abs().amax(-2), c.abs())
    _, exponent = torch.frexp(big)  # big = m 2^exponent, m in [0.5, 1): the leading bit is 2^(exponent - 1)
    grid = torch.ldexp(torch.ones_like(big), exponent - bits)
    return ((torch.trunc(p / grid.unsqueeze(-2)) * grid.unsqueeze(-2)).sum(-2) + torch.trunc(c / grid) * grid).float()


def mma_chain(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bits: int = HOPPER_BITS, k: int = E4M3_STEP_K) -> torch.Tensor:
    """acc + a @ b as a chain of instructions of ``k`` products each, in order along K
    (``mma_step``)."""
    for k0 in range(0, a.shape[-1], k):
        acc = mma_step(acc, a[..., k0:k0 + k], b[..., k0:k0 + k, :], bits)
    return acc


def chained_terms(acc: torch.Tensor, terms: Iterable[tuple[torch.Tensor, torch.Tensor]], bits: int = HOPPER_BITS) -> torch.Tensor:
    """acc + sum of a @ b over ``terms`` ((a, b) pairs), one chain after another in that order."""
    for a, b in terms:
        acc = mma_chain(acc, a, b, bits)
    return acc
