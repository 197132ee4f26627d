"""FP8 KV caches: quantization in FlashMLA's layout, and sparse MLA over an FP8 latent (reference).

FlashMLA's "FP8 with scale" token (656 bytes, DeepSeek-V3.2):
    bytes   0..511   512 float8_e4m3fn latent values, in four 128-wide tiles
    bytes 512..527   4 float32 scales, one per tile, dequant multipliers (hp = fp8 * scale)
    bytes 528..655   64 bfloat16 rope values (not quantized)
A tile's scale is amax / 448 (clamped to at least 1e-4) rounded up to a power of two, and the
stored value x / scale cast to e4m3, as FlashMLA's tests/quant.py does.

The attention reference takes the FP8 latent as three row-indexed tensors, which is how the op
sees any FP8 layout: ``kv_latent`` float8 [S, d_lat], ``kv_scale`` float32 [S, n_tiles] (dequant
multipliers, tile width d_lat / n_tiles; per-row scales are n_tiles = 1), ``kv_rope`` bf16
[S, d_rope] or None. For the FlashMLA layout they are strided views of the one uint8 buffer
(``flashmla_views``), so nothing is copied.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from mla_compiler.kernels.reference import sparse_attn_reference

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
TOKEN_BYTES = 656
LATENT, TILE, N_TILES, ROPE = 512, 128, 4, 64


def _pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(torch.clamp(amax / FP8_MAX, min=1e-4))))


def quantize_flashmla(latent: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """latent [..., 512] and rope [..., 64] -> uint8 [..., 656] in FlashMLA's layout."""
    if latent.shape[-1] != LATENT or rope.shape[-1] != ROPE:
        raise ValueError(f"quantize_flashmla: expected latent [..., {LATENT}] and rope [..., {ROPE}], got {list(latent.shape)} and {list(rope.shape)}")
    lead = latent.shape[:-1]
    tiles = latent.float().reshape(*lead, N_TILES, TILE)
    scale = _pow2_scale(tiles.abs().amax(-1))  # [..., 4]
    q = (tiles / scale.unsqueeze(-1)).to(FP8).reshape(*lead, LATENT)
    out = torch.empty(*lead, TOKEN_BYTES, dtype=torch.uint8, device=latent.device)
    out[..., :LATENT] = q.view(torch.uint8)
    out[..., LATENT:LATENT + 4 * N_TILES] = scale.float().contiguous().view(torch.uint8).reshape(*lead, 4 * N_TILES)
    out[..., LATENT + 4 * N_TILES:] = rope.to(torch.bfloat16).contiguous().view(torch.uint8).reshape(*lead, 2 * ROPE)
    return out


def flashmla_views(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latent float8 [..., 512], scales float32 [..., 4], rope bf16 [..., 64]) as views of ``cache``."""
    if cache.dtype != torch.uint8 or cache.shape[-1] != TOKEN_BYTES:
        raise ValueError(f"flashmla_views: expected a uint8 [..., {TOKEN_BYTES}] cache, got {cache.dtype} {list(cache.shape)}")
    return (
        cache[..., :LATENT].view(FP8),
        cache[..., LATENT:LATENT + 4 * N_TILES].view(torch.float32),
        cache[..., LATENT + 4 * N_TILES:].view(torch.bfloat16),
    )


def dequantize_flashmla(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [..., 656] -> (latent bf16 [..., 512], rope bf16 [..., 64])."""
    lat, scale, rope = flashmla_views(cache)
    lead = cache.shape[:-1]
    hp = lat.float().reshape(*lead, N_TILES, TILE) * scale.unsqueeze(-1)
    return hp.reshape(*lead, LATENT).to(torch.bfloat16), rope.clone()


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] -> (float8 [..., d], dequant scale float32 [..., 1]), scale = amax / 448."""
    amax = x.float().abs().amax(-1, keepdim=True)
    scale = torch.clamp(amax / FP8_MAX, min=1e-12)
    return (x.float() / scale).to(FP8), scale


KEY_LAYOUTS = ("flashmla", "row")


def quantize_keys(kv: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 keys [S, 1, 576] as the FP8 operands (latent, scale, rope) the FP8 kernels take:
    ``"flashmla"`` views of FlashMLA's 656-byte rows, ``"row"`` e4m3 with one scale a row and the
    rope kept apart."""
    if layout == "flashmla":
        return flashmla_views(quantize_flashmla(kv[:, 0, :LATENT].float(), kv[:, 0, LATENT:]))
    if layout == "row":
        latent, scale = quantize_rowwise(kv[:, 0, :LATENT])
        return latent, scale, kv[:, 0, LATENT:].contiguous()
    raise ValueError(f"quantize_keys: layout={layout!r}; use one of {KEY_LAYOUTS}")


def dequantize_latent(kv_latent: torch.Tensor, kv_scale: torch.Tensor) -> torch.Tensor:
    """float8 [S, d] * per-tile scales [S, n_tiles] -> float32 [S, d]."""
    s, d = kv_latent.shape
    n = kv_scale.shape[-1]
    return (kv_latent.float().reshape(s, n, d // n) * kv_scale.float().reshape(s, n, 1)).reshape(s, d)


def sparse_attn_fp8kv_reference(
    q: torch.Tensor,
    kv_latent: torch.Tensor,
    kv_scale: torch.Tensor,
    kv_rope: Optional[torch.Tensor],
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int,
    attn_sink: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
    exact_keys: bool = False,
    products: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA with keys/values dequantized from FP8 (the bf16 contract of
    ``sparse_attn_reference`` applied to ``[dequant(latent), rope]``). Dequantizes only the rows
    the indices select, in chunks, so a large cache is never expanded whole. The dequantized keys
    are rounded to q's dtype, as a kernel that dequantizes into a bf16 tile does; with
    ``exact_keys`` they stay float32 (e4m3 x scale exactly) and q is upcast, as a kernel that
    applies the scales to the scores and P computes (out float32). ``products`` (the FP8-products
    kernel asked for, a GPU kernel choice) changes nothing here: this is the dequantized arithmetic
    (gluon_fp8_mma.reference_fp8_mma has the products kernel's)."""
    s_kv = kv_latent.shape[0]
    idx = indices.long()
    valid = (idx >= 0) & (idx < s_kv)
    used = torch.unique(torch.where(valid, idx, torch.zeros_like(idx)))
    # Compact the selected rows: dequantize them once, re-index into the compact block.
    remap = torch.full((s_kv,), -1, dtype=torch.long, device=idx.device)
    remap[used] = torch.arange(used.numel(), device=idx.device)
    lat = dequantize_latent(kv_latent[used], kv_scale[used])
    parts = [lat] + ([kv_rope[used].float()] if kv_rope is not None else [])
    kv = torch.cat(parts, dim=-1).to(torch.float32 if exact_keys else q.dtype).unsqueeze(1)
    if exact_keys:
        q = q.float()
    new_idx = torch.where(valid, remap[torch.where(valid, idx, torch.zeros_like(idx))], torch.full_like(idx, -1)).to(torch.int32)
    return sparse_attn_reference(q, kv, new_idx, sm_scale, d_v, attn_sink, topk_length)


def fp8_relative_error_bound() -> float:
    """e4m3 keeps 3 mantissa bits: a value's rounding error is at most 2^-4 of it."""
    return math.ldexp(1.0, -4)
