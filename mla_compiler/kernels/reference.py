"""Pure-torch sparse MLA, forward and backward: the numbers every kernel is held to.

Contract (same as ``sparse_mla.sparse_attn``):
    q [T, H, d_qk], kv [S_kv, h_kv, d_qk], indices [T, h_kv, topk] int32, V = kv[..., :d_v].
    Head h reads key group h // (H // h_kv). An index < 0 or >= S_kv, or at a slot >= topk_length[t],
    is invalid and contributes nothing. A row with no valid index gives out 0 and lse +inf.
    lse is natural-log and excludes the sink; with ``attn_sink`` the output is scaled by
    exp(lse) / (exp(lse) + exp(sink[h])), as FlashMLA does.

The gather is chunked over query rows, so no more than ``GATHER_BUDGET_BYTES`` of gathered keys
(a slice of the [T, topk, d_qk] tensor) exist at once. Arithmetic is fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

from typing import Optional

import torch

GATHER_BUDGET_BYTES = 64 * 1024 * 1024


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunk(t: int, h_kv: int, topk: int, d_qk: int, acc: torch.dtype) -> int:
    per_row = max(1, h_kv * topk * d_qk * torch.finfo(acc).bits // 8)
    return max(1, min(t, GATHER_BUDGET_BYTES // per_row))


def _gather_chunk(q, kv, indices, topk_length, t0, t1, acc):
    """Scores of rows t0:t1 against their selected keys, with invalid slots at -inf.

    Returns (scores [c, G, hpg, K], gathered keys [c, G, K, d_qk], valid [c, G, K]).
    """
    s_kv, h_kv, d_qk = kv.shape
    idx = indices[t0:t1].long()
    valid = (idx >= 0) & (idx < s_kv)
    if topk_length is not None:
        slot = torch.arange(idx.shape[-1], device=idx.device)
        valid &= slot.view(1, 1, -1) < topk_length[t0:t1].view(-1, 1, 1)
    safe = torch.where(valid, idx, torch.zeros_like(idx))
    group = torch.arange(h_kv, device=idx.device).view(1, -1, 1)
    keys = kv[safe, group].to(acc)
    # Zero what invalid slots read (row 0 may hold NaN); masking by multiply would keep the NaN.
    keys = torch.where(valid.unsqueeze(-1), keys, torch.zeros((), dtype=acc, device=keys.device))
    c = t1 - t0
    heads = q.shape[1]
    qc = q[t0:t1].to(acc).view(c, h_kv, heads // h_kv, d_qk)
    scores = torch.einsum("cgjd,cgkd->cgjk", qc, keys)
    return scores, keys, valid, qc


def _row_stats(scores, valid, sm_scale, attn_sink, h_kv):
    """Scaled scores with invalid slots at -inf, the sink-free lse, and the lse that normalizes P."""
    scaled = (scores * sm_scale).masked_fill(~valid.unsqueeze(2), float("-inf"))
    lse = torch.logsumexp(scaled, dim=-1)
    if attn_sink is not None:
        sink = attn_sink.to(lse.dtype).view(1, h_kv, -1)
        lse_norm = torch.logaddexp(lse, sink.expand_as(lse))
    else:
        lse_norm = lse
    # An empty row has lse -inf; normalizing by 0 instead keeps exp(-inf - 0) = 0, never NaN.
    lse_safe = torch.where(torch.isneginf(lse_norm), torch.zeros_like(lse_norm), lse_norm)
    return scaled, lse, lse_norm, lse_safe


def sparse_attn_reference(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int,
    attn_sink: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    t, heads, d_qk = q.shape
    _, h_kv, _ = kv.shape
    topk = indices.shape[-1]
    acc = _accumulate_dtype(q.dtype)
    out = torch.empty((t, heads, d_v), dtype=q.dtype, device=q.device)
    lse_out = torch.empty((t, heads), dtype=torch.float32, device=q.device)
    step = _row_chunk(t, h_kv, topk, d_qk, acc)
    for t0 in range(0, t, step):
        t1 = min(t, t0 + step)
        scores, keys, valid, _ = _gather_chunk(q, kv, indices, topk_length, t0, t1, acc)
        scaled, lse, _, lse_safe = _row_stats(scores, valid, sm_scale, attn_sink, h_kv)
        p = torch.exp(scaled - lse_safe.unsqueeze(-1))
        o = torch.einsum("cgjk,cgkd->cgjd", p, keys[..., :d_v])
        out[t0:t1] = o.reshape(t1 - t0, heads, d_v).to(q.dtype)
        lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
        lse_out[t0:t1] = lse.reshape(t1 - t0, heads).float()
    return out, lse_out


def sparse_attn_backward_reference(
    dout: torch.Tensor,
    dlse: Optional[torch.Tensor],
    q: torch.Tensor,
    kv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int,
    attn_sink: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sparse_attn_reference`` for q, kv and attn_sink, recomputing P from ``lse``.

    With P' the probabilities including the sink and delta = rowsum(dout * out):
        dS = P' * (dout . v - delta) + P * dlse,   dq = scale * dS @ K,   dK = scale * dS^T @ q,
        dV += P'^T @ dout,   dsink[h] = -sum_t exp(sink[h] - lse'[t, h]) * delta[t, h].
    dkv accumulates in fp32 across queries that share keys. ``d_sink`` is empty without a sink.
    """
    t, heads, d_qk = q.shape
    s_kv, h_kv, _ = kv.shape
    hpg = heads // h_kv
    topk = indices.shape[-1]
    acc = _accumulate_dtype(q.dtype)
    dq = torch.empty_like(q)
    dkv = torch.zeros((s_kv, h_kv, d_qk), dtype=acc, device=kv.device)
    dsink = torch.zeros((heads if attn_sink is not None else 0,), dtype=torch.float32, device=q.device)
    group = torch.arange(h_kv, device=q.device).view(1, -1, 1)
    step = _row_chunk(t, h_kv, topk, d_qk, acc)
    for t0 in range(0, t, step):
        t1 = min(t, t0 + step)
        c = t1 - t0
        scores, keys, valid, qc = _gather_chunk(q, kv, indices, topk_length, t0, t1, acc)
        scaled = (scores * sm_scale).masked_fill(~valid.unsqueeze(2), float("-inf"))
        lse_raw = lse[t0:t1].to(acc).view(c, h_kv, hpg)
        lse_raw = torch.where(torch.isposinf(lse_raw), torch.full_like(lse_raw, float("-inf")), lse_raw)
        if attn_sink is not None:
            sink = attn_sink.to(acc).view(1, h_kv, hpg).expand_as(lse_raw)
            lse_norm = torch.logaddexp(lse_raw, sink)
        else:
            lse_norm = lse_raw
        lse_safe = torch.where(torch.isneginf(lse_norm), torch.zeros_like(lse_norm), lse_norm)
        p = torch.exp(scaled - lse_safe.unsqueeze(-1))
        do = dout[t0:t1].to(acc).view(c, h_kv, hpg, d_v)
        delta = (do * out[t0:t1].to(acc).view(c, h_kv, hpg, d_v)).sum(-1)
        dp = torch.einsum("cgjd,cgkd->cgjk", do, keys[..., :d_v])
        ds = p * (dp - delta.unsqueeze(-1))
        if dlse is not None:
            lse_raw_safe = torch.where(torch.isneginf(lse_raw), torch.zeros_like(lse_raw), lse_raw)
            p_no_sink = torch.exp(scaled - lse_raw_safe.unsqueeze(-1))
            ds = ds + p_no_sink * dlse[t0:t1].to(acc).view(c, h_kv, hpg).unsqueeze(-1)
        dq[t0:t1] = (torch.einsum("cgjk,cgkd->cgjd", ds, keys) * sm_scale).reshape(c, heads, d_qk).to(q.dtype)
        dkeys = torch.einsum("cgjk,cgjd->cgkd", ds, qc) * sm_scale
        dkeys[..., :d_v] += torch.einsum("cgjk,cgjd->cgkd", p, do)
        dkeys = torch.where(valid.unsqueeze(-1), dkeys, torch.zeros((), dtype=acc, device=q.device))
        idx = torch.where(valid, indices[t0:t1].long(), torch.zeros((), dtype=torch.long, device=q.device))
        dkv.index_put_((idx, group.expand_as(idx)), dkeys, accumulate=True)
        if attn_sink is not None:
            w = torch.where(torch.isneginf(lse_norm), torch.zeros_like(lse_norm), torch.exp(sink - lse_safe))
            dsink -= (w * delta).sum(0).reshape(heads).float()
    return dq, dkv.to(kv.dtype), dsink
