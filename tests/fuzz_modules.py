"""MLA-like functions built from a ``Recipe``: spellings of the same sparse MLA, and deliberate near misses.

A recipe is plain data (its repr is a valid ``@example``), so a failing case hypothesis finds is kept
as a regression test by pasting the recipe. ``build(recipe)`` returns the function and its inputs;
``recipe.is_sparse_mla`` says whether the compiler must match it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")

# Where the keys come from: every key scored then a mask keeps the selected ones, or the selected
# keys gathered first.
MASK_SELECTIONS = ("scatter_add", "scatter_where", "masked_fill", "keys_first_transposed", "squeezed")
GATHER_SELECTIONS = ("gather_index", "torch_gather", "gather_flat_invalid")
MASK_PRODUCTS = ("einsum_split", "einsum_concat", "matmul_heads_first", "at", "bmm")
GATHER_PRODUCTS = ("einsum_split", "einsum_concat", "at", "bmm")
SCALES = ("mul_scores", "div_scores", "scale_q", "mul_after_mask")
SOFTMAXES = ("method", "functional", "torch_float", "dtype_arg", "positive_dim")
VALUE_PRODUCTS = ("einsum", "matmul")
# Not sparse MLA: each changes what is computed in a way no sparse-MLA kernel computes.
MISSES = ("softmax_dim", "value_tanh", "value_other", "mask_keeps_unselected", "selection_on_queries", "square", "abs", "softcap", "scale_after_softmax")
MASK_ONLY_MISSES = ("mask_keeps_unselected", "selection_on_queries")
# selection_on_queries: the mask is built keys-first ([b, t, s]) and used without transposing it
# back, so it selects along the queries (needs s == t for the shapes to broadcast).


@dataclass(frozen=True)
class Recipe:
    b: int = 2
    s: int = 5
    t_extra: int = 0  # keys before the first query (a cache prefix): t = s + t_extra
    h: int = 3
    d_lat: int = 16
    d_rope: int = 8  # 0: no rope part (d_qk == d_v, value = the whole key)
    topk: int = 4
    dtype: str = "float32"
    select: str = "scatter_add"
    product: str = "einsum_split"
    causal: bool = False
    scale_at: str = "mul_scores"
    softmax: str = "method"
    value: str = "einsum"
    duplicates: bool = False
    miss: Optional[str] = None
    seed: int = 0

    @property
    def t(self) -> int:
        return self.s + self.t_extra

    @property
    def gathers(self) -> bool:
        return self.select in GATHER_SELECTIONS

    @property
    def is_sparse_mla(self) -> bool:
        return self.miss is None

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def make_indices(r: Recipe, g: torch.Generator) -> torch.Tensor:
    """[b, s, topk] int64: each row holds its own position (so no row is empty under the causal
    mask) and distinct other keys from all ``t`` (future ones too: the causal mask drops those);
    with ``duplicates``, some rows repeat an entry."""
    rows = []
    for _ in range(r.b):
        per_b = []
        for i in range(r.s):
            pos = r.t_extra + i
            others = torch.randperm(r.t, generator=g)
            others = others[others != pos][: r.topk - 1]
            row = torch.cat([torch.tensor([pos]), others])
            row = row[torch.randperm(r.topk, generator=g)]
            per_b.append(row)
        rows.append(torch.stack(per_b))
    idx = torch.stack(rows)
    if r.duplicates and r.topk > 1:
        dup = torch.rand(r.b, r.s, generator=g) < 0.5
        first, second = idx[..., 0].clone(), idx[..., 1]
        keep_pos = second == (r.t_extra + torch.arange(r.s)).view(1, r.s)  # never overwrite the row's own position
        idx[..., 1] = torch.where(dup & ~keep_pos, first, second)
    return idx


def make_inputs(r: Recipe) -> tuple:
    g = torch.Generator().manual_seed(r.seed)
    dt = r.torch_dtype
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dt)  # noqa: E731
    q_lat, kv_lat = rand(r.b, r.s, r.h, r.d_lat), rand(r.b, r.t, r.d_lat)
    q_pe, k_pe = rand(r.b, r.s, r.h, r.d_rope), rand(r.b, r.t, r.d_rope)
    return q_lat, q_pe, kv_lat, k_pe, make_indices(r, g)


def build(r: Recipe) -> tuple[Callable, tuple]:
    """The function ``f(q_lat, q_pe, kv_lat, k_pe, idx) -> [b, s, h, d_lat]`` and its inputs."""
    scale = (r.d_lat + r.d_rope) ** -0.5
    # A unique name per recipe keeps Dynamo from reusing another recipe's cache entry.
    fn = _gathered if r.gathers else _masked

    def mla(q_lat, q_pe, kv_lat, k_pe, idx):
        return fn(r, scale, q_lat, q_pe, kv_lat, k_pe, idx)

    return mla, make_inputs(r)


# ---------------------------------------------------------------------------------------------
# pieces


def _queries(r, scale, q_lat, q_pe):
    if r.scale_at == "scale_q":
        q_lat, q_pe = q_lat * scale, q_pe * scale
    return q_lat, q_pe


def _cat(a, b, r):
    return torch.cat([a, b], dim=-1) if r.d_rope else a


def _score_transform(r, scale, scores):
    """Scale placements before the mask, and the non-linear near misses."""
    if r.scale_at == "mul_scores":
        scores = scores * scale
    elif r.scale_at == "div_scores":
        scores = scores / math.sqrt(1.0 / scale**2)
    if r.miss == "square":
        scores = scores * scores
    elif r.miss == "abs":
        scores = scores.abs()
    elif r.miss == "softcap":
        scores = 5.0 * torch.tanh(scores / 5.0)
    return scores


def _softmax(r, scores, like, dim_last):
    dim = dim_last
    if r.miss == "softmax_dim":
        dim = dim_last - 1  # over queries or heads, not keys
    if r.softmax == "method":
        p = scores.softmax(dim)
    elif r.softmax == "functional":
        p = F.softmax(scores, dim=dim)
    elif r.softmax == "torch_float":
        p = torch.softmax(scores.float(), dim=dim).to(like.dtype)
    elif r.softmax == "dtype_arg":
        p = scores.softmax(dim=dim, dtype=torch.float32).type_as(like)
    else:  # positive_dim
        p = scores.softmax(dim=dim % scores.dim())
    if r.miss == "scale_after_softmax":
        p = p * 0.5
    return p


def _value(r, latent):
    """The value operand ([..., keys, d_lat]), or a near miss of it."""
    if r.miss == "value_tanh":
        return torch.tanh(latent)
    if r.miss == "value_other":
        return latent.flip(-2)  # key j's weight applied to another key's latent
    return latent


def _masked(r: Recipe, scale, q_lat, q_pe, kv_lat, k_pe, idx):
    b, s, h, _ = q_lat.shape
    t = kv_lat.size(1)
    q_lat, q_pe = _queries(r, scale, q_lat, q_pe)
    heads_first = r.product == "matmul_heads_first"
    q, kv = _cat(q_lat, q_pe, r), _cat(kv_lat, k_pe, r)
    if r.product == "einsum_split":
        scores = torch.einsum("bshc,btc->bsht", q_lat, kv_lat)
        if r.d_rope:
            scores = scores + torch.einsum("bshr,btr->bsht", q_pe, k_pe)
    elif r.product == "einsum_concat":
        scores = torch.einsum("bshd,btd->bsht", q, kv)
    elif heads_first:
        scores = torch.matmul(q.transpose(1, 2), kv.unsqueeze(1).transpose(-1, -2))  # [b, h, s, t]
    elif r.product == "at":
        scores = q @ kv.unsqueeze(1).transpose(-1, -2)
    else:  # bmm: heads folded into the query rows
        scores = torch.bmm(q.reshape(b, s * h, -1), kv.transpose(1, 2)).view(b, s, h, t)
    scores = _score_transform(r, scale, scores)

    head_axis = 1 if heads_first else 2
    fill = -1e4 if r.miss == "mask_keeps_unselected" else NEG_INF
    keep_causal = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(r.t_extra)
    on_queries = r.miss == "selection_on_queries"
    if r.select == "scatter_add":
        if on_queries:
            mask = torch.full((b, t, s), fill, device=q.device, dtype=scores.dtype).scatter(1, idx.transpose(1, 2), 0.0)
        else:
            mask = torch.full((b, s, t), fill, device=q.device, dtype=scores.dtype).scatter(-1, idx, 0.0)
        if r.causal:
            mask = mask + torch.zeros(s, t, device=q.device, dtype=scores.dtype).masked_fill(~keep_causal, NEG_INF)
        scores = scores + mask.unsqueeze(head_axis)
    else:
        if on_queries:
            sel = torch.zeros(b, t, s, dtype=torch.bool, device=q.device).scatter(1, idx.transpose(1, 2), True)
        elif r.select == "keys_first_transposed":  # built [b, t, s] (keys on dim 1), then transposed
            sel = torch.zeros(b, t, s, dtype=torch.bool, device=q.device).scatter(1, idx.transpose(1, 2), True).transpose(1, 2)
        elif r.select == "squeezed":  # built with a unit axis, then squeezed
            sel = torch.zeros(b, 1, s, t, dtype=torch.bool, device=q.device).scatter(-1, idx.unsqueeze(1), True).squeeze(1)
        else:
            sel = torch.zeros(b, s, t, dtype=torch.bool, device=q.device).scatter(-1, idx, True)
        if r.causal:
            sel = sel & keep_causal
        if r.select == "scatter_where":
            scores = torch.where(sel.unsqueeze(head_axis), scores, fill)
        else:
            scores = scores.masked_fill(~sel.unsqueeze(head_axis), fill)
    if r.scale_at == "mul_after_mask":
        scores = scores * scale

    p = _softmax(r, scores, q, dim_last=-1)
    v = _value(r, kv_lat)
    if heads_first:
        out = torch.matmul(p, v.unsqueeze(1)) if r.value == "matmul" else torch.einsum("bhst,btc->bhsc", p, v)
        return out.transpose(1, 2)
    if r.value == "matmul":
        return p @ v.unsqueeze(1)
    return torch.einsum("bsht,btc->bshc", p, v)


def _gathered(r: Recipe, scale, q_lat, q_pe, kv_lat, k_pe, idx):
    b, s, h, _ = q_lat.shape
    t, k = kv_lat.size(1), idx.size(-1)
    q_lat, q_pe = _queries(r, scale, q_lat, q_pe)
    kv = _cat(kv_lat, k_pe, r)
    d = kv.size(-1)
    valid = flat = None
    lead = "bs"
    if r.select == "gather_flat_invalid":  # queries and keys flattened to tokens, -1 marks an unused slot
        lead = "t"
        flat = (idx + (torch.arange(b, device=idx.device) * t).view(b, 1, 1)).reshape(b * s, k)
        drop = torch.zeros_like(flat, dtype=torch.bool)
        drop[:, 1::3] = True
        own = idx.reshape(b * s, k) == (r.t_extra + torch.arange(s, device=idx.device)).repeat(b).view(-1, 1)
        flat = torch.where(drop & ~own, -1, flat)
        valid = (flat >= 0).unsqueeze(1)  # [T, 1, k]
        q_lat, q_pe = q_lat.reshape(b * s, h, -1), q_pe.reshape(b * s, h, -1)
    q = _cat(q_lat, q_pe, r)

    def gather(x):
        w = x.size(-1)
        if r.select == "gather_index":
            return x[torch.arange(b, device=x.device)[:, None, None], idx]  # [b, s, k, w]
        if r.select == "torch_gather":
            return x.unsqueeze(1).expand(b, s, t, w).gather(2, idx.unsqueeze(-1).expand(b, s, k, w))
        return x.reshape(b * t, w)[flat.clamp(min=0)]  # [T, k, w]

    # Split products gather the latent and the rope separately (a slice of gathered keys is not
    # matched: see test_a_slice_of_gathered_keys_is_rejected_with_the_reason).
    split = r.product == "einsum_split"
    keys = None if split else gather(kv)
    keys_lat = gather(kv_lat) if split else keys[..., : r.d_lat]
    if split:
        scores = torch.einsum(f"{lead}hc,{lead}kc->{lead}hk", q_lat, keys_lat)
        if r.d_rope:
            scores = scores + torch.einsum(f"{lead}hr,{lead}kr->{lead}hk", q_pe, gather(k_pe))
    elif r.product == "einsum_concat":
        scores = torch.einsum(f"{lead}hd,{lead}kd->{lead}hk", q, keys)
    elif r.product == "at":
        scores = q @ keys.transpose(-1, -2)
    else:  # bmm over (batch, query) pairs
        scores = torch.bmm(q.reshape(b * s, h, d), keys.reshape(b * s, k, d).transpose(1, 2)).view(*q.shape[:-1], k)
    scores = _score_transform(r, scale, scores)
    if valid is not None:
        scores = scores.masked_fill(~valid, NEG_INF)
    if r.scale_at == "mul_after_mask":
        scores = scores * scale
    p = _softmax(r, scores, q, dim_last=-1)
    values = _value(r, keys_lat)
    if r.value == "matmul":
        out = p @ values
    else:
        out = torch.einsum(f"{lead}hk,{lead}kc->{lead}hc", p, values)
    return out.reshape(b, s, h, r.d_lat)
