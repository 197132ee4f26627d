"""Which values a mask tensor can hold, proven from how it was built.

``value_set(node)`` returns a frozenset of floats when every element of the tensor is provably one
of them (``full(-inf).triu_(1)`` -> {-inf, 0}; ``full(-inf).scatter(-1, idx, 0)`` -> {-inf, 0}),
or None when the construction is unknown (a graph input, an arbitrary op). The matcher folds masks
whose values are {0, -inf} into the indices, checks unknown ones at run time, and rejects known
masks with other values (they are biases, not masks).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.fx

from mla_compiler.passes import fx_ops

ValueSet = Optional[frozenset]

NEG_INF = float("-inf")
_PASS_THROUGH = ("to_dtype", "identity", "unsqueeze", "squeeze", "view", "expand", "permute", "transpose", "t", "getitem")


def _scalar(x: Any) -> Optional[float]:
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, (int, float)):
        return float(x)
    return None


def _combine(a: frozenset, b: frozenset, fn) -> ValueSet:
    out = set()
    for x in a:
        for y in b:
            v = fn(x, y)
            if math.isnan(v):
                return None
            out.add(v)
    return frozenset(out)


def value_set(node: Any, _memo: Optional[dict] = None) -> ValueSet:
    memo = {} if _memo is None else _memo
    s = _scalar(node)
    if s is not None:
        return frozenset({s})
    if not isinstance(node, torch.fx.Node):
        return None
    if node in memo:
        return memo[node]
    memo[node] = None  # cycles cannot occur in a DAG, but keep recursion bounded on re-entry
    result = _value_set(node, memo)
    memo[node] = result
    return result


def scatter_source(view: "fx_ops.OpView") -> Any:
    """What a scatter writes: its ``src`` tensor or scalar, or its ``value=`` keyword."""
    src = view.arg("src")
    return src if src is not None else view.arg("value")


def scatter_value_sets(scatter: torch.fx.Node) -> tuple[ValueSet, ValueSet]:
    """(values of the scattered-into tensor, values written at the indices)."""
    view = fx_ops.read(scatter)
    return value_set(view.input), value_set(scatter_source(view))


def _value_set(node: torch.fx.Node, memo: dict) -> ValueSet:
    view = fx_ops.read(node)
    if view is None:
        return None
    kind = view.kind
    vs = lambda x: value_set(x, memo)  # noqa: E731
    if kind in ("full", "full_like"):
        return vs(view.arg("fill_value"))
    if kind in ("zeros", "zeros_like"):
        return frozenset({0.0})
    if kind in ("ones", "ones_like"):
        return frozenset({1.0})
    if kind == "fill":
        return vs(view.arg("value"))
    if kind in _PASS_THROUGH:
        if kind == "getitem" and not isinstance(node.args[0], torch.fx.Node):
            return None
        return vs(view.input)
    if kind in ("triu", "tril"):
        base = vs(view.input)
        return None if base is None else base | {0.0}
    if kind == "scatter":
        if "reduce" in node.kwargs or len(node.args) > 4:
            return None
        base, src = vs(view.input), vs(scatter_source(view))
        return None if base is None or src is None else base | src
    if kind == "masked_fill":
        base, fill = vs(view.input), vs(view.arg("value"))
        return None if base is None or fill is None else base | fill
    if kind == "where":
        a, b = vs(view.arg("input")), vs(view.arg("other"))
        return None if a is None or b is None else a | b
    if kind in ("add", "sub", "mul"):
        alpha = view.arg("alpha")
        if alpha not in (None, 1):
            return None
        a, b = vs(view.input), vs(view.arg("other"))
        if a is None or b is None:
            return None
        fn = {"add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y}[kind]
        return _combine(a, b, fn)
    if kind == "neg":
        a = vs(view.input)
        return None if a is None else frozenset(-x for x in a)
    return None


def is_zero_neg_inf(values: ValueSet) -> bool:
    return values is not None and values <= {0.0, NEG_INF}


def describe(values: ValueSet) -> str:
    if values is None:
        return "unknown"
    return "{" + ", ".join(sorted((repr(v) for v in values))) + "}"
