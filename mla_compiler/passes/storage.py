"""How a tensor is stored: plain, or an FP8 payload with its scale, read from type and flatten output.

``.dtype`` is never trusted (every FP8 wrapper reports its logical dtype, bf16) and
``hasattr(t, "dequantize")`` is never asked (every tensor has it). Transformer Engine is recognized
without importing it: by module name, class names in the MRO, and its field names (pinned to
NVIDIA/TransformerEngine 2.x: ``_data``/``_scale_inv``/``_fp8_dtype`` and the rowwise/columnwise
variants of MXFP8 and blockwise tensors).

Scale conventions are normalized to one: ``dequant`` means hp = payload * scale. torchao's
training tensor stores the reciprocal (fp8 = hp * _scale); its facts say ``quant`` and the
lowering takes the reciprocal at the boundary.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from mla_compiler.sites import StorageFacts

FLOAT8_DTYPES = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
    if hasattr(torch, name)
)
FLASHMLA_FP8_TOKEN_BYTES = 656  # 512 e4m3 + 4 fp32 tile scales + 64 bf16 rope
TE_CLASSES = ("QuantizedTensor", "Float8Tensor", "MXFP8Tensor", "Float8BlockwiseQTensor", "NVFP4Tensor")


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _shape(t: Optional[torch.Tensor]) -> Optional[list]:
    return None if t is None else [str(s) for s in t.shape]


def _granularity(payload: torch.Tensor, scale: Optional[torch.Tensor], block_size=None) -> str:
    if scale is None:
        return "none"
    if block_size is not None and len(block_size) == payload.dim():
        sizes = list(payload.shape)
        if all(str(b) == str(s) for b, s in zip(block_size, sizes)):
            return "per-tensor"
        if all(b == 1 for b in block_size[:-1]):
            return "per-row" if str(block_size[-1]) == str(sizes[-1]) else f"per-{block_size[-1]}-tile"
        return "block " + "x".join(str(b) for b in block_size)
    n = scale.numel()
    if n == 1:
        return "per-tensor"
    if scale.dim() == payload.dim() and str(scale.shape[-1]) == "1":
        return "per-row"
    if scale.dim() == payload.dim() and str(scale.shape[0]) == "1":
        return "per-column"
    return f"{n} scales"


def is_te_tensor(t: Any) -> bool:
    """A Transformer Engine quantized tensor, recognized without importing TE."""
    mod = type(t).__module__ or ""
    names = {c.__name__ for c in type(t).__mro__}
    return mod.startswith("transformer_engine.") and bool(names & set(TE_CLASSES))


def storage_facts(t: Any) -> StorageFacts:
    if not isinstance(t, torch.Tensor):
        return StorageFacts("not a tensor", type(t).__name__, "-")
    cls = type(t)
    name = cls.__name__
    mod = cls.__module__ or ""
    logical = _dtype_name(t.dtype)
    if mod.startswith("torchao.") and name == "Float8TrainingTensor":
        data, scale = t._data, t._scale
        return StorageFacts("torchao Float8TrainingTensor", logical, _dtype_name(data.dtype), f"_scale {_shape(scale)}", "quant", _granularity(data, scale))
    if mod.startswith("torchao.") and name == "Float8Tensor":
        data, scale = t.qdata, t.scale
        return StorageFacts("torchao Float8Tensor", logical, _dtype_name(data.dtype), f"scale {_shape(scale)}", "dequant", _granularity(data, scale, getattr(t, "block_size", None)))
    if mod.startswith("torchao.") and name == "WeightWithDynamicFloat8CastTensor":
        return StorageFacts("torchao WeightWithDynamicFloat8CastTensor", logical, _dtype_name(t._tensor.dtype), "cast to fp8 at all-gather", "none", "per-tensor")
    if is_te_tensor(t):
        for data_name, scale_name in (("_data", "_scale_inv"), ("_rowwise_data", "_rowwise_scale_inv"), ("_columnwise_data", "_columnwise_scale_inv")):
            data = getattr(t, data_name, None)
            if isinstance(data, torch.Tensor):
                scale = getattr(t, scale_name, None)
                fp8 = getattr(t, "_fp8_dtype", None)
                payload = f"{_dtype_name(data.dtype)} ({getattr(fp8, 'name', fp8)})" if fp8 is not None else _dtype_name(data.dtype)
                return StorageFacts(f"transformer_engine {name}", logical, payload, f"{scale_name} {_shape(scale)}", "dequant", _granularity(data, scale))
        return StorageFacts(f"transformer_engine {name}", logical, "unknown (no payload field)", None, "unknown", "unknown")
    if is_traceable_wrapper_subclass(t):
        inner, _ = t.__tensor_flatten__()
        return StorageFacts(f"subclass {mod}.{name}", logical, ", ".join(f"{n}:{_dtype_name(getattr(t, n).dtype)}" for n in inner))
    if t.dtype in FLOAT8_DTYPES:
        return StorageFacts("float8 payload", logical, logical, "separate (not attached)", "unknown", "unknown")
    if t.dtype == torch.uint8 and t.dim() >= 1 and t.shape[-1] == FLASHMLA_FP8_TOKEN_BYTES:
        return StorageFacts("FlashMLA FP8 KV cache (656 B/token)", "bfloat16", "float8_e4m3fn + bf16 rope", "4 fp32 per token (128-wide tiles)", "dequant", "per-128-tile")
    return StorageFacts("plain", logical, logical)


def is_fp8(facts: StorageFacts) -> bool:
    return facts.kind not in ("plain", "not a tensor") and not facts.kind.startswith("subclass ")
