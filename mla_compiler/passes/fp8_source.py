"""Is a site's key latent FP8 storage that the user's graph dequantizes? Read where it comes from.

The shapes of dequantization recognized at the Dynamo level, where the storage is visible:
``flashmla_kv_dequant(cache)`` (FlashMLA's 656-byte layout), ``t.dequantize()`` (or torchao
training's ``t.to_original_precision()``) of an FP8 tensor subclass (torchao, Transformer Engine;
identified by storage facts, never by ``.dtype``), and ``payload.float() * scale`` or
``payload.float() / scale`` with a float8 payload and a per-row or per-tensor scale, a tensor or a
Python number. A latent concatenated with the rope before the product is recognized too, and
reported as a layout the FP8 kernels do not take (they read the latent and the rope separately).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
import torch.fx

from mla_compiler.passes import fx_ops
from mla_compiler.passes.storage import FLOAT8_DTYPES, _dtype_name, is_fp8, storage_facts
from mla_compiler.sites import Fp8Latent, StorageFacts

_TE_FP8 = {"kFloat8E4M3": torch.float8_e4m3fn, "kFloat8E5M2": torch.float8_e5m2}


def _is_op(node, name: str) -> bool:
    target = getattr(node, "target", None)
    packet = getattr(getattr(torch.ops, "sparse_mla", None), name, None)
    return node is not None and node.op == "call_function" and packet is not None and target in (packet, getattr(packet, "default", None))


def _strip(node: torch.fx.Node) -> torch.fx.Node:
    while fx_ops.kind_of(node) in ("to_dtype", "identity") and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


def _float8(node) -> bool:
    t = fx_ops.meta_tensor(node)
    return t is not None and type(t).__name__ in ("FakeTensor", "Tensor", "FunctionalTensor") and t.dtype in FLOAT8_DTYPES


def fp8_latent(latent_source: torch.fx.Node, rope_source: Optional[torch.fx.Node]) -> Optional[Fp8Latent]:
    node = _strip(latent_source)
    # FlashMLA layout, read through flashmla_kv_dequant(cache)[0]
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0 and _is_op(node.args[0], "flashmla_kv_dequant"):
        dequant = node.args[0]
        cache = dequant.args[0]
        rope = _strip(rope_source) if rope_source is not None else None
        in_cache = rope is not None and rope.op == "call_function" and rope.target is operator.getitem and rope.args[0] is dequant and rope.args[1] == 1
        facts = storage_facts(fx_ops.meta_tensor(cache))
        return Fp8Latent("flashmla", facts, cache, n_tiles=4, rope_in_cache=in_cache)
    # A tensor subclass dequantized with .dequantize() (torchao training: .to_original_precision())
    if node.op == "call_method" and node.target in ("dequantize", "to_original_precision") and isinstance(node.args[0], torch.fx.Node):
        sub = node.args[0]
        value = fx_ops.meta_value(sub)
        facts = storage_facts(value)
        if not is_fp8(facts):
            return None
        return _subclass_latent(sub, value, facts)
    # payload.float() * scale, payload.float() / scale
    if fx_ops.kind_of(node) in ("mul", "div"):
        return _payload_times_scale(node)
    # The latent concatenated with the rope (or anything) along the features before the product
    if fx_ops.kind_of(node) == "cat":
        parts = fx_ops.read(node).arg("tensors")
        for part in parts if isinstance(parts, (list, tuple)) else ():
            inner = fp8_latent(part, None) if isinstance(part, torch.fx.Node) else None
            if inner is not None:
                return dataclasses.replace(inner, unsupported=(
                    f"the FP8 latent is concatenated ({node.name}) with other features before the attention products; the "
                    "FP8 kernels read the latent's payload + scale and the bf16 rope as separate operands: keep them apart "
                    "(score = q_lat . latent + q_rope . rope)"))
    return None


def _payload_times_scale(node: torch.fx.Node) -> Optional[Fp8Latent]:
    """``payload.float() * scale`` (either order) or ``payload.float() / scale``, the scale a tensor
    or a Python number; None when neither operand is a float8 payload."""
    a, b = node.args[0], node.args[1]
    divides = fx_ops.kind_of(node) == "div"
    for payload, scale in ((a, b),) if divides else ((a, b), (b, a)):
        p = _strip(payload) if isinstance(payload, torch.fx.Node) else None
        if p is None or not _float8(p):
            continue
        pt = fx_ops.meta_tensor(p)
        dtypes = (_dtype_name(fx_ops.meta_tensor(node).dtype), _dtype_name(pt.dtype))
        convention = "quant (divides)" if divides else "dequant"
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            facts = StorageFacts("float8 payload with a separate scale", *dtypes, f"the number {scale!r}", convention, "per-tensor")
            return Fp8Latent("payload*scale", facts, p, scale_const=1.0 / float(scale) if divides else float(scale))
        st = fx_ops.meta_tensor(scale) if isinstance(scale, torch.fx.Node) else None
        if st is None:
            continue
        granularity = "per-tensor" if st.numel() == 1 else ("per-row" if st.dim() and st.shape[-1] == 1 else f"{list(st.shape)}")
        facts = StorageFacts("float8 payload with a separate scale", *dtypes, f"{scale.name} {list(st.shape)}", convention, granularity)
        why = None
        if not (st.numel() == 1 or (st.dim() == pt.dim() and st.shape[-1] == 1 and list(st.shape[:-1]) == list(pt.shape[:-1]))):
            why = (f"scale of shape {list(st.shape)} for a payload of shape {list(pt.shape)}: the FP8 kernels take one scale "
                   "per tensor or one per row ([..., 1] over the payload's rows), not one shared by a group of rows")
        elif not st.dtype.is_floating_point:
            why = f"scale dtype {st.dtype} (a floating-point scale)"
        return Fp8Latent("payload*scale", facts, p, scale=scale, quant_scale=divides, unsupported=why)
    return None


def _row_tiles(payload: torch.Tensor, scale: torch.Tensor) -> tuple[int, Optional[str]]:
    """Scales an FP8 kernel reads per row: one for the tensor, or per row in a power-of-two number
    of equal column tiles. (n_tiles, None) or (1, why not)."""
    if scale.numel() == 1:
        return 1, None
    if scale.dim() == payload.dim() and list(scale.shape[:-1]) == list(payload.shape[:-1]):
        n, d = int(scale.shape[-1]), int(payload.shape[-1])
        if d % n == 0 and n & (n - 1) == 0:
            return n, None
    return 1, (f"scales of shape {list(scale.shape)} for a payload of shape {list(payload.shape)}: an FP8 kernel takes one "
               "scale per tensor, or per row in a power-of-two number of column tiles, not blocks across rows")


def _subclass_latent(sub: torch.fx.Node, value, facts: StorageFacts) -> Fp8Latent:
    name = type(value).__name__
    if facts.kind == "torchao Float8Tensor":
        n, why = _row_tiles(value.qdata, value.scale)
        return Fp8Latent("subclass", facts, sub, payload_field="qdata", scale_field="scale", n_tiles=n, unsupported=why)
    if facts.kind == "torchao Float8TrainingTensor":
        n, why = _row_tiles(value._data, value._scale)
        return Fp8Latent("subclass", facts, sub, payload_field="_data", scale_field="_scale", quant_scale=True, n_tiles=n, unsupported=why)
    if facts.kind.startswith("transformer_engine"):
        fp8 = getattr(getattr(value, "_fp8_dtype", None), "name", None)
        if name == "Float8Tensor" and fp8 in _TE_FP8:
            return Fp8Latent("subclass", facts, sub, payload_field="_data", scale_field="_scale_inv", payload_dtype=_TE_FP8[fp8])
        return Fp8Latent("subclass", facts, sub, unsupported=f"{name} (MXFP8 / blockwise scales per 32 or 128 values along rows and columns have no FP8 kernel here)")
    return Fp8Latent("subclass", facts, sub, unsupported=f"{facts.kind}: no accessor for its payload and scale")
