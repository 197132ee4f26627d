"""Sparse-attention inputs that catch masking bugs, shared by the kernel tests and benchmarks.

Every invalid-index kind a model produces (-1 padding, an index >= s_kv), a token with no valid
index, and poison (NaN) in the key rows no index selects: the first row and the last 100. A kernel
that clamps an invalid index to row 0, or multiplies a masked row by a zero weight, returns NaN.
"""

from __future__ import annotations

import torch

UNSELECTED_TAIL = 100  # the last rows, never selected


def awkward_inputs(t: int = 6, heads: int = 80, s_kv: int = 3000, topk: int = 200, seed: int = 1,
                   device: str = "cuda", d_qk: int = 576) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [t, heads, d_qk] and kv [s_kv, 1, d_qk] (bf16, random, no poison yet: quantize first, then
    call ``poison_unselected``), indices [t, 1, topk] int32 into rows 1 .. s_kv - 101 with token 0
    every 7th index -1, token 1 every 5th index s_kv + 3, token 2 none valid."""
    if t < 3 or s_kv <= UNSELECTED_TAIL + 1:
        raise ValueError(f"awkward_inputs: t={t}, s_kv={s_kv}; need t >= 3 (three awkward tokens) and s_kv > {UNSELECTED_TAIL + 1}")
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(t, heads, d_qk, device=device, dtype=torch.bfloat16, generator=g)
    kv = torch.randn(s_kv, 1, d_qk, device=device, dtype=torch.bfloat16, generator=g)
    idx = torch.randint(1, s_kv - UNSELECTED_TAIL, (t, 1, topk), device=device, generator=g, dtype=torch.int32)
    idx[0, 0, ::7] = -1
    idx[1, 0, ::5] = s_kv + 3
    idx[2] = -1  # a token with nothing to attend
    return q, kv, idx


def poison_unselected(*parts: torch.Tensor) -> None:
    """NaN into the rows no index selects (row 0 and the last ``UNSELECTED_TAIL``), in place; an
    FP8 tensor gets the e4m3 NaN byte (0x7F)."""
    for part in parts:
        rows = part.view(torch.uint8) if part.dtype == torch.float8_e4m3fn else part
        fill = 0x7F if part.dtype == torch.float8_e4m3fn else float("nan")
        rows[0] = fill
        rows[-UNSELECTED_TAIL:] = fill
