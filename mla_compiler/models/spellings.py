"""The same sparse MLA written many ways, and near misses that look like it but are not.

Every spelling takes the same inputs (``SpellingInputs``) and returns the attention output in the
layout it chose. ``MATCHED`` spellings compute sparse MLA and must be lowered; ``NEAR_MISSES``
compute something else (or something the op does not express) and must be rejected with a reason
whose text contains ``expect``. Tests, the demo and the graph dump use them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

NEG_INF = float("-inf")


@dataclass
class SpellingInputs:
    q_lat: torch.Tensor  # [b, s, h, d_lat]  queries already absorbed into the latent
    q_pe: torch.Tensor  # [b, s, h, d_rope]
    kv_lat: torch.Tensor  # [b, t, d_lat]   the latent cache
    k_pe: torch.Tensor  # [b, t, d_rope]
    idx: torch.Tensor  # [b, s, topk] int64, distinct per row, always including the causal diagonal
    causal: torch.Tensor  # [s, t] 0 / -inf
    scale: float

    def args(self) -> tuple:
        return (self.q_lat, self.q_pe, self.kv_lat, self.k_pe, self.idx, self.causal)


def make_inputs(
    b: int = 2,
    s: int = 12,
    h: int = 4,
    d_lat: int = 32,
    d_rope: int = 16,
    topk: int = 6,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    requires_grad: bool = False,
) -> SpellingInputs:
    """Fresh random inputs; queries sit at the last ``s`` positions of ``t = s`` keys (causal)."""
    g = torch.Generator().manual_seed(seed)
    t = s
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype).requires_grad_(requires_grad)  # noqa: E731
    rows = []
    for i in range(s):
        perm = torch.randperm(t, generator=g)
        perm = perm[perm != i][: topk - 1]
        rows.append(torch.cat([torch.tensor([i]), perm]))
    idx = torch.stack(rows).unsqueeze(0).expand(b, s, topk).clone()
    for bi in range(1, b):
        idx[bi] = idx[bi][:, torch.randperm(topk, generator=g)]
    causal = torch.full((s, t), NEG_INF).triu_(1)
    return SpellingInputs(rand(b, s, h, d_lat), rand(b, s, h, d_rope), rand(b, t, d_lat), rand(b, t, d_rope), idx, causal, (d_lat + d_rope) ** -0.5)


# ---------------------------------------------------------------------------------------------
# Spellings that are sparse MLA


def absorbed_index_mask(q_lat, q_pe, kv_lat, k_pe, idx, causal, scale):
    """DeepSeek-V3.2's decode code: latent + rope einsums, scatter index mask plus causal, fp32 softmax."""
    b, s, _, _ = q_lat.shape
    scores = (torch.einsum("bshc,btc->bsht", q_lat.float(), kv_lat.float()) + torch.einsum("bshr,btr->bsht", q_pe.float(), k_pe.float())) * scale
    index_mask = torch.full((b, s, kv_lat.size(1)), NEG_INF, device=q_lat.device).scatter_(-1, idx, 0)
    index_mask += causal
    scores += index_mask.unsqueeze(2)
    p = scores.softmax(dim=-1, dtype=torch.float32)
    return torch.einsum("bsht,btc->bshc", p.type_as(q_lat), kv_lat)


def concat_576(q_lat, q_pe, kv_lat, k_pe, idx, causal, scale):
    """One einsum over concatenated latent+rope (576 wide in DeepSeek), value = kv[..., :d_lat]."""
    q = torch.cat([q_lat, q_pe], dim=-1)
    kv = torch.cat([kv_lat, k_pe], dim=-1)
    scores = torch.einsum("bshd,btd->bsht", q, kv) * scale
    mask = torch.full(scores.shape[:2] + scores.shape[3:], NEG_INF, device=q.device).scatter(-1, idx, 0.0)
    scores = scores + mask.unsqueeze(2)
    p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.einsum("bsht,btd->bshd", p, kv[..., : kv_lat.size(-1)])


def matmul_heads_first(q_lat, q_pe, kv_lat, k_pe, idx, causal, scale):
    """``torch.matmul`` on [b, h, s, d] queries against keys broadcast over heads; divides by sqrt."""
    q1, q2 = q_lat.transpose(1, 2), q_pe.transpose(1, 2)
    s1 = torch.matmul(q1, kv_lat.unsqueeze(1).transpose(-1, -2))
    s2 = torch.matmul(q2, k_pe.unsqueeze(1).transpose(-1, -2))
    scores = (s1 + s2) / math.sqrt(1.0 / scale**2)
    mask = torch.full((idx.size(0), idx.size(1), kv_lat.size(1)), NEG_INF, device=q_lat.device).scatter_(-1, idx, 0)
    scores = scores + mask.unsqueeze(1) + causal
    p = torch.nn.functional.softmax(scores, dim=-1)
    return torch.matmul(p, kv_lat.unsqueeze(1))


