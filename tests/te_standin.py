"""A stand-in for Transformer Engine's quantized tensors (TE cannot be installed without CUDA).

Pinned to upstream NVIDIA/TransformerEngine 2.19-2.20 (transformer_engine/pytorch/tensor/
float8_tensor.py, mxfp8_tensor.py, storage/*_storage.py, quantized_tensor.py, constants.py):
- ``Float8Tensor``: uint8 ``_data``, fp32 ``_scale_inv`` of shape (1,) (dequant multiplier),
  ``_fp8_dtype`` a ``DType`` IntEnum member, ``_transpose``/``_transpose_invalid``, ``_quantizer``;
- ``MXFP8Tensor``: uint8 ``_rowwise_data``/``_columnwise_data`` and E8M0 (uint8) scale-inverse tensors
  ``_rowwise_scale_inv``/``_columnwise_scale_inv``, one scale per 32 values;
- the nominal ``dtype`` is the logical one (bf16), never the storage dtype;
- ``__tensor_flatten__`` returns the present inner tensor names in field order and a ctx dict with
  ``cls``, ``is_tensor``, ``requires_grad`` and ``nontensor_kwargs`` (TE >= 2.19);
- ``__torch_dispatch__`` handles a few ops itself and, for any other op, DEQUANTIZES its quantized
  arguments and runs the op in high precision: the silent downgrade the compiler must not copy.
Only this stand-in runs on CPU; it proves the adapter reads these fields, not that real TE works.
"""

from __future__ import annotations

import enum
import sys
import types

import torch
from torch.utils._pytree import tree_map

MODULE = "transformer_engine.pytorch.tensor.float8_tensor"
UPSTREAM_FIELDS = {
    "Float8Tensor": ("_data", "_scale_inv", "_fp8_dtype", "_transpose", "_transpose_invalid", "_quantizer"),
    "MXFP8Tensor": ("_rowwise_data", "_rowwise_scale_inv", "_columnwise_data", "_columnwise_scale_inv", "_fp8_dtype", "_quantizer"),
}


class DType(enum.IntEnum):  # transformer_engine_torch.DType values
    kByte = 0
    kFloat32 = 4
    kFloat16 = 5
    kBFloat16 = 6
    kFloat8E4M3 = 7
    kFloat8E5M2 = 8


TORCH_FP8 = {DType.kFloat8E4M3: torch.float8_e4m3fn, DType.kFloat8E5M2: torch.float8_e5m2}


class QuantizedTensor(torch.Tensor):
    _INNER: tuple = ()

    @staticmethod
    def __new__(cls, shape, dtype, device, requires_grad=False, **fields):
        self = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=requires_grad)
        for k, v in fields.items():
            setattr(self, k, v)
        return self

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self):  # TE prints its fields, never the generic tensor formatter (it would dispatch ops)
        return f"{type(self).__name__}(shape={list(self.shape)}, dtype={self.dtype}, fp8_dtype={self._fp8_dtype.name})"

    def __tensor_flatten__(self):
        names = [n for n in self._INNER if getattr(self, n, None) is not None]
        ctx = {"cls": type(self), "is_tensor": True, "requires_grad": self.requires_grad, "nontensor_kwargs": self._nontensor()}
        return names, ctx

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        cls = ctx["cls"]
        fields = {n: inner.get(n) for n in cls._INNER}
        return cls(outer_size, ctx["nontensor_kwargs"]["fake_dtype"], next(iter(inner.values())).device, ctx["requires_grad"], **fields, **cls._rebuild(ctx["nontensor_kwargs"]))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.detach.default:
            t = args[0]
            return type(t)(t.shape, t.dtype, t.device, False, **{n: getattr(t, n) for n in t._INNER}, **t._rebuild(t._nontensor()))
        # TE's generic fallback: dequantize and run the op in high precision.
        unwrap = lambda x: x.dequantize() if isinstance(x, QuantizedTensor) else x  # noqa: E731
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


class Float8Tensor(QuantizedTensor):
    _INNER = ("_data", "_transpose", "_scale_inv")

    def _nontensor(self):
        return {"fp8_dtype": self._fp8_dtype, "quantizer": self._quantizer, "fake_dtype": self.dtype}

    @staticmethod
    def _rebuild(kw):
        return {"_fp8_dtype": kw["fp8_dtype"], "_quantizer": kw["quantizer"], "_transpose_invalid": True}

    def dequantize(self, *, dtype=None):
        return (self._data.view(TORCH_FP8[self._fp8_dtype]).float() * self._scale_inv).to(dtype or self.dtype)


class MXFP8Tensor(QuantizedTensor):
    _INNER = ("_rowwise_data", "_columnwise_data", "_rowwise_scale_inv", "_columnwise_scale_inv")

    def _nontensor(self):
        return {"fp8_dtype": self._fp8_dtype, "quantizer": self._quantizer, "fake_dtype": self.dtype}

    @staticmethod
    def _rebuild(kw):
        return {"_fp8_dtype": kw["fp8_dtype"], "_quantizer": kw["quantizer"]}

    def dequantize(self, *, dtype=None):
        data = self._rowwise_data.view(TORCH_FP8[self._fp8_dtype]).float()
        scale = torch.exp2(self._rowwise_scale_inv.float() - 127.0).repeat_interleave(32, dim=-1)
        return (data * scale).to(dtype or self.dtype)


for _cls in (QuantizedTensor, Float8Tensor, MXFP8Tensor):
    _cls.__module__ = MODULE


def float8_tensor(x: torch.Tensor, fp8: DType = DType.kFloat8E4M3) -> Float8Tensor:
    """Quantize like TE's current-scaling quantizer: one scale for the tensor."""
    scale_inv = (x.float().abs().amax() / 448.0).clamp(min=1e-12).reshape(1)
    data = (x.float() / scale_inv).to(TORCH_FP8[fp8]).view(torch.uint8)
    return Float8Tensor(x.shape, x.dtype, x.device, False, _data=data, _scale_inv=scale_inv, _fp8_dtype=fp8,
                        _transpose=None, _transpose_invalid=True, _quantizer=None)


def mxfp8_tensor(x: torch.Tensor) -> MXFP8Tensor:
    """MXFP8: an E8M0 (power-of-two) scale per 32 values along rows."""
    blocks = x.float().unflatten(-1, (-1, 32))
    exp = torch.ceil(torch.log2((blocks.abs().amax(-1) / 448.0).clamp(min=2.0**-126)))
    data = (blocks / torch.exp2(exp).unsqueeze(-1)).flatten(-2).to(torch.float8_e4m3fn).view(torch.uint8)
    return MXFP8Tensor(x.shape, x.dtype, x.device, False, _rowwise_data=data, _rowwise_scale_inv=(exp + 127).to(torch.uint8),
                       _columnwise_data=None, _columnwise_scale_inv=None, _fp8_dtype=DType.kFloat8E4M3, _quantizer=None)


def install() -> None:
    """Make the stand-in importable under Transformer Engine's module names (tests only)."""
    for name in ("transformer_engine", "transformer_engine.pytorch", "transformer_engine.pytorch.tensor"):
        sys.modules.setdefault(name, types.ModuleType(name))
    mod = types.ModuleType(MODULE)
    mod.Float8Tensor, mod.MXFP8Tensor, mod.QuantizedTensor = Float8Tensor, MXFP8Tensor, QuantizedTensor
    sys.modules[MODULE] = mod


def uninstall() -> None:
    for name in (MODULE, "transformer_engine.pytorch.tensor", "transformer_engine.pytorch", "transformer_engine"):
        sys.modules.pop(name, None)
