"""Argument checks of ``sparse_mla.sparse_attn``: every error names the argument and the fix.

Runs in the real kernel and in the fake kernel, so a bad call fails at compile time too. The checks
read shapes and dtypes only, never tensor values (no host synchronization).
"""

from __future__ import annotations

from typing import Optional

import torch

from mla_compiler.errors import SparseAttnArgumentError

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _fail(arg: str, problem: str, fix: str) -> None:
    raise SparseAttnArgumentError(f"sparse_attn: argument '{arg}' {problem}. {fix}")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_sparse_attn_args(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int,
    attn_sink: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
) -> None:
    if q.dim() != 3:
        _fail("q", f"has rank {q.dim()} (shape {_shape(q)})", "Expected [T, H, d_qk]: flatten batch and sequence into T")
    if kv.dim() != 3:
        _fail("kv", f"has rank {kv.dim()} (shape {_shape(kv)})", "Expected [S_kv, h_kv, d_qk]; for one shared latent use kv.unsqueeze(1)")
    if indices.dim() != 3:
        _fail("indices", f"has rank {indices.dim()} (shape {_shape(indices)})", "Expected [T, h_kv, topk]; for one key group use indices.unsqueeze(1)")
    if q.dtype not in FLOAT_DTYPES:
        _fail("q", f"has dtype {q.dtype}", "Expected bfloat16, float16, float32 or float64")
    if kv.dtype != q.dtype:
        _fail("kv", f"has dtype {kv.dtype} but q has {q.dtype}", "Cast both to one dtype")
    if indices.dtype != torch.int32:
        kind = "a floating" if indices.dtype.is_floating_point else "an unsupported"
        _fail("indices", f"has {kind} dtype {indices.dtype}", "Expected int32 token indices: use indices.to(torch.int32)")
    if not isinstance(d_v, int) or isinstance(d_v, bool):
        _fail("d_v", f"is {d_v!r}", "Expected a positive int")
    t, heads, d_qk = q.shape
    s_kv, h_kv, d_qk_kv = kv.shape
    if d_qk_kv != d_qk:
        _fail("kv", f"has d_qk {d_qk_kv} but q has {d_qk}", "q and kv must share the last (feature) dimension")
    if d_v <= 0 or d_v > d_qk:
        _fail("d_v", f"is {d_v}, outside 1..d_qk ({d_qk})", "V is the first d_v columns of kv, so d_v <= d_qk")
    if h_kv < 1 or heads % h_kv != 0:
        _fail("kv", f"has {h_kv} key groups for {heads} query heads", "h_kv must divide the number of heads")
    if indices.shape[0] != t:
        _fail("indices", f"has {indices.shape[0]} rows but q has {t} tokens", "Expected one row of indices per query token")
    if indices.shape[1] != h_kv:
        _fail("indices", f"has {indices.shape[1]} groups but kv has h_kv {h_kv}", "Expected indices [T, h_kv, topk]")
    if not isinstance(sm_scale, (float, int, torch.SymFloat, torch.SymInt)) or isinstance(sm_scale, bool):
        _fail("sm_scale", f"is {type(sm_scale).__name__}", "Expected a Python float")
    for name, t_ in (("kv", kv), ("indices", indices)):
        if t_.device != q.device:
            _fail(name, f"is on {t_.device} but q is on {q.device}", "Move all inputs to one device")
    if attn_sink is not None:
        if attn_sink.dim() != 1 or attn_sink.shape[0] != heads:
            _fail("attn_sink", f"has shape {_shape(attn_sink)}", f"Expected [H] = [{heads}], one logit per head")
        if attn_sink.dtype != torch.float32:
            _fail("attn_sink", f"has dtype {attn_sink.dtype}", "Expected float32: use attn_sink.float()")
        if attn_sink.device != q.device:
            _fail("attn_sink", f"is on {attn_sink.device} but q is on {q.device}", "Move all inputs to one device")
    if topk_length is not None:
        if topk_length.dim() != 1 or topk_length.shape[0] != t:
            _fail("topk_length", f"has shape {_shape(topk_length)}", f"Expected [T] = [{t}], one length per query token")
        if topk_length.dtype != torch.int32:
            _fail("topk_length", f"has dtype {topk_length.dtype}", "Expected int32: use topk_length.to(torch.int32)")
        if topk_length.device != q.device:
            _fail("topk_length", f"is on {topk_length.device} but q is on {q.device}", "Move all inputs to one device")


FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def check_sparse_attn_fp8kv_args(q, kv_latent, kv_scale, kv_rope, indices, sm_scale, d_v, attn_sink=None, topk_length=None,
                                 fp8_products=0) -> None:
    """``sparse_attn_fp8kv``: the bf16 contract with kv = [dequant(kv_latent, kv_scale), kv_rope]."""
    if fp8_products not in (0, 1, 2):  # True and False are 1 and 0
        _fail("fp8_products", f"is {fp8_products!r}", "Expected 0 (False), 1 (True: e4m3 Q and P) or 2 (each as two e4m3 terms)")
    if kv_latent.dim() != 2:
        _fail("kv_latent", f"has rank {kv_latent.dim()} (shape {_shape(kv_latent)})", "Expected [S_kv, d_latent]: flatten pages into rows (physical index = block * page + offset)")
    if kv_latent.dtype not in FP8_DTYPES:
        _fail("kv_latent", f"has dtype {kv_latent.dtype}", "Expected a float8 payload (float8_e4m3fn); for bf16 keys use sparse_attn")
    s_kv, d_lat = kv_latent.shape
    if kv_scale.dim() != 2 or kv_scale.shape[0] != s_kv:
        _fail("kv_scale", f"has shape {_shape(kv_scale)}", f"Expected [S_kv, n_tiles] = [{s_kv}, n], one dequant scale per row and tile")
    if kv_scale.dtype != torch.float32:
        _fail("kv_scale", f"has dtype {kv_scale.dtype}", "Expected float32 dequant multipliers")
    if d_lat % kv_scale.shape[1] != 0:
        _fail("kv_scale", f"has {kv_scale.shape[1]} tiles for a latent of width {d_lat}", "The tile count must divide the latent width")
    d_rope = 0
    if kv_rope is not None:
        if kv_rope.dim() != 2 or kv_rope.shape[0] != s_kv:
            _fail("kv_rope", f"has shape {_shape(kv_rope)}", f"Expected [S_kv, d_rope] with S_kv = {s_kv}")
        if kv_rope.dtype != q.dtype:
            _fail("kv_rope", f"has dtype {kv_rope.dtype} but q has {q.dtype}", "Cast the rope part to q's dtype")
        d_rope = kv_rope.shape[1]
    if q.dim() != 3 or q.shape[-1] != d_lat + d_rope:
        _fail("q", f"has shape {_shape(q)}", f"Expected [T, H, d_latent + d_rope] = [T, H, {d_lat + d_rope}]")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        _fail("q", f"has dtype {q.dtype}", "Expected bfloat16, float16 or float32")
    if indices.dim() != 3 or indices.shape[1] != 1 or indices.shape[0] != q.shape[0]:
        _fail("indices", f"has shape {_shape(indices)}", f"Expected [T, 1, topk] with T = {q.shape[0]} (one key group)")
    if indices.dtype != torch.int32:
        _fail("indices", f"has dtype {indices.dtype}", "Expected int32 token indices: use indices.to(torch.int32)")
    if not isinstance(d_v, int) or d_v <= 0 or d_v > d_lat:
        _fail("d_v", f"is {d_v!r}", f"Expected 1..d_latent ({d_lat}): V is the leading columns of the dequantized latent")
    for name, t_ in (("kv_latent", kv_latent), ("kv_scale", kv_scale), ("indices", indices)) + ((("kv_rope", kv_rope),) if kv_rope is not None else ()):
        if t_.device != q.device:
            _fail(name, f"is on {t_.device} but q is on {q.device}", "Move all inputs to one device")
    if attn_sink is not None and (attn_sink.dim() != 1 or attn_sink.shape[0] != q.shape[1] or attn_sink.dtype != torch.float32):
        _fail("attn_sink", f"has shape {_shape(attn_sink)} and dtype {attn_sink.dtype}", f"Expected float32 [H] = [{q.shape[1]}]")
    if topk_length is not None and (topk_length.dim() != 1 or topk_length.shape[0] != q.shape[0] or topk_length.dtype != torch.int32):
        _fail("topk_length", f"has shape {_shape(topk_length)} and dtype {topk_length.dtype}", f"Expected int32 [T] = [{q.shape[0]}]")