def at_operator_where(q_lat, q_pe, kv_lat, k_pe, idx, causal, scale):
    """``@`` on [b, s, h, d] with a boolean selection through ``where(sel, scores, -inf)``."""
    scores = (q_lat @ kv_lat.unsqueeze(1).transpose(-1, -2) + q_pe @ k_pe.unsqueeze(1).transpose(-1, -2)) * scale
    base = torch.full((idx.size(0), idx.size(1), kv_lat.size(1)), NEG_INF, device=q_lat.device).scatter(-1, idx, 0.0)
    scores = torch.where(causal.unsqueeze(1) == 0, scores, NEG_INF) + base.unsqueeze(2)
    return scores.softmax(-1) @ kv_lat.unsqueeze(1)


def gather_python_index(q_lat, q_pe, kv_lat, k_pe, idx, causal, scale):
    """Keys gathered with ``kv[batch, idx]``, the FlashMLA reference's way."""
    b = q_lat.size(0)
    kv = torch.cat([kv_lat, k_pe], dim=-1)
    g = kv[torch.arange(b, device=kv.device)[:, None, None], idx]  # [b, s, k, d]
    q = torch.cat([q_lat, q_pe], dim=-1)
    scores = torch.einsum("bshd,bskd->bshk", q, g) * scale
    p = scores.softmax(-1)
    return torch.einsum("bshk,bskd->bshd", p, g[..., : kv_lat.size(-1)])


def gather_flat_invalid(q_lat, q_pe, kv_lat, k_pe, idx, causal, scale):
    """Flattened tokens (no batch axis), -1 marks an invalid slot, masked with ``masked_fill``."""
    b, s, h, _ = q_lat.shape
    t = kv_lat.size(1)
    q = torch.cat([q_lat, q_pe], dim=-1).reshape(b * s, h, -1)
    kv = torch.cat([kv_lat, k_pe], dim=-1).reshape(b * t, -1)
    flat = (idx + (torch.arange(b, device=idx.device) * t).view(b, 1, 1)).reshape(b * s, -1)
    flat = torch.where(idx.reshape(b * s, -1) % 3 == 2, -1, flat)
    flat[:, 0] = (idx[:, :, 0] + (torch.arange(b, device=idx.device) * t).view(b, 1)).reshape(-1)
    valid = flat >= 0
    g = kv[flat.clamp(min=0)]  # [T, k, d]
    scores = torch.einsum("thd,tkd->thk", q, g) * scale
    scores = scores.masked_fill(~valid.unsqueeze(1), NEG_INF)
    p = scores.softmax(-1)
    return torch.einsum("thk,tkd->thd", p, g[..., : kv_lat.size(-1)])


def gather_torch_gather(q_lat, q_pe, kv_lat, k_pe, idx, causal, scale):
    """``torch.gather`` of separately gathered latent and rope keys."""
    b, s, h, d_lat = q_lat.shape
    t, k = kv_lat.size(1), idx.size(-1)
    lat = kv_lat.unsqueeze(1).expand(b, s, t, d_lat).gather(2, idx.unsqueeze(-1).expand(b, s, k, d_lat))
    pe = k_pe.unsqueeze(1).expand(b, s, t, k_pe.size(-1)).gather(2, idx.unsqueeze(-1).expand(b, s, k, k_pe.size(-1)))
    scores = (torch.einsum("bshc,bskc->bshk", q_lat, lat) + torch.einsum("bshr,bskr->bshk", q_pe, pe)) * scale
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("bshk,bskc->bshc", p, lat)


def gather_index_select(q_lat, q_pe, kv_lat, k_pe, idx, causal, scale):
    """``index_select`` over flattened indices, reshaped back to [s, k, d] per batch of one."""
    kv = torch.cat([kv_lat[0], k_pe[0]], dim=-1)  # [t, d]
    i = idx[0]
    g = kv.index_select(0, i.reshape(-1)).view(i.size(0), i.size(1), kv.size(-1))
    q = torch.cat([q_lat[0], q_pe[0]], dim=-1)  # [s, h, d]
    scores = torch.einsum("shd,skd->shk", q, g) * scale
    p = scores.softmax(dim=-1)
    return torch.einsum("shk,skd->shd", p, g[..., : kv_lat.size(-1)]).unsqueeze(0)


