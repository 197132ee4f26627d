"""A model of how Hopper's tensor cores add e4m3 products: what an FP8 warpgroup MMA chain loses
that fp32 arithmetic keeps.

DeepSeek-V3's report (section 3.5.2) describes it: the products of one MMA are aligned by
shifting right to the largest exponent among them and only the highest 14 bits of each are kept,
the rest truncated. SageAttention2 calls the result an FP22 accumulator. A chain that adds each
instruction's products onto a register accumulator (``use_acc``) aligns that accumulator with
them too, which is why DeepGEMM copies partial sums into fp32 registers every 128 products
("promotion"). The model below takes that reading: one instruction adds ``k`` products (32 for
m64nNk32 e4m3) and the incoming accumulator, each truncated toward zero to ``bits`` bits below
the largest one's leading bit, exactly summed, then rounded to fp32.

Why it matters here: the split kernel's two-term operands (gluon_fp8_mma_split, RESIDUALS=1) add
small residual products onto an accumulator. Issued after the rounded terms' products, each of
those steps is truncated against the whole score's magnitude; issued first, against the
residuals' own. ``benchmarks/fp8_products_accuracy.py`` compares the model with the kernel on
the GPU.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

HOPPER_BITS = 14  # the bits DeepSeek-V3's report measured
E4M3_STEP_K = 32  # products one e4m3 warpgroup MMA adds (m64nNk32)


def mma_step(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bits: int = HOPPER_BITS) -> torch.Tensor:
    """acc [..., M, N] + a [..., M, K] @ b [..., K, N] as one instruction: the K products and acc
    aligned to the largest of them and truncated toward zero to ``bits`` bits, summed exactly,
    rounded to fp32. Inputs must be exact in float64 (e4m3 values times powers of two)."""
    if bits < 2:
        raise ValueError(f"bits={bits}: at least 2")
    p = a.double().unsqueeze(-1) * b.double().unsqueeze(-3)  # [..., M, K, N], exact
    c = acc.double()
    big = torch.maximum(p.abs().amax(-2), c.abs())
    lead = torch.floor(torch.log2(torch.where(big > 0, big, torch.ones_like(big))))
    grid = torch.exp2(lead + 1 - bits)
    return ((torch.trunc(p / grid.unsqueeze(-2)) * grid.unsqueeze(-2)).sum(-2) + torch.trunc(c / grid) * grid).float()


def mma_chain(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bits: Optional[int] = HOPPER_BITS,
              k: int = E4M3_STEP_K) -> torch.Tensor:
    """acc + a @ b as a chain of instructions of ``k`` products each, in order along K
    (``mma_step``); ``bits=None``: in fp32, as an exact accumulator would."""
    if bits is None:
        return acc + a.float() @ b.float()
    for k0 in range(0, a.shape[-1], k):
        acc = mma_step(acc, a[..., k0:k0 + k], b[..., k0:k0 + k, :], bits)
    return acc


def chained_terms(acc: torch.Tensor, terms: Iterable[tuple[torch.Tensor, torch.Tensor]], bits: Optional[int]) -> torch.Tensor:
    """acc + sum of a @ b over ``terms`` ((a, b) pairs), one chain after another in that order."""
    for a, b in terms:
        acc = mma_chain(acc, a, b, bits)
    return acc
