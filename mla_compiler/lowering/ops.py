"""The canonical op every matched site becomes: ``torch.ops.sparse_mla.sparse_attn``.

    out [T, H, d_v], lse [T, H] = sparse_attn(q [T, H, d_qk], kv [S_kv, h_kv, d_qk],
                                              indices [T, h_kv, topk] int32, sm_scale, d_v,
                                              attn_sink [H] fp32 = None, topk_length [T] int32 = None)

Semantics are FlashMLA's ``flash_mla_sparse_fwd`` (see kernels/reference.py). The backward is its
own op, ``sparse_attn_bwd``, so AOTAutograd traces it as one node with a fake kernel. Both ops pick
their kernel through lowering/dispatch.py at call time.
"""

from __future__ import annotations

from typing import Optional

import torch

from mla_compiler.lowering.contract import check_sparse_attn_args
from mla_compiler.lowering.dispatch import kernel_for, problem_of

NAMESPACE = "sparse_mla"


@torch.library.custom_op(f"{NAMESPACE}::sparse_attn", mutates_args=())
def sparse_attn(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int,
    attn_sink: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_sparse_attn_args(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)
    impl = kernel_for(problem_of(q, kv, indices, d_v))
    return impl.forward(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)


@sparse_attn.register_fake
def _sparse_attn_fake(q, kv, indices, sm_scale, d_v, attn_sink=None, topk_length=None):
    check_sparse_attn_args(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)
    t, heads, _ = q.shape
    return q.new_empty((t, heads, d_v)), q.new_empty((t, heads), dtype=torch.float32)


@torch.library.custom_op(f"{NAMESPACE}::sparse_attn_bwd", mutates_args=())
def sparse_attn_bwd(
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
    """dq [T, H, d_qk], dkv [S_kv, h_kv, d_qk], d_attn_sink [H] (empty [0] without a sink)."""
    impl = kernel_for(problem_of(q, kv, indices, d_v))
    return impl.backward(dout.contiguous(), dlse, q, kv, out, lse, indices, sm_scale, d_v, attn_sink, topk_length)


@sparse_attn_bwd.register_fake
def _sparse_attn_bwd_fake(dout, dlse, q, kv, out, lse, indices, sm_scale, d_v, attn_sink=None, topk_length=None):
    n_sink = attn_sink.shape[0] if attn_sink is not None else 0
    return torch.empty_like(q), torch.empty_like(kv), q.new_empty((n_sink,), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, kv, indices, sm_scale, d_v, attn_sink, topk_length = inputs
    out, lse = output
    ctx.save_for_backward(q, kv, indices, out, lse, attn_sink, topk_length)
    ctx.sm_scale = sm_scale
    ctx.d_v = d_v


def _backward(ctx, dout, dlse):
    q, kv, indices, out, lse, attn_sink, topk_length = ctx.saved_tensors
    dq, dkv, dsink = torch.ops.sparse_mla.sparse_attn_bwd(
        dout, dlse, q, kv, out, lse, indices, ctx.sm_scale, ctx.d_v, attn_sink, topk_length
    )
    return dq, dkv, None, None, None, (dsink if attn_sink is not None else None), None


sparse_attn.register_autograd(_backward, setup_context=_setup_context)