# ---------------------------------------------------------------------------------------------
# Near misses: similar graphs that are not sparse MLA, each with the word its rejection names


def miss_softmax_over_heads(q_lat, q_pe, kv_lat, k_pe, idx, causal, scale):
    kv = torch.cat([kv_lat, k_pe], dim=-1)
    g = kv[torch.arange(kv.size(0))[:, None, None], idx]
    scores = torch.einsum("bshd,bskd->bshk", torch.cat([q_lat, q_pe], -1), g) * scale
    p = scores.softmax(dim=2)
    return torch.einsum("bshk,bskd->bshd", p, g[..., : kv_lat.size(-1)])


def miss_finite_mask(q_lat, q_pe, kv_lat, k_pe, idx, causal, scale):
    scores = (torch.einsum("bshc,btc->bsht", q_lat, kv_lat) + torch.einsum("bshr,btr->bsht", q_pe, k_pe)) * scale
    mask = torch.full((idx.size(0), idx.size(1), kv_lat.size(1)), -1e4).scatter(-1, idx, 0.0)
    p = (scores + mask.unsqueeze(2)).softmax(-1)
    return torch.einsum("bsht,btc->bshc", p, kv_lat)


def miss_bias_at_selected(q_lat, q_pe, kv_lat, k_pe, idx, causal, scale):
    scores = (torch.einsum("bshc,btc->bsht", q_lat, kv_lat) + torch.einsum("bshr,btr->bsht", q_pe, k_pe)) * scale
    mask = torch.full((idx.size(0), idx.size(1), kv_lat.size(1)), NEG_INF).scatter(-1, idx, 0.0)
    bias = torch.full_like(mask, 0.5)
    p = (scores + mask.unsqueeze(2) + bias.unsqueeze(2)).softmax(-1)
    return torch.einsum("bsht,btc->bshc", p, kv_lat)


def miss_value_not_latent(q_lat, q_pe, kv_lat, k_pe, idx, causal, scale):
    scores = (torch.einsum("bshc,btc->bsht", q_lat, kv_lat) + torch.einsum("bshr,btr->bsht", q_pe, k_pe)) * scale
    mask = torch.full((idx.size(0), idx.size(1), kv_lat.size(1)), NEG_INF).scatter(-1, idx, 0.0)
    p = (scores + mask.unsqueeze(2)).softmax(-1)
    return torch.einsum("bsht,btc->bshc", p, torch.tanh(kv_lat))


def miss_scale_after_softmax(q_lat, q_pe, kv_lat, k_pe, idx, causal, scale):
    scores = torch.einsum("bshc,btc->bsht", q_lat, kv_lat) + torch.einsum("bshr,btr->bsht", q_pe, k_pe)
    mask = torch.full((idx.size(0), idx.size(1), kv_lat.size(1)), NEG_INF).scatter(-1, idx, 0.0)
    p = (scores + mask.unsqueeze(2)).softmax(-1) * scale
    return torch.einsum("bsht,btc->bshc", p, kv_lat)


