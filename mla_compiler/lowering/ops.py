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

from mla_compiler.errors import SparseAttnArgumentError
from mla_compiler.kernels import fp8_reference
from mla_compiler.lowering.contract import check_sparse_attn_args, check_sparse_attn_fp8kv_args
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


@torch.library.custom_op(f"{NAMESPACE}::sparse_attn_fp8kv", mutates_args=())
def sparse_attn_fp8kv(
    q: torch.Tensor,
    kv_latent: torch.Tensor,
    kv_scale: torch.Tensor,
    kv_rope: Optional[torch.Tensor],
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int,
    attn_sink: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
    fp8_products: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA over an FP8 latent: kv = [kv_latent * kv_scale (per row and tile), kv_rope],
    dequantized inside the kernel. kv_latent float8 [S_kv, d_latent], kv_scale float32
    [S_kv, n_tiles], kv_rope [S_kv, d_rope] or None, indices [T, 1, topk] int32. Forward only.
    ``fp8_products``: on Hopper, where it applies, the FP8-products kernel runs instead (e4m3 Q K^T
    and P V): 1 (or True), Q and P rounded to e4m3 (fastest, less accurate;
    ``make_backend(fp8_products=True)``); 2, each as two e4m3 terms (the layout's own error;
    ``make_backend(fp8_products="two_term")``); 0 (or False), not asked for."""
    check_sparse_attn_fp8kv_args(q, kv_latent, kv_scale, kv_rope, indices, sm_scale, d_v, attn_sink, topk_length, fp8_products)
    layout = (kv_latent.shape[1], kv_rope.shape[1] if kv_rope is not None else 0, kv_scale.shape[1])
    impl = kernel_for(problem_of(q, kv_latent, indices, d_v, fp8_layout=layout, fp8_products=fp8_products))
    return impl.forward_fp8(q, kv_latent, kv_scale, kv_rope, indices, sm_scale, d_v, attn_sink, topk_length, products=fp8_products)


@sparse_attn_fp8kv.register_fake
def _sparse_attn_fp8kv_fake(q, kv_latent, kv_scale, kv_rope, indices, sm_scale, d_v, attn_sink=None, topk_length=None, fp8_products=0):
    check_sparse_attn_fp8kv_args(q, kv_latent, kv_scale, kv_rope, indices, sm_scale, d_v, attn_sink, topk_length, fp8_products)
    t, heads, _ = q.shape
    return q.new_empty((t, heads, d_v)), q.new_empty((t, heads), dtype=torch.float32)


def _fp8kv_backward(ctx, dout, dlse):
    raise NotImplementedError(
        "sparse_mla.sparse_attn_fp8kv has no backward: an FP8 KV cache is for inference. To train "
        "through it, compile with make_backend(fp8='dequantize') (the bf16 kernels then run on the "
        "dequantized cache) or keep the cache in bf16."
    )


sparse_attn_fp8kv.register_autograd(_fp8kv_backward, setup_context=lambda ctx, inputs, output: None)


@torch.library.custom_op(f"{NAMESPACE}::flashmla_kv_dequant", mutates_args=())
def flashmla_kv_dequant(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A FlashMLA FP8 KV cache (uint8 [..., 656]) as (latent bf16 [..., 512], rope bf16 [..., 64]).
    Models call it where they read the cache; the compiler reads the FP8 bytes directly instead."""
    return fp8_reference.dequantize_flashmla(cache)


@flashmla_kv_dequant.register_fake
def _flashmla_kv_dequant_fake(cache):
    if cache.dtype != torch.uint8 or cache.shape[-1] != fp8_reference.TOKEN_BYTES:
        raise SparseAttnArgumentError(f"flashmla_kv_dequant: argument 'cache' is {cache.dtype} {list(cache.shape)}. Expected uint8 [..., 656]")
    lead = cache.shape[:-1]
    return cache.new_empty((*lead, fp8_reference.LATENT), dtype=torch.bfloat16), cache.new_empty((*lead, fp8_reference.ROPE), dtype=torch.bfloat16)


@torch.library.custom_op(f"{NAMESPACE}::flashmla_kv_quant", mutates_args=())
def flashmla_kv_quant(latent: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """latent [..., 512] and rope [..., 64] as a FlashMLA FP8 cache row (uint8 [..., 656])."""
    return fp8_reference.quantize_flashmla(latent, rope)


@flashmla_kv_quant.register_fake
def _flashmla_kv_quant_fake(latent, rope):
    return latent.new_empty((*latent.shape[:-1], fp8_reference.TOKEN_BYTES), dtype=torch.uint8)
