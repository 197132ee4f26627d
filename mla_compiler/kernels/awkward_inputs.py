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


def extreme_scales(q: torch.Tensor, kv: torch.Tensor, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """q and kv rescaled to stress dequantization: each key row times 2^-20 .. 2^4 (random, the
    FP8 scales then span 24 binades), head h times 10^(-2 + 3h / (heads - 1)), head 5 all zero
    (needs 6 or more heads)."""
    g = torch.Generator(device=kv.device).manual_seed(seed)
    kv = kv * torch.exp2(torch.randint(-20, 5, (kv.shape[0], 1, 1), device=kv.device, generator=g)).to(kv.dtype)
    q = q * torch.logspace(-2, 1, q.shape[1], device=q.device)[None, :, None].to(q.dtype)
    q[:, 5] = 0
    return q, kv


def zero_some_scales(scale: torch.Tensor, rope: torch.Tensor, idx: torch.Tensor) -> None:
    """In place, for ``awkward_inputs``' indices: the scales of every key token 4 selects set to 0,
    and of a third of token 3's, whose rope rows are also scaled by 4 so that their rope scores carry
    real softmax mass. A selected key whose scales are 0 has a zero latent, but its rope score
    still counts in the softmax."""
    if idx.shape[0] < 5:
        raise ValueError(f"zero_some_scales: {idx.shape[0]} tokens; needs 5 or more (tokens 3 and 4 are changed)")
    scale[idx[4, 0].long()] = 0.0
    scale[idx[3, 0, ::3].long()] = 0.0
    rope[idx[3, 0, ::3].long()] *= 4


def assert_matches(out: torch.Tensor, lse: torch.Tensor, ref_out: torch.Tensor, ref_lse: torch.Tensor, out_tol: float = 1e-2) -> None:
    """A kernel's (out, lse) against a reference's on ``awkward_inputs``: relative L2 error of out
    below ``out_tol``, lse within 1e-3 where finite, and token 2 (no valid index) lse +inf and out 0."""
    fin = torch.isfinite(ref_lse)
    err = ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
    assert err < out_tol, f"relative error of out {err:.3g} (bound {out_tol:.3g})"
    assert (lse[fin] - ref_lse[fin]).abs().max().item() < 1e-3, "lse differs from the reference"
    assert (lse[2] == float("inf")).all() and (out[2] == 0).all(), "a token with no valid index must give lse +inf and out 0"


def assert_fp8_forward_matches(forward, layout: str, heads: int, topk: int, extreme: bool = False, device: str = "cuda",
                               exact_keys: bool = False, out_tol: float = 1e-2) -> None:
    """An FP8 forward ``forward(q, latent, scale, rope, indices, sm_scale)`` -> (out, lse) against
    the FP8 reference on the same bytes: ``awkward_inputs`` quantized to ``layout`` (see
    ``fp8_reference.quantize_keys``) with the unselected rows poisoned, or with ``extreme``
    the keys and heads of ``extreme_scales`` (and the output finite). ``exact_keys``: against the
    reference whose keys are not rounded to bf16 (for kernels that apply the scales to the scores).
    ``out_tol``: the bound on out's relative L2 error (``assert_matches``)."""
    from . import fp8_reference as fr

    q, kv, idx = awkward_inputs(heads=heads, topk=topk, device=device)
    if extreme:
        q, kv = extreme_scales(q, kv)
    latent, scale, rope = fr.quantize_keys(kv, layout)
    if not extreme:
        poison_unselected(latent, scale, rope)
    sm_scale = q.shape[-1] ** -0.5
    out, lse = forward(q, latent, scale, rope, idx, sm_scale)
    if extreme:
        assert torch.isfinite(out).all(), "extreme scales gave a non-finite output"
    assert_matches(out, lse, *fr.sparse_attn_fp8kv_reference(q, latent, scale, rope, idx, sm_scale, fr.LATENT, exact_keys=exact_keys),
                   out_tol)