class MissLearnedTemperature(nn.Module):
    """Scores scaled by a learned 0-d parameter: a scale whose value is only known at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(0.7))

    def forward(self, q_lat, q_pe, kv_lat, k_pe, idx, causal, scale):
        scores = (torch.einsum("bshc,btc->bsht", q_lat, kv_lat) + torch.einsum("bshr,btr->bsht", q_pe, k_pe)) * self.temperature
        mask = torch.full((idx.size(0), idx.size(1), kv_lat.size(1)), NEG_INF).scatter(-1, idx, 0.0)
        p = (scores + mask.unsqueeze(2)).softmax(-1)
        return torch.einsum("bsht,btc->bshc", p, kv_lat)


def miss_float_indices(q_lat, q_pe, kv_lat, k_pe, idx, causal, scale):
    kv = torch.cat([kv_lat, k_pe], dim=-1)
    fidx = idx.float() * 1.0  # e.g. indices that came out of a float computation
    g = kv[torch.arange(kv.size(0))[:, None, None], fidx.long()]
    scores = torch.einsum("bshd,bskd->bshk", torch.cat([q_lat, q_pe], -1), g) * scale
    return torch.einsum("bshk,bskd->bshd", scores.softmax(-1), g[..., : kv_lat.size(-1)])


def miss_multi_head_keys(q_lat, q_pe, kv_lat, k_pe, idx, causal, scale):
    h = q_lat.size(2)
    k = kv_lat.unsqueeze(2) * torch.linspace(0.5, 1.5, h).view(1, 1, h, 1)  # per-head keys
    scores = torch.einsum("bshc,bthc->bsht", q_lat, k) * scale
    mask = torch.full((idx.size(0), idx.size(1), kv_lat.size(1)), NEG_INF).scatter(-1, idx, 0.0)
    p = (scores + mask.unsqueeze(2)).softmax(-1)
    return torch.einsum("bsht,btc->bshc", p, kv_lat)


def miss_dense(q_lat, q_pe, kv_lat, k_pe, idx, causal, scale):
    scores = (torch.einsum("bshc,btc->bsht", q_lat, kv_lat) + torch.einsum("bshr,btr->bsht", q_pe, k_pe)) * scale
    p = (scores + causal.view(1, causal.size(0), 1, -1)).softmax(-1)
    return torch.einsum("bsht,btc->bshc", p, kv_lat)


class Spelling(nn.Module):
    """Wraps a spelling function as a module (what ``torch.compile`` is usually given)."""

    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def forward(self, q_lat, q_pe, kv_lat, k_pe, idx, causal, scale: float = 0.125):
        return self.fn(q_lat, q_pe, kv_lat, k_pe, idx, causal, scale)


MATCHED: dict[str, Callable] = {
    "absorbed_index_mask": absorbed_index_mask,
    "concat_576": concat_576,
    "matmul_heads_first": matmul_heads_first,
    "at_operator_where": at_operator_where,
    "gather_python_index": gather_python_index,
    "gather_flat_invalid": gather_flat_invalid,
    "gather_torch_gather": gather_torch_gather,
    "gather_index_select": gather_index_select,
}

# name -> (function or module factory, the check name its rejection must carry, words of the reason)
NEAR_MISSES: dict[str, tuple[Callable, str, str]] = {
    "softmax_over_heads": (miss_softmax_over_heads, "softmax", "not the axis of the selected keys"),
    "finite_mask": (miss_finite_mask, "mask", "-10000.0"),
    "bias_at_selected": (miss_bias_at_selected, "mask", "bias"),
    "value_not_latent": (miss_value_not_latent, "value", "not the key latent"),
    "scale_after_softmax": (miss_scale_after_softmax, "scale-after-softmax", "after the softmax"),
    "learned_temperature": (MissLearnedTemperature, "scale", "meaning is unknown"),
    "float_indices": (miss_float_indices, "indices", "torch.float32"),
    "multi_head_keys": (miss_multi_head_keys, "keys", "differ across heads"),
    "dense": (miss_dense, "selection", "no top-k selection"),
}


def module_for(name: str) -> nn.Module:
    if name in MATCHED:
        return Spelling(MATCHED[name])
    fn = NEAR_MISSES[name][0]
    if isinstance(fn, type):
        mod = fn()
        mod.__name__ = name
        return mod
    return Spelling(fn)


def to_bshd(out: torch.Tensor, name: str, like: SpellingInputs) -> torch.Tensor:
    """Bring a spelling's output to [b, s, h, d_v] so spellings can be compared with each other."""
    b, s, h, _ = like.q_lat.shape
    if name == "matmul_heads_first":
        return out.transpose(1, 2)
    if name == "gather_flat_invalid":
        return out.reshape(b, s, h, -1)
    return out


CAUSAL = {"absorbed_index_mask", "matmul_heads_first", "at_operator_where"}


def reference_output(x: SpellingInputs, causal: bool = False) -> torch.Tensor:
    """Dense fp64 sparse MLA over ``x.idx`` (with the causal mask when ``causal``): what a matched
    spelling computes on these inputs (``CAUSAL`` names the spellings that add it)."""
    b, s, h, d_lat = x.q_lat.shape
    t = x.kv_lat.size(1)
    q = torch.cat([x.q_lat, x.q_pe], -1).double()
    kv = torch.cat([x.kv_lat, x.k_pe], -1).double()
    scores = torch.einsum("bshd,btd->bsht", q, kv) * x.scale
    mask = torch.full((b, s, t), NEG_INF, dtype=torch.float64).scatter(-1, x.idx, 0.0)
    if causal:
        mask = mask + x.causal.double()
    scores = scores + mask.unsqueeze(2)
    return torch.einsum("bsht,btc->bshc", scores.softmax(-1), kv[..., :d_lat])
