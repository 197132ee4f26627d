"""FP8 training with FSDP2: torchao's FP8 conversion first, ``fully_shard`` second, enforced.

DTensor must be the outermost subclass: ``convert_to_float8_training`` has to run before
``fully_shard``. Reversed, the swapped ``Float8Linear`` modules hold already-sharded DTensor
weights that no FSDP state manages (FSDP unshards the replaced modules' parameters, not theirs),
and with FP8 all-gather the weight becomes ``WeightWithDynamicFloat8CastTensor(_tensor=DTensor)``.
The first forward then dies inside the FP8 matmul with "got mixed torch.Tensor and DTensor".

``prepare_fp8_fsdp`` does it in the right order. ``check_shard_order`` finds the reversed order and
raises ``ShardOrderError`` with the fix; importing this package makes every ``torch.compile`` run
it on the module it is about to trace, before tracing (a model with no FSDP or no FP8 is skipped
after one cheap look at its parameters).
"""

from __future__ import annotations

import sys
import weakref
from typing import Any, Callable, Iterable, Optional

import torch.nn as nn

from mla_compiler.errors import ShardOrderError

# Not converted by default: output heads and the indexer (precision), and wkv_b, whose weight the
# absorbed MLA reads directly (view + slice) rather than through the linear: with FP8 all-gather
# FSDP would hand it over as a Float8TrainingTensor, which has no slice backward.
DEFAULT_SKIP = ("head", "lm_head", "output", "indexer", "wkv_b")
_FIX = (
    "Convert first, then shard: torchao.float8.convert_to_float8_training(model, ...) before "
    "fully_shard(block) for each block and fully_shard(model), or call "
    "mla_compiler.distributed.prepare_fp8_fsdp(model, mesh, ...) which does both in that order."
)


def _is_float8_linear(module: nn.Module) -> bool:
    cls = type(module)
    return any(c.__name__ == "Float8Linear" and (c.__module__ or "").startswith("torchao.") for c in cls.__mro__)


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed
        return False
    return isinstance(t, DTensor)


def _is_fp8_cast_weight(t: Any) -> bool:
    return type(t).__name__ == "WeightWithDynamicFloat8CastTensor" and (type(t).__module__ or "").startswith("torchao.")


def _fsdp_managed(model: nn.Module) -> set:
    """(id(module), parameter name) of every parameter an FSDP2 state manages."""
    managed = set()
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return managed
    for mod in model.modules():
        if not isinstance(mod, FSDPModule):
            continue
        state = mod._get_fsdp_state()
        group = getattr(state, "_fsdp_param_group", None)
        for fsdp_param in getattr(group, "fsdp_params", []) if group is not None else []:
            info = fsdp_param._module_info
            managed.add((id(info.module), info.param_name))
            for shared_module, shared_name in zip(getattr(info, "shared_modules", []), getattr(info, "shared_param_names", [])):
                managed.add((id(shared_module), shared_name))
    return managed


def check_shard_order(model: nn.Module) -> None:
    """Raise ``ShardOrderError`` when FP8 conversion ran after ``fully_shard``; else return.

    Looks for: an FP8 weight wrapping a DTensor (``WeightWithDynamicFloat8CastTensor(DTensor)``,
    the inverted nesting), and a ``Float8Linear`` holding a DTensor parameter no FSDP state
    manages. A model with no DTensor parameters returns after one pass over them."""
    params = list(model.named_parameters(remove_duplicate=False))
    for name, p in params:
        if _is_fp8_cast_weight(p) and _is_dtensor(getattr(p, "_tensor", None)):
            raise ShardOrderError(
                f"parameter {name!r} is a WeightWithDynamicFloat8CastTensor wrapping a DTensor: the FP8 "
                f"conversion ran after fully_shard (DTensor must be the outermost subclass). {_FIX}"
            )
    if not any(_is_dtensor(p) for _, p in params):
        return
    managed = _fsdp_managed(model)
    for mod_name, mod in model.named_modules():
        if not _is_float8_linear(mod):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if _is_dtensor(p) and (id(mod), pname) not in managed:
                raise ShardOrderError(
                    f"module {mod_name or type(mod).__name__!r} ({type(mod).__name__}) holds the sharded DTensor "
                    f"parameter {pname!r} but no FSDP state manages it: torchao's FP8 conversion replaced the "
                    f"module after fully_shard, so its weight would never be all-gathered. {_FIX}"
                )


def default_filter(module: nn.Module, fqn: str) -> bool:
    """Convert a Linear unless it is an output head or indexer projection, too small to gain, or not
    divisible by 16 (FP8 GEMMs need both dims divisible by 16)."""
    if not isinstance(module, nn.Linear):
        return False
    if any(part in DEFAULT_SKIP for part in fqn.split(".")):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0 and module.in_features * module.out_features >= 64 * 64


def prepare_fp8_fsdp(
    model: nn.Module,
    mesh: Any = None,
    float8_config: Any = None,
    fsdp_kwargs: Optional[dict] = None,
    module_filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    blocks: Optional[Iterable[nn.Module]] = None,
) -> nn.Module:
    """Convert ``model``'s linears to torchao FP8 training, then ``fully_shard`` each block and the
    root, in that order. Returns the model, ready for ``torch.compile(model, backend="sparse_mla")``.

    float8_config: a ``torchao.float8.Float8LinearConfig`` (default: tensorwise scaling).
    blocks: the modules to shard one by one (default: every child of every ``nn.ModuleList``).
    With ``float8_config.enable_fsdp_float8_all_gather``, call ``precompute_fp8_scales(model)`` after
    each optimizer step.
    """
    from torch.distributed.fsdp import fully_shard
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(model, config=float8_config or Float8LinearConfig(), module_filter_fn=module_filter_fn or default_filter)
    kwargs = dict(fsdp_kwargs or {})
    if mesh is not None:
        kwargs["mesh"] = mesh
    if blocks is None:
        blocks = [child for mod in model.modules() if isinstance(mod, nn.ModuleList) for child in mod]
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    check_shard_order(model)
    return model


def precompute_fp8_scales(model: nn.Module) -> None:
    """After ``optimizer.step()``, when FP8 all-gather is on: one all-reduce computes every FP8
    weight's scale for the next all-gather (torchao's ``precompute_float8_dynamic_scale_for_fsdp``)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)


# -- the compile-time check ----------------------------------------------------------------------

_checked: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _module_being_compiled() -> Optional[nn.Module]:
    """The ``self`` of the frame Dynamo is about to trace (read from Dynamo's own ``_compile``)."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "_compile" and code.co_filename.endswith("convert_frame.py"):
            local_vars = frame.f_locals.get("locals") or {}
            candidate = local_vars.get("self") if isinstance(local_vars, dict) else None
            return candidate if isinstance(candidate, nn.Module) else None
        frame = frame.f_back
    return None


def _on_compile_start(*_args: Any) -> None:
    module = _module_being_compiled()
    if module is None or module in _checked:
        return
    check_shard_order(module)
    _checked.add(module)


def install_compile_check() -> None:
    """Run ``check_shard_order`` on each module torch.compile traces, before it traces it."""
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:  # older torch: only the explicit check and the backend's look remain
        return
    if _on_compile_start not in callback_handler.start_callbacks:
        callback_handler.register_start_callback(_on_compile_start)
