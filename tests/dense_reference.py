"""Dense fp64 sparse-MLA reference for tests: the op's semantics written the slow, obvious way.

Scores against every key row, plus log(count of the row in the row's valid indices) so duplicates
count as often as they appear, -inf where a key is not selected. Rows of kv no index selects are
zeroed first, so NaN there cannot leak into values or gradients.
"""

import torch


def dense_sparse_attn(q, kv, indices, sm_scale, d_v, attn_sink=None, topk_length=None):
    t, heads, d_qk = q.shape
    s_kv, h_kv, _ = kv.shape
    hpg = heads // h_kv
    idx = indices.long()
    valid = (idx >= 0) & (idx < s_kv)
    if topk_length is not None:
        valid &= torch.arange(idx.shape[-1]).view(1, 1, -1) < topk_length.long().view(-1, 1, 1)
    count = torch.zeros(t, h_kv, s_kv, dtype=torch.float64)
    count.scatter_add_(-1, torch.where(valid, idx, 0), valid.double())
    used = (count.sum(0) > 0).T.unsqueeze(-1)  # [s_kv, h_kv, 1]
    kv_safe = torch.where(used, kv.double(), torch.zeros((), dtype=torch.float64))
    qg = q.double().view(t, h_kv, hpg, d_qk)
    scores = torch.einsum("tgjd,sgd->tgjs", qg, kv_safe) * sm_scale
    selected = (count > 0).unsqueeze(2)
    scores = torch.where(selected, scores + count.clamp_min(1).log().unsqueeze(2), torch.tensor(float("-inf"), dtype=torch.float64))
    # logsumexp of an all -inf row has a NaN gradient: take it over zeros there, then put -inf back.
    empty = ~selected.any(-1)
    lse = torch.logsumexp(torch.where(empty.unsqueeze(-1), torch.zeros_like(scores), scores), dim=-1)
    lse = torch.where(empty, torch.full_like(lse, float("-inf")), lse)
    if attn_sink is not None:
        lse_norm = torch.logaddexp(lse, attn_sink.double().view(1, h_kv, hpg).expand_as(lse))
    else:
        lse_norm = lse
    lse_safe = torch.where(torch.isneginf(lse_norm), torch.zeros_like(lse_norm), lse_norm)
    p = torch.exp(scores - lse_safe.unsqueeze(-1))
    out = torch.einsum("tgjs,sgd->tgjd", p, kv_safe[..., :d_v]).reshape(t, heads, d_v)
    lse = torch.where(empty, torch.full_like(lse, float("inf")), lse).reshape(t, heads)
    return out, lse
