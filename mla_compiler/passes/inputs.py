"""The input table of a Dynamo graph: what each placeholder is, read from its fake value; and the
FP8 values the graph itself computes (intermediates held as FP8 storage).

Subclass inputs are named by type and flatten output, never by ``.dtype`` (which reports the logical
dtype of every FP8 wrapper).
"""

from __future__ import annotations

import torch
import torch.fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from mla_compiler.passes import fx_ops
from mla_compiler.passes.storage import is_fp8, storage_facts


def _short(x) -> str:
    if isinstance(x, torch.SymInt):
        return str(x.node.expr)
    return str(x)


def describe_tensor(t: torch.Tensor) -> dict:
    facts = storage_facts(t)
    row = {
        "shape": [_short(s) for s in t.shape],
        "stride": [_short(s) for s in t.stride()] if t.layout == torch.strided else None,
        "dtype": str(t.dtype).replace("torch.", ""),
        "device": str(t.device),
        "requires_grad": bool(t.requires_grad),
        "type": type(t).__name__ if type(t).__name__ not in ("FakeTensor", "FunctionalTensor") else "Tensor",
        "storage": facts.kind,
        "payload_dtype": facts.payload_dtype,
        "scale": facts.scale,
        "scale_convention": facts.convention,
        "granularity": facts.granularity,
    }
    if is_traceable_wrapper_subclass(t):
        names, ctx = t.__tensor_flatten__()
        row["type"] = f"{type(t).__module__}.{type(t).__qualname__}"
        row["inner"] = {n: describe_tensor(getattr(t, n)) for n in names}
        row["flatten_context"] = {k: repr(v) for k, v in (ctx or {}).items()} if isinstance(ctx, dict) else repr(ctx)
    return row


def describe_inputs(gm: torch.fx.GraphModule) -> list[dict]:
    rows = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        value = fx_ops.meta_value(node)
        if isinstance(value, torch.Tensor):
            row = describe_tensor(value)
        else:
            row = {"type": type(value).__name__, "value": _short(value)}
        rows.append({"name": node.name, **row})
    return rows


def describe_fp8_values(gm: torch.fx.GraphModule) -> list[dict]:
    """Intermediates of the graph (not its inputs) that hold FP8 storage: a quantization done in the
    graph, a subclass's payload read out, a FlashMLA cache slice. With the source line."""
    rows = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        value = fx_ops.meta_value(node)
        if not isinstance(value, torch.Tensor) or not is_fp8(storage_facts(value)):
            continue
        rows.append({"name": node.name, "source": fx_ops.source_line(node), **describe_tensor(value)})
    return rows
