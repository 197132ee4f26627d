"""Read Dynamo-graph nodes as canonical ops, whatever the user's spelling.

A Dynamo graph keeps torch-level calls: ``torch.einsum``, ``x.softmax(...)``, ``operator.iadd``,
``F.softmax``, ``x @ y``... ``read(node)`` names the op (``"einsum"``, ``"softmax"``, ``"add"``...)
and binds its arguments by parameter name, so the matcher is written once per op, not per spelling.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx
import torch.nn.functional as F

_MISSING = object()

# (kind, parameter names) for call_function targets. The first parameter is the main tensor.
_FUNCTIONS: dict[Any, tuple[str, tuple[str, ...]]] = {}
# (kind, parameter names after self) for call_method names.
_METHODS: dict[str, tuple[str, tuple[str, ...]]] = {}


def _fn(targets, kind, params):
    for t in targets:
        if t is not None:
            _FUNCTIONS[t] = (kind, params)


def _m(names, kind, params):
    for name in names:
        _METHODS[name] = (kind, params)


_fn([torch.einsum, getattr(torch.functional, "einsum", None)], "einsum", ("equation", "*operands"))
_fn([torch.matmul, operator.matmul, operator.imatmul], "matmul", ("input", "other"))
_fn([torch.bmm], "matmul", ("input", "other"))
_fn([torch.softmax, F.softmax, torch.nn.functional.softmax], "softmax", ("input", "dim", "dtype"))
_FUNCTIONS[F.softmax] = ("softmax", ("input", "dim", "_stacklevel", "dtype"))
_fn([torch.log_softmax, F.log_softmax], "log_softmax", ("input", "dim", "dtype"))
_fn([operator.add, operator.iadd, torch.add], "add", ("input", "other", "alpha"))
_fn([operator.sub, operator.isub, torch.sub], "sub", ("input", "other", "alpha"))
_fn([operator.mul, operator.imul, torch.mul], "mul", ("input", "other"))
_fn([operator.truediv, operator.itruediv, torch.div], "div", ("input", "other", "rounding_mode"))
_fn([operator.neg, torch.neg], "neg", ("input",))
_fn([torch.full], "full", ("size", "fill_value"))
_fn([torch.zeros], "zeros", ("*size",))
_fn([torch.ones], "ones", ("*size",))
_fn([torch.full_like], "full_like", ("input", "fill_value"))
_fn([torch.zeros_like], "zeros_like", ("input",))
_fn([torch.ones_like], "ones_like", ("input",))
_fn([torch.scatter], "scatter", ("input", "dim", "index", "src"))
_fn([torch.masked_fill], "masked_fill", ("input", "mask", "value"))
_fn([torch.where], "where", ("condition", "input", "other"))
_fn([torch.triu], "triu", ("input", "diagonal"))
_fn([torch.tril], "tril", ("input", "diagonal"))
_fn([torch.gather], "gather", ("input", "dim", "index"))
_fn([torch.index_select], "index_select", ("input", "dim", "index"))
_fn([torch.take_along_dim], "take_along_dim", ("input", "indices", "dim"))
_fn([torch.cat, torch.concat, getattr(torch, "concatenate", None)], "cat", ("tensors", "dim"))
_fn([torch.transpose, torch.swapaxes], "transpose", ("input", "dim0", "dim1"))
_fn([torch.permute], "permute", ("input", "dims"))
_fn([torch.unsqueeze], "unsqueeze", ("input", "dim"))
_fn([torch.squeeze], "squeeze", ("input", "dim"))
_fn([torch.reshape], "view", ("input", "shape"))
_fn([torch.flatten], "view", ("input", "start_dim", "end_dim"))
_fn([torch.clone], "identity", ("input",))
_fn([operator.getitem], "getitem", ("input", "index"))
_fn([torch.topk], "topk", ("input", "k", "dim", "largest", "sorted"))
_fn([torch.arange], "arange", ("*args",))
_fn([F.dropout, torch.dropout], "dropout", ("input", "p", "training"))
_fn([torch.exp], "exp", ("input",))
_fn([torch.sum], "sum", ("input", "dim"))
_fn([torch.amax], "amax", ("input", "dim"))
_fn([F.scaled_dot_product_attention], "sdpa", ("query", "key", "value"))
# Boolean mask algebra: ``sel & causal``, ``~sel``, ``keep | extra``.
_fn([operator.invert, torch.logical_not, torch.bitwise_not], "not", ("input",))
_fn([operator.and_, operator.iand, torch.logical_and, torch.bitwise_and], "and", ("input", "other"))
_fn([operator.or_, operator.ior, torch.logical_or, torch.bitwise_or], "or", ("input", "other"))

_m(["softmax"], "softmax", ("dim", "dtype"))
_m(["log_softmax"], "log_softmax", ("dim", "dtype"))
_m(["einsum"], "einsum", ("*operands",))
_m(["matmul", "__matmul__", "bmm"], "matmul", ("other",))
_m(["add", "add_", "__add__", "__iadd__", "__radd__"], "add", ("other", "alpha"))
_m(["sub", "sub_", "__sub__", "__isub__"], "sub", ("other", "alpha"))
_m(["mul", "mul_", "__mul__", "__imul__", "__rmul__"], "mul", ("other",))
_m(["div", "div_", "__truediv__", "__itruediv__"], "div", ("other", "rounding_mode"))
_m(["float", "half", "bfloat16", "double", "to", "type", "type_as"], "to_dtype", ("*args",))
_m(["contiguous", "clone"], "identity", ())
_m(["permute"], "permute", ("*dims",))
_m(["transpose", "swapaxes"], "transpose", ("dim0", "dim1"))
_m(["t"], "t", ())
_m(["unsqueeze"], "unsqueeze", ("dim",))
_m(["squeeze"], "squeeze", ("dim",))
_m(["expand", "expand_as"], "expand", ("*sizes",))
_m(["view", "reshape", "view_as", "reshape_as", "flatten", "unflatten"], "view", ("*shape",))
_m(["scatter", "scatter_"], "scatter", ("dim", "index", "src"))
_m(["masked_fill", "masked_fill_"], "masked_fill", ("mask", "value"))
_m(["triu", "triu_"], "triu", ("diagonal",))
_m(["tril", "tril_"], "tril", ("diagonal",))
_m(["gather"], "gather", ("dim", "index"))
_m(["index_select"], "index_select", ("dim", "index"))
_m(["topk"], "topk", ("k", "dim", "largest", "sorted"))
_m(["long", "int"], "to_int", ())
_m(["fill_"], "fill", ("value",))
_m(["__getitem__"], "getitem", ("index",))
_m(["exp", "exp_"], "exp", ())
_m(["sum"], "sum", ("dim",))
_m(["amax", "max"], "amax", ("dim",))
_m(["logical_not", "bitwise_not", "__invert__"], "not", ())
_m(["logical_and", "bitwise_and", "__and__", "__iand__", "logical_and_", "bitwise_and_"], "and", ("other",))
_m(["logical_or", "bitwise_or", "__or__", "__ior__", "logical_or_", "bitwise_or_"], "or", ("other",))


# Kinds that only pass a tensor's value on (layout, dtype, scaling, selection): what a dequantized
# copy goes through on its way to a product. Pure unless the node is an in-place form.
PASS_THROUGH_KINDS = frozenset(("to_dtype", "identity", "mul", "div", "permute", "transpose", "t", "unsqueeze", "squeeze",
                                "view", "expand", "getitem", "cat"))


@dataclass(frozen=True)
class OpView:
    """A node read as a canonical op. ``inplace`` marks ``x.op_(...)``/``x op= y`` forms."""

    kind: str
    node: torch.fx.Node
    params: tuple[str, ...]
    inplace: bool
    method: Optional[str]

    def _positional(self) -> list:
        args = list(self.node.args)
        return args

    def arg(self, name: str, default: Any = _MISSING) -> Any:
        if name in self.node.kwargs:
            return self.node.kwargs[name]
        args = self._positional()
        for i, p in enumerate(self.params):
            if p.startswith("*"):
                break
            if p == name:
                return args[i] if i < len(args) else _default(name, default)
        return _default(name, default)

    def varargs(self) -> list:
        """Arguments bound to the ``*name`` parameter (a single list/tuple argument is unpacked)."""
        args = self._positional()
        for i, p in enumerate(self.params):
            if p.startswith("*"):
                rest = args[i:]
                if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
                    return list(rest[0])
                return rest
        return []

    @property
    def input(self) -> Any:
        """The main tensor (``self`` of a method, first parameter of a function)."""
        return self.node.args[0] if self.node.args else self.node.kwargs.get(self.params[0] if self.params else "input")


def _default(name: str, default: Any) -> Any:
    if default is _MISSING:
        return None
    return default


def read(node: torch.fx.Node) -> Optional[OpView]:
    """The canonical view of ``node``, or None when the op is not one the matcher knows."""
    if node.op == "call_function":
        entry = _FUNCTIONS.get(node.target)
        if entry is None:
            return None
        kind, params = entry
        inplace = node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.imatmul, operator.iand, operator.ior)
        return OpView(kind, node, params, inplace, None)
    if node.op == "call_method":
        entry = _METHODS.get(node.target)
        if entry is None:
            return None
        kind, params = entry
        name = node.target
        inplace = (name.endswith("_") and not name.endswith("__")) or name.startswith("__i")
        # Methods bind ``self`` as args[0]; shift parameter names by one.
        return OpView(kind, node, ("self",) + params, inplace, name)
    return None


def kind_of(node: Any) -> Optional[str]:
    if not isinstance(node, torch.fx.Node):
        return None
    view = read(node)
    return view.kind if view else None


def meta_value(node: Any) -> Any:
    """The fake value Dynamo recorded for a node (a FakeTensor, SymInt, tuple...)."""
    if isinstance(node, torch.fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def meta_tensor(node: Any) -> Optional[torch.Tensor]:
    v = meta_value(node)
    return v if isinstance(v, torch.Tensor) else None


def source_line(node: torch.fx.Node) -> str:
    """The user's file:line and code that produced ``node``, from the Dynamo stack trace."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln for ln in trace.strip().splitlines() if ln.strip()]
    file_line = ""
    code = ""
    for i, ln in enumerate(lines):
        s = ln.strip()
        if s.startswith('File "'):
            file_line = s
            code = lines[i + 1].strip() if i + 1 < len(lines) and not lines[i + 1].strip().startswith("File ") else ""
    if not file_line:
        return f"<no source> ({node.name})"
    try:
        path = file_line.split('"')[1]
        lineno = file_line.split("line ")[1].split(",")[0]
        where = f"{path}:{lineno}"
    except IndexError:
        where = file_line
    return f"{where}  {code}".rstrip()


def is_inplace_on(node: torch.fx.Node) -> bool:
    view = read(node)
    if view is not None:
        return view.inplace
    return node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") and not node.target.endswith("__")


def is_mutating(node: torch.fx.Node) -> bool:
    """True when the node writes into one of its inputs (in-place method, ``x op= y``, setitem)."""
    if node.op == "call_function" and node.target is operator.setitem:
        return True
    if node.op == "call_method" and isinstance(node.target, str):
        name = node.target
        return (name.endswith("_") and not name.endswith("__")) or name.startswith("__i")
    if node.op == "call_function" and node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv):
        t = meta_tensor(node.args[0]) if node.args else None
        return t is not None
    return False
