"""Find MLA attention sites in a Dynamo graph: anchor on softmax, verify the dataflow, say why not.

For every softmax the matcher either builds a ``MatchedSite`` or a ``Rejection`` with a reason.
It does not look for fixed op sequences. It walks the graph around the softmax, collecting:

* score terms: query-key contractions (``einsum``, ``matmul``, ``@``, ``bmm``) summed and scaled,
* mask terms: everything else added to the scores (``full(-inf).scatter(-1, idx, 0)``, a causal
  mask, ``masked_fill(mask, -inf)``), with the values each can hold (passes/mask_values.py),
* the weighted sum: the contraction the probabilities feed, and its value operand,
* the selection: the index tensor of a scatter mask (dense form) or of a gather of the keys
  (``kv[idx]``, ``torch.gather``, ``index_select``; gather form),

then runs the axis algebra (passes/axes.py) over that region and assigns roles: B (batch, shared
by queries and keys), S (query position, varies with the indices), H (head, query only), T (key
position), K (selected slot). A site is sparse MLA when the softmax runs over the key axis, the
keys do not vary across heads (one latent shared by all heads), every mask is the same for every
head, the value is a prefix of the key latent, and the scale is a known positive constant.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.fx

from mla_compiler.passes import fx_ops, mask_values
from mla_compiler.passes.fp8_source import fp8_latent
from mla_compiler.passes.axes import Axes, AxisAlgebra, Unsupported, propagate, static_int
from mla_compiler.sites import MaskTerm, MatchedSite, Operand, Rejection, SiteDims, SizeWitness

CONTRACTIONS = ("einsum", "matmul")
LAYOUT = ("identity", "permute", "transpose", "t", "unsqueeze", "squeeze", "view", "expand")
GATHERS = ("gather", "index_select", "take_along_dim")
HOP_TARGET_NAMES = ("tag_activation_checkpoint", "wrap", "wrap_with_autocast", "wrap_with_set_grad_enabled")


class Reject(Exception):
    def __init__(self, check: str, reason: str) -> None:
        super().__init__(reason)
        self.check = check
        self.reason = reason


@dataclass
class _Coef:
    """The scalar a score term is multiplied by: a constant times run-time scalars (lifted floats)."""

    const: float = 1.0
    nodes: tuple = ()  # (node, +1 to multiply | -1 to divide)

    def times(self, other: Union[float, torch.fx.Node], divide: bool = False) -> "_Coef":
        if isinstance(other, torch.fx.Node):
            return _Coef(self.const, self.nodes + ((other, -1 if divide else 1),))
        return _Coef(self.const / other if divide else self.const * other, self.nodes)

    def same(self, other: "_Coef") -> bool:
        return abs(self.const - other.const) <= 1e-12 * max(1.0, abs(self.const)) and self.nodes == other.nodes

    def text(self) -> str:
        parts = [repr(self.const)] if (self.const != 1.0 or not self.nodes) else []
        parts += [f"{'/' if e < 0 else ''}{n.name}" for n, e in self.nodes]
        text = " * ".join(parts).replace("* /", "/")
        return text + (" (Python numbers Dynamo kept symbolic)" if self.nodes else "")


@dataclass
class _Gather:
    node: torch.fx.Node
    kv: torch.fx.Node  # the gathered tensor, after walking through layout ops
    index: torch.fx.Node  # index operand of the gather op
    kv_axis: int  # axis of the gather input that the index selects along
    semantics: str  # "python-index" | "gather"
    batch_arange: Optional[torch.fx.Node] = None


@dataclass
class _Walk:
    source: torch.fx.Node
    chain: list
    gather: Optional[_Gather] = None
    prefix: Optional[int] = None  # value operand: width of a [..., :d_v] slice


@dataclass
class _Candidate:
    softmax: torch.fx.Node
    region: set = field(default_factory=set)
    score_terms: list = field(default_factory=list)  # (contraction node, _Coef)
    leaves: list = field(default_factory=list)  # (node, _Coef) additive terms that are not contractions
    fills: list = field(default_factory=list)  # (bool mask node, valid_when_true)


def _is_tensor(x: Any) -> bool:
    return fx_ops.meta_tensor(x) is not None


def _single_user(node: torch.fx.Node) -> bool:
    return len(node.users) == 1


def _is_upcast(node: torch.fx.Node) -> bool:
    src, dst = fx_ops.meta_tensor(node.args[0]), fx_ops.meta_tensor(node)
    if src is None or dst is None or src.device != dst.device or src.shape != dst.shape:
        return False
    if src.dtype == dst.dtype:
        return True
    return src.dtype.is_floating_point and dst.dtype.is_floating_point and torch.finfo(dst.dtype).bits > torch.finfo(src.dtype).bits and not src.dtype.is_complex


_SCALAR_ARITHMETIC = {operator.mul, operator.truediv, operator.add, operator.sub, operator.pow, operator.neg, math.sqrt, torch.sym_float}
if hasattr(torch, "_sym_sqrt"):
    _SCALAR_ARITHMETIC.add(torch._sym_sqrt)


def _scalar_expression(node: Any) -> bool:
    """A Python number Dynamo kept symbolic: a lifted float (``x.item()`` of a graph input), a
    symbolic size, or arithmetic on those (``1 / math.sqrt(d)``). Its meaning is known: it is the
    user's Python scale, only not specialized yet."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return True
    if not isinstance(node, torch.fx.Node):
        return False
    value = fx_ops.meta_value(node)
    if not isinstance(value, (torch.SymFloat, torch.SymInt, float, int)):
        return False
    if node.op == "placeholder":
        return True
    if node.op == "call_method" and node.target == "item":
        return isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "placeholder"
    if node.op == "call_method" and node.target == "size":
        return True
    if node.op == "call_function" and node.target in _SCALAR_ARITHMETIC:
        return all(_scalar_expression(a) for a in node.args)
    return False


def _scalar_factor(x: Any) -> Optional[Union[float, torch.fx.Node]]:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, torch.fx.Node) and _scalar_expression(x):
        return x
    return None


def _describe(node: Any) -> str:
    if not isinstance(node, torch.fx.Node):
        return repr(node)
    if node.op == "placeholder":
        return f"input {node.target}"
    view = fx_ops.read(node)
    what = view.kind if view else getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({what}, {fx_ops.source_line(node)})"


def same_tensor(a: Any, b: Any) -> bool:
    """Same node, or the same pure op on the same inputs (two ``cache[:b, :n]`` reads, say)."""
    if a is b:
        return True
    if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
        return False
    if a.op != b.op or a.target != b.target or a.op not in ("call_function", "call_method"):
        return False
    if fx_ops.is_mutating(a) or len(a.args) != len(b.args) or a.kwargs.keys() != b.kwargs.keys():
        return False
    return all(_same_arg(x, y) for x, y in zip(a.args, b.args)) and all(_same_arg(a.kwargs[k], b.kwargs[k]) for k in a.kwargs)


def _same_arg(x: Any, y: Any) -> bool:
    if isinstance(x, torch.fx.Node) or isinstance(y, torch.fx.Node):
        return same_tensor(x, y)
    if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
        return len(x) == len(y) and all(_same_arg(u, v) for u, v in zip(x, y))
    if isinstance(x, slice) and isinstance(y, slice):
        return _same_arg(x.start, y.start) and _same_arg(x.stop, y.stop) and _same_arg(x.step, y.step)
    return type(x) is type(y) and x == y


class _Analysis:
    def __init__(self, softmax: torch.fx.Node, graph_name: str) -> None:
        self.c = _Candidate(softmax)
        self.graph_name = graph_name
        self.alg = AxisAlgebra()
        self.axes: dict[torch.fx.Node, Axes] = {}

    # -- walks ---------------------------------------------------------------------------------
    def walk_probs(self) -> tuple[torch.fx.Node, torch.fx.Node]:
        """From the softmax to the weighted sum: returns (probabilities operand, contraction)."""
        cur = self.c.softmax
        while True:
            users = list(cur.users)
            if len(users) != 1:
                names = ", ".join(_describe(u) for u in users) or "nothing"
                raise Reject("probabilities", f"the attention probabilities ({cur.name}) are used by {names}; only a single weighted sum can be lowered")
            user = users[0]
            kind = fx_ops.kind_of(user)
            if kind in CONTRACTIONS:
                self.c.region.add(cur)
                return cur, user
            if kind == "to_dtype" or kind in LAYOUT:
                self.c.region.add(cur)
                cur = user
                continue
            if kind in ("mul", "div"):
                raise Reject("scale-after-softmax", f"the probabilities are scaled after the softmax by {_describe(user)}; a scale belongs on the scores")
            if kind == "dropout":
                raise Reject("dropout", f"dropout on the attention probabilities ({_describe(user)}) is not supported")
            raise Reject("probabilities", f"the softmax feeds {_describe(user)}, not a weighted sum over the keys")

    def walk_scores(self, node: Any, coef: _Coef, top: bool = False) -> None:
        if not isinstance(node, torch.fx.Node):
            if isinstance(node, (int, float)) and mask_values.value_set(node) == frozenset({0.0}):
                return
            raise Reject("mask", f"a constant {node!r} is added to the scores")
        view = fx_ops.read(node)
        kind = view.kind if view else None
        if kind in CONTRACTIONS:
            self.c.score_terms.append((node, coef))
            self.c.region.add(node)
            return
        descend = top or _single_user(node)
        if view is None or not descend:
            self.c.leaves.append((node, coef))
            return
        if kind in ("add", "sub"):
            if view.arg("alpha") not in (None, 1):
                raise Reject("scores", f"{_describe(node)} adds with alpha={view.arg('alpha')}")
            self.c.region.add(node)
            self.walk_scores(view.input, coef)
            other = view.arg("other")
            if kind == "sub":
                if _is_tensor(other):
                    raise Reject("mask", f"{_describe(node)} subtracts a tensor from the scores")
            self.walk_scores(other, coef)
            return
        if kind in ("mul", "div"):
            if kind == "div" and view.arg("rounding_mode") is not None:
                raise Reject("scale", f"{_describe(node)} divides with rounding")
            a, b = view.input, view.arg("other")
            fa, fb = _scalar_factor(a), _scalar_factor(b)
            if fb is not None and _is_tensor(a):
                tensor, factor = a, fb
            elif fa is not None and _is_tensor(b) and kind == "mul":
                tensor, factor = b, fa
            else:
                odd = a if _is_tensor(b) and fx_ops.meta_tensor(a) is not None and fx_ops.meta_tensor(a).dim() < fx_ops.meta_tensor(b).dim() else b
                raise Reject("scale", f"the scores are scaled by {_describe(odd)}, a value computed at run time whose meaning is unknown (expected a Python number)")
            self.c.region.add(node)
            self.walk_scores(tensor, coef.times(factor, divide=(kind == "div")))
            return
        if kind == "to_dtype":
            t = fx_ops.meta_tensor(node)
            if t is None or not t.dtype.is_floating_point:
                raise Reject("scores", f"{_describe(node)} converts the scores to {getattr(t, 'dtype', '?')}")
            self.c.region.add(node)
            self.walk_scores(view.input, coef)
            return
        if kind in LAYOUT:
            self.c.region.add(node)
            self.walk_scores(view.input, coef)
            return
        if kind == "masked_fill":
            fill = mask_values.value_set(view.arg("value"))
            if fill != frozenset({mask_values.NEG_INF}):
                raise Reject("mask", f"{_describe(node)} fills with {view.arg('value')!r}, not -inf: masked keys would keep weight")
            self.c.region.add(node)
            self.c.fills.append((view.arg("mask"), False))
            self.walk_scores(view.input, coef)
            return
        if kind == "where":
            a, b = view.arg("input"), view.arg("other")
            if mask_values.value_set(b) == frozenset({mask_values.NEG_INF}) and _is_tensor(a):
                self.c.region.add(node)
                self.c.fills.append((view.arg("condition"), True))
                self.walk_scores(a, coef)
                return
            if mask_values.value_set(a) == frozenset({mask_values.NEG_INF}) and _is_tensor(b):
                self.c.region.add(node)
                self.c.fills.append((view.arg("condition"), False))
                self.walk_scores(b, coef)
                return
        self.c.leaves.append((node, coef))

    def walk_operand(self, node: torch.fx.Node, allow_gather: bool, value: bool = False) -> _Walk:
        """Back through upcasts, layout ops and (keys only) a gather, to the tensor the op will read.

        Reshapes that merge or split axes are looked through only when a gather lies behind them
        (``kv.index_select(0, idx.view(-1)).view(s, k, d)``); otherwise the operand stays the
        tensor the user reshaped, so the op reads what the user wrote."""
        if allow_gather:
            full = self._walk(node, allow_gather, value, reshapes=True)
            if full.gather is not None:
                return full
        walk = self._walk(node, allow_gather, value, reshapes=False)
        if allow_gather and not value and fx_ops.kind_of(walk.source) == "getitem" and isinstance(walk.source.args[0], torch.fx.Node):
            behind = self._walk(walk.source.args[0], allow_gather, value, reshapes=True)
            if behind.gather is not None:
                raise Reject(
                    "keys",
                    f"the keys {_describe(walk.source)} are a slice of gathered keys; gather the latent and the rope "
                    "separately, or contract the concatenated keys in one product",
                )
        return walk

    def _walk(self, node: torch.fx.Node, allow_gather: bool, value: bool, reshapes: bool) -> _Walk:
        chain: list = []
        gather: Optional[_Gather] = None
        prefix: Optional[int] = None
        cur = node
        while True:
            view = fx_ops.read(cur)
            kind = view.kind if view else None
            # A node the keys and the value both read (the gathered keys) may have several users;
            # the escape check later proves they all belong to the attention.
            shared_ok = _single_user(cur) or reshapes
            if kind == "to_dtype" and _is_upcast(cur) and shared_ok:
                chain.append(cur)
                cur = view.input
                continue
            if kind in LAYOUT and shared_ok and (reshapes or _keeps_axes(cur)):
                chain.append(cur)
                cur = view.input
                continue
            if value and kind == "getitem" and prefix is None and gather is None and shared_ok:
                width = _prefix_slice(cur)
                if width is not None:
                    prefix = width
                    chain.append(cur)
                    cur = cur.args[0]
                    continue
            if allow_gather and gather is None:
                g = self._gather_of(cur)
                if g is not None:
                    gather = g
                    chain.append(cur)
                    inner = self._walk(g.kv, allow_gather=False, value=False, reshapes=False)
                    chain.extend(inner.chain)
                    g.kv = inner.source
                    return _Walk(inner.source, chain, gather, prefix)
            return _Walk(cur, chain, gather, prefix)

    def _gather_of(self, node: torch.fx.Node) -> Optional[_Gather]:
        view = fx_ops.read(node)
        if view is None:
            return None
        if view.kind == "getitem" and isinstance(node.args[0], torch.fx.Node) and _is_tensor(node.args[0]):
            items = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            tensor_pos = [i for i, it in enumerate(items) if isinstance(it, torch.fx.Node) and _is_tensor(it)]
            if not tensor_pos:
                return None
            if any(it is None or it is Ellipsis for it in items[: tensor_pos[-1]]):
                raise Reject("gather", f"{_describe(node)} mixes None/Ellipsis with tensor indices before the gathered axis")
            for i, it in enumerate(items):
                if i not in tensor_pos and not (isinstance(it, slice) and it == slice(None)) and it is not Ellipsis:
                    raise Reject("gather", f"{_describe(node)} combines a gather with slicing ({it!r})")
            for p in tensor_pos:
                t = fx_ops.meta_tensor(items[p])
                if t.dtype == torch.bool:
                    raise Reject("indices", f"{_describe(node)} selects keys with a boolean mask, not top-k indices")
            if len(tensor_pos) == 1:
                return _Gather(node, node.args[0], items[tensor_pos[0]], tensor_pos[0], "python-index")
            if len(tensor_pos) == 2 and tensor_pos[1] == tensor_pos[0] + 1:
                ar = items[tensor_pos[0]]
                if _arange_over(ar, fx_ops.meta_tensor(node.args[0]).shape[tensor_pos[0]]):
                    return _Gather(node, node.args[0], items[tensor_pos[1]], tensor_pos[1], "python-index", batch_arange=ar)
            raise Reject("gather", f"{_describe(node)} indexes with several tensors in a way that is not a per-batch gather")
        if view.kind in GATHERS:
            index = view.arg("index") if view.kind != "take_along_dim" else view.arg("indices")
            dim = view.arg("dim")
            if not isinstance(dim, int):
                return None
            inp_t = fx_ops.meta_tensor(view.input)
            dim = dim % inp_t.dim()
            return _Gather(node, view.input, index, dim, "gather")
        return None

    def walk_index(self, node: Any) -> _Walk:
        """Back from an index operand through int conversions and layout ops to the index tensor."""
        chain = []
        cur = node
        while True:
            view = fx_ops.read(cur)
            kind = view.kind if view else None
            t = fx_ops.meta_tensor(cur)
            if t is not None and t.dtype == torch.bool:
                raise Reject("indices", f"the indices {_describe(cur)} are boolean, not integer token indices")
            if kind in ("to_dtype", "to_int") and _single_user(cur):
                src = fx_ops.meta_tensor(view.input)
                if src is not None and (src.dtype.is_floating_point or src.dtype == torch.bool):
                    raise Reject("indices", f"the indices are converted from {src.dtype} by {_describe(cur)}; float indices cannot be proven integral, pass int32/int64 indices")
                chain.append(cur)
                cur = view.input
                continue
            if kind in LAYOUT and _single_user(cur):
                chain.append(cur)
                cur = view.input
                continue
            if t is None:
                raise Reject("indices", f"the index operand {_describe(cur)} is not a tensor")
            if t.dtype.is_floating_point or t.dtype.is_complex:
                raise Reject("indices", f"the indices {_describe(cur)} have dtype {t.dtype}; integer indices are required")
            return _Walk(cur, chain)

    # -- axes ----------------------------------------------------------------------------------
    def axes_of(self, node: Any) -> Axes:
        if node in self.axes:
            return self.axes[node]
        ax = self.alg.leaf(node)
        self.axes[node] = ax
        return ax

    def propagate_region(self) -> None:
        order = {n: i for i, n in enumerate(self.c.softmax.graph.nodes)}
        for node in sorted(self.c.region | {self.c.softmax}, key=order.__getitem__):
            try:
                self.axes[node] = propagate(self.alg, node, self.axes_of)
            except Unsupported as exc:
                raise Reject("layout", str(exc)) from None

    def atoms(self, node: Any) -> set:
        return {a for ax in self.alg.canon(self.axes_of(node)) for a in ax}

    # -- the whole analysis --------------------------------------------------------------------
    def run(self) -> MatchedSite:
        c = self.c
        sm = fx_ops.read(c.softmax)
        sm_in = sm.input
        probs, out_mm = self.walk_probs()
        self.walk_scores(sm_in, _Coef(), top=True)
        if not c.score_terms:
            raise Reject("scores", "no query-key product feeds the softmax")
        c.region.add(out_mm)

        # Operands of every score contraction, and of the weighted sum.
        parts = []
        gathers: list[_Gather] = []
        for mm, coef in c.score_terms:
            ops_ = _contraction_operands(mm)
            walks = [self.walk_operand(o, allow_gather=True) for o in ops_]
            for w in walks:
                c.region.update(w.chain)
                if w.gather:
                    gathers.append(w.gather)
            parts.append((mm, coef, ops_, walks))
        pv_ops = _contraction_operands(out_mm)
        if probs not in pv_ops:
            raise Reject("probabilities", f"the probabilities reach {_describe(out_mm)} through an op the matcher does not follow")
        v_operand = pv_ops[1] if pv_ops[0] is probs else pv_ops[0]
        v_walk = self.walk_operand(v_operand, allow_gather=True, value=True)
        c.region.update(v_walk.chain)
        if v_walk.gather:
            gathers.append(v_walk.gather)

        # Classify additive leaves: the selection scatter, masks, stray score products.
        selection: Optional[torch.fx.Node] = None
        masks: list[tuple[torch.fx.Node, str, str]] = []
        for leaf, coef in c.leaves:
            kind = fx_ops.kind_of(leaf)
            if kind == "scatter":
                sel = self._selection(leaf)
                if sel:
                    if selection is not None:
                        raise Reject("mask", "two index masks select keys for the same scores")
                    selection = leaf
                    continue
            if kind in CONTRACTIONS:
                raise Reject("scores", f"{_describe(leaf)} is also used outside the attention")
            if coef.const <= 0 or coef.nodes:
                raise Reject("mask", f"{_describe(leaf)} enters the scores multiplied by {coef.text()}; a mask must be added unscaled or with a positive constant")
            values = mask_values.value_set(leaf)
            t = fx_ops.meta_tensor(leaf)
            if values is None:
                if t is None or not t.dtype.is_floating_point:
                    raise Reject("mask", f"{_describe(leaf)} added to the scores is not a float tensor")
                masks.append((leaf, "checked", f"{leaf.name}: values unknown at compile time, checked 0/-inf at run time"))
            elif mask_values.is_zero_neg_inf(values):
                if values == frozenset({0.0}):
                    continue
                masks.append((leaf, "additive", f"{leaf.name}: values {mask_values.describe(values)}"))
            else:
                raise Reject("mask", f"{_describe(leaf)} adds values {mask_values.describe(values)} to the scores: a bias, not a 0/-inf mask over the selected keys")
        for cond, valid_when_true in c.fills:
            t = fx_ops.meta_tensor(cond)
            if t is None or t.dtype != torch.bool:
                raise Reject("mask", f"the masked_fill/where condition {_describe(cond)} is not boolean")
            split = self._split_condition(cond, valid_when_true)
            if split is not None:
                scatter, path, leaves = split
                if selection is not None:
                    raise Reject("mask", "two index masks select keys for the same scores")
                selection = scatter
                c.region.update(path)
            else:
                leaves = [(cond, valid_when_true)]
            for leaf, keep in leaves:
                masks.append((leaf, "keep" if keep else "fill", f"{leaf.name}: boolean, keys {'kept' if keep else 'dropped'} where True"))

        if selection is None and not gathers:
            raise Reject("selection", "no top-k selection: the scores are neither masked by a scatter of indices nor computed on gathered keys (dense attention)")
        if selection is not None and gathers:
            raise Reject("selection", "both a scatter index mask and gathered keys select the keys")

        # Index tensor of the selection.
        if selection is not None:
            idx_node = fx_ops.read(selection).arg("index")
            semantics = "scatter"
            self._add_base_chain(selection)
        else:
            first = gathers[0]
            for g in gathers[1:]:
                if not same_tensor(_strip(g.index), _strip(first.index)) or g.semantics != first.semantics:
                    raise Reject("selection", f"the keys are gathered with different indices ({_describe(first.node)}, {_describe(g.node)})")
            idx_node = first.index
            semantics = first.semantics
        idx_walk = self.walk_index(idx_node)
        c.region.update(idx_walk.chain)
        for g in gathers:
            if g.index is not idx_node:
                c.region.update(self.walk_index(g.index).chain)
            if g.batch_arange is not None:
                c.region.update(_arange_chain(g.batch_arange))

        self.propagate_region()
        return self._assign_roles(probs, out_mm, parts, v_walk, selection, gathers, idx_walk, masks, semantics)

    def _selection(self, scatter: torch.fx.Node) -> bool:
        base, src = mask_values.scatter_value_sets(scatter)
        if base is None or src is None:
            return False
        if base == frozenset({mask_values.NEG_INF}) and src == frozenset({0.0}):
            return True
        if base == frozenset({0.0}) and src == frozenset({mask_values.NEG_INF}):
            raise Reject("mask", f"{_describe(scatter)} writes -inf at the selected keys: it masks them out instead of keeping them")
        raise Reject("mask", f"{_describe(scatter)} is an index mask of {mask_values.describe(base)} with {mask_values.describe(src)} at the selected keys; a sparse selection needs -inf elsewhere and 0 at the selected keys")

    def _split_condition(self, cond: torch.fx.Node, keep: bool):
        """A boolean selection inside a masked_fill/where condition: ``sel & causal`` (keep where
        True), ``~sel | pad`` (drop where True), with ``sel = zeros(bool).scatter(-1, idx, True)``.

        Returns (the scatter, the nodes between it and the condition, the other terms as
        (node, keep-where-True)), or None when the condition holds no selection."""
        path: list = []
        leaves: list = []
        found: list = []

        def walk(node, keep_here: bool) -> None:
            kind = fx_ops.kind_of(node) if isinstance(node, torch.fx.Node) else None
            # Layout ops are followed; whether the selected axis still lines up with the softmax
            # axis is checked on the propagated axes (_assign_roles).
            if (kind in LAYOUT or kind == "to_dtype") and _single_user(node):
                path.append(node)
                return walk(fx_ops.read(node).input, keep_here)
            if kind == "not" and _single_user(node):
                path.append(node)
                return walk(fx_ops.read(node).input, not keep_here)
            # keep-where-True terms combine with "and"; drop-where-True terms with "or".
            if kind == ("and" if keep_here else "or") and _single_user(node):
                path.append(node)
                view = fx_ops.read(node)
                walk(view.input, keep_here)
                walk(view.arg("other"), keep_here)
                return
            if kind == "scatter" and self._boolean_selection(node, keep_here):
                found.append(node)
                return
            leaves.append((node, keep_here))

        walk(cond, keep)
        if not found:
            return None
        if len(found) > 1:
            raise Reject("mask", "two index masks select keys for the same scores")
        return found[0], path, leaves

    def _boolean_selection(self, scatter: torch.fx.Node, keep: bool) -> bool:
        """A boolean scatter that keeps exactly the indexed keys under this polarity."""
        t = fx_ops.meta_tensor(scatter)
        if t is None or t.dtype != torch.bool:
            return False
        base, src = mask_values.scatter_value_sets(scatter)
        if base is None or src is None or len(base) != 1 or len(src) != 1 or base == src:
            return False
        selected_kept = src == frozenset({1.0}) if keep else src == frozenset({0.0})
        if not selected_kept:
            raise Reject("mask", f"{_describe(scatter)} marks the selected keys to be masked out instead of kept")
        return True

    def _add_base_chain(self, scatter: torch.fx.Node) -> None:
        self.c.region.add(scatter)
        cur = fx_ops.read(scatter).input
        while isinstance(cur, torch.fx.Node) and _single_user(cur) and fx_ops.kind_of(cur) in ("full", "full_like", "zeros", "ones", "fill", "to_dtype", "identity"):
            self.c.region.add(cur)
            view = fx_ops.read(cur)
            if view.kind in ("full", "zeros", "ones"):
                break
            cur = view.input

    def _assign_roles(self, probs, out_mm, parts, v_walk, selection, gathers, idx_walk, masks, semantics) -> MatchedSite:
        c = self.c
        alg = self.alg
        sm = fx_ops.read(c.softmax)
        sm_axes = alg.canon(self.axes[sm.input])
        dim = sm.arg("dim")
        if not isinstance(dim, int):
            raise Reject("softmax", f"the softmax dim {dim!r} is not a constant")
        dim = dim % len(sm_axes)
        if not sm_axes[dim]:
            raise Reject("softmax", f"the softmax runs over dim {dim}, an axis of length 1 (with gathered keys: a top-k of 1 is not supported)")
        if len(sm_axes[dim]) != 1:
            raise Reject("softmax", f"the softmax runs over dim {dim}, a merged axis")
        (a_sm,) = sm_axes[dim]

        # Key-side axis of the scores: T for an index mask, K (selected slot) for gathered keys.
        if selection is not None:
            base_axes = alg.canon(self.axes[fx_ops.read(selection).input])
            sdim = fx_ops.read(selection).arg("dim") % len(base_axes)
            if base_axes[sdim] != (a_sm,):
                raise Reject("softmax", f"the softmax runs over dim {dim}, but the index mask selects along another axis (dim {sdim} of the mask)")
            a_t = a_sm
            idx_axes = alg.canon(self.axes_of(fx_ops.read(selection).arg("index")))
            a_k = idx_axes[sdim]
            if not a_k:  # top-k of one: the indices' slot axis is a unit axis
                a_k = (alg.fresh(1),)
            if len(a_k) != 1:
                raise Reject("indices", "the top-k axis of the indices is a merged axis")
            a_k = a_k[0]
        else:
            a_k = a_sm
            if a_sm not in self.atoms(idx_walk.source) or any(a_sm not in self.atoms(g.node) for g in gathers):
                raise Reject("softmax", f"the softmax runs over dim {dim}, which is not the axis of the selected keys")
            a_t = None
            for g in gathers:
                gin_axes = alg.canon(self.axes_of(g.node.args[0]))
                if len(gin_axes[g.kv_axis]) != 1:
                    raise Reject("gather", "the gathered axis of the keys is a unit or merged axis")
                # Gathers with the same indices read the same key positions: one T axis.
                if a_t is None:
                    a_t = gin_axes[g.kv_axis][0]
                else:
                    alg.unify(a_t, gin_axes[g.kv_axis][0])
                if g.batch_arange is not None:
                    b_axis = gin_axes[g.kv_axis - 1]
                    for x in self.atoms(g.batch_arange):
                        alg.unify_axis((x,), b_axis)
            a_t = alg.find(a_t)

        # Score contractions: which operand is the key, what they contract.
        q_parts, kv_parts, d_atoms = [], [], []
        coef0 = parts[0][1]
        for mm, coef, ops_, walks in parts:
            if not coef.same(coef0):
                raise Reject("scale", f"the score parts are scaled differently ({coef0.text()} and {coef.text()})")
            a_atoms = [self.atoms(o) for o in ops_]
            out_atoms = self.atoms(mm)
            key_side = [i for i in (0, 1) if a_sm in a_atoms[i]]
            if len(key_side) != 1:
                which = "both operands" if key_side else "neither operand"
                raise Reject("scores", f"{_describe(mm)}: the softmax axis comes from {which} of the product; the softmax must run over the key axis")
            k_i = key_side[0]
            q_i = 1 - k_i
            contracted = (a_atoms[0] & a_atoms[1]) - out_atoms
            stray = (a_atoms[0] ^ a_atoms[1]) - out_atoms
            if len(contracted) != 1 or stray:
                raise Reject("scores", f"{_describe(mm)} contracts {len(contracted)} shared axes (and sums {len(stray)} more); a query-key product contracts one feature axis")
            d_atoms.append(next(iter(contracted)))
            q_parts.append(walks[q_i])
            kv_parts.append(walks[k_i])

        q_atoms = set().union(*(self.atoms(w.source) for w in q_parts))
        kv_atoms = set().union(*(self.atoms(w.gather.kv if w.gather else w.source) for w in kv_parts))
        idx_atoms = self.atoms(idx_walk.source)
        score_atoms = {a for ax in sm_axes for a in ax} - {a_sm}
        shared = {x for x in score_atoms if x in q_atoms and x in kv_atoms}
        b_set = {x for x in shared if x in idx_atoms} if len(shared) > 1 else shared
        if shared - b_set:
            keys = ", ".join(_describe(w.gather.kv if w.gather else w.source) for w in kv_parts)
            raise Reject("keys", f"the keys ({keys}) differ across heads: this is multi-head attention; sparse MLA needs one latent shared by all heads (the absorbed form)")
        rest = score_atoms - b_set
        for x in rest:
            if x not in q_atoms:
                raise Reject("scores", f"a score axis of size {alg.size(x)} comes from neither the query nor the keys")
        s_set = {x for x in rest if x in idx_atoms}
        h_set = rest - s_set
        for name, s in (("batch", b_set), ("query", s_set), ("head", h_set)):
            if len(s) > 1:
                raise Reject("layout", f"the scores have {len(s)} {name} axes; one is supported")
        roles: dict[int, str] = {a_t: "T", a_k: "K"}
        for role, s in (("B", b_set), ("S", s_set), ("H", h_set)):
            for x in s:
                roles[x] = role
        for i, d in enumerate(d_atoms):
            if d in roles:
                raise Reject("scores", "a feature axis is also a batch, query or head axis")
            roles[d] = f"D{i}"

        for w in kv_parts:
            kv_src = w.gather.kv if w.gather else w.source
            extra = self.atoms(kv_src) - {a for a, r in roles.items() if r in ("B", "T") or r.startswith("D")}
            if any(roles.get(x) == "H" for x in extra):
                raise Reject("keys", f"the keys {_describe(kv_src)} differ across heads: this is multi-head attention; sparse MLA needs one latent shared by all heads (the absorbed form)")
            if extra:
                raise Reject("keys", f"the keys {_describe(kv_src)} have an axis that is not batch, key position or feature")
        if idx_atoms - {a for a, r in roles.items() if r in ("B", "S", "K")}:
            if any(roles.get(x) == "H" for x in idx_atoms):
                raise Reject("indices", f"the indices {_describe(idx_walk.source)} differ per head; one index set per query token is supported")
            raise Reject("indices", f"the indices {_describe(idx_walk.source)} have an axis that is not batch, query or top-k")
        for w in q_parts:
            if self.atoms(w.source) - {a for a, r in roles.items() if r in ("B", "S", "H") or r.startswith("D")}:
                raise Reject("query", f"the query {_describe(w.source)} has an axis that is not batch, query, head or feature")

        # The weighted sum: contracts the key axis only, over a prefix of the key latent.
        p_atoms = self.atoms(probs)
        v_atoms = self.atoms(v_operand_node(v_walk, out_mm, probs))
        o_atoms = self.atoms(out_mm)
        if (p_atoms & v_atoms) - o_atoms != {a_sm} or (p_atoms ^ v_atoms) - o_atoms:
            raise Reject("value", f"{_describe(out_mm)} does not sum the probabilities over the key axis alone")
        v_feature = o_atoms - p_atoms
        if len(v_feature) != 1:
            raise Reject("value", f"{_describe(out_mm)} produces {len(v_feature)} value feature axes; one is expected")
        a_v = next(iter(v_feature))
        latent = self._value_part(v_walk, kv_parts, gathers)
        order = [latent] + [i for i in range(len(kv_parts)) if i != latent]
        q_parts = [q_parts[i] for i in order]
        kv_parts = [kv_parts[i] for i in order]
        d_atoms = [d_atoms[i] for i in order]
        for i, d in enumerate(d_atoms):
            roles[d] = f"D{i}"
        # The value feature may be the latent feature itself (V = the whole latent): own role map.
        out_roles = {**roles, self.alg.find(a_v): "V"}
        if o_atoms - {a for a, r in out_roles.items() if r in ("B", "S", "H", "V")}:
            raise Reject("value", f"the attention output {_describe(out_mm)} has an axis that is not batch, query, head or value")

        # Masks: the same for every head, over batch/query/key axes only.
        allowed = {"B", "S", "T"} if selection is not None else {"B", "S", "K"}
        mask_terms = []
        for node, kind, text in masks:
            mroles = {roles.get(x) for x in self.atoms(node)}
            if "H" in mroles:
                raise Reject("mask", f"the mask {_describe(node)} differs across heads; masks must be shared by all heads")
            if not mroles <= allowed:
                raise Reject("mask", f"the mask {_describe(node)} has an axis that is not batch, query or key")
            mask_terms.append(MaskTerm(self.operand(node, roles), kind, text))

        self._check_escapes(out_mm)
        self._check_mutations(out_mm, [w.source for w in q_parts] + [w.gather.kv if w.gather else w.source for w in kv_parts] + [v_walk.gather.kv if v_walk.gather else v_walk.source, idx_walk.source] + [m[0] for m in masks])

        # Widths, dtypes, scale.
        # Widths and the head count shape the kernel: a symbolic one is specialized (a guard).
        notes = []
        d_parts = [self._specialize(alg.size(d), "feature width", notes) for d in d_atoms]
        d_v = self._specialize(alg.size(a_v), "value width", notes)
        heads = 1
        for x, r in roles.items():
            if r == "H":
                heads = self._specialize(alg.size(x), "head count", notes)
        if v_walk.prefix is None and d_v != d_parts[0]:
            raise Reject("value", "the value width differs from the latent width without a [..., :d_v] slice")
        if d_v > d_parts[0]:
            raise Reject("value", f"the value width {d_v} exceeds the latent width {d_parts[0]}")
        srcs = [w.source for w in q_parts] + [w.gather.kv if w.gather else w.source for w in kv_parts]
        dtypes = {fx_ops.meta_tensor(s).dtype for s in srcs}
        for s in srcs:
            t = fx_ops.meta_tensor(s)
            if not t.dtype.is_floating_point:
                raise Reject("dtype", f"{_describe(s)} has dtype {t.dtype}; attention operands must be floating point")
        compute = next(iter(dtypes)) if len(dtypes) == 1 else _widest(dtypes)
        if coef0.const <= 0:
            raise Reject("scale", f"the softmax scale {coef0.const} is not positive")

        fp8 = fp8_latent(kv_parts[0].source, kv_parts[1].source if len(kv_parts) > 1 else None)
        # Index-mask and gather forms alike: the gathered operand's source is the cache itself.
        if fp8 is not None and fp8.unsupported is None:
            axes0 = self.operand(kv_parts[0].source, roles).axes
            if axes0[-1] != ("D0",) or len(kv_parts) > 2:
                fp8 = dataclasses.replace(fp8, unsupported="the latent's feature axis is not its last axis")
        sizes = self._sizes(roles, q_parts, kv_parts, idx_walk, masks)
        unique = _proven_unique(idx_walk.source)
        if semantics == "scatter" and not unique:
            notes.append("indices not proven unique: duplicates are dropped at run time, as the scatter mask would")
        if semantics == "python-index":
            notes.append("negative indices wrap as in Python indexing")
        out_t = fx_ops.meta_tensor(out_mm)
        dims = SiteDims(
            d_parts=tuple(d_parts),
            d_v=d_v,
            heads=heads,
            h_kv=1,
            topk=sizes["K"].describe(),
            batch=sizes["B"].describe() if "B" in sizes else "1",
            s_q=sizes["S"].describe() if "S" in sizes else "1",
            s_kv=sizes["T"].describe(),
        )
        return MatchedSite(
            anchor=c.softmax,
            graph_name=self.graph_name,
            source=fx_ops.source_line(c.softmax),
            form="index-mask" if selection is not None else "gather",
            q_parts=tuple(self.operand(w.source, roles) for w in q_parts),
            kv_parts=tuple(self.operand(w.gather.kv if w.gather else w.source, roles) for w in kv_parts),
            value=self.operand(v_walk.gather.kv if v_walk.gather else v_walk.source, out_roles),
            indices=self.operand(idx_walk.source, roles),
            index_semantics=semantics,
            indices_unique=unique,
            masks=tuple(mask_terms),
            scale=coef0.const,
            scale_factors=coef0.nodes,
            scale_text=coef0.text(),
            output=self.operand(out_mm, out_roles),
            output_dtype=out_t.dtype,
            compute_dtype=compute,
            dims=dims,
            sizes=sizes,
            region=frozenset(c.region),
            notes=tuple(notes),
            fp8=fp8,
        )

    def _specialize(self, size: Any, what: str, notes: list) -> int:
        fixed = static_int(size)
        if fixed is not None:
            return fixed
        from torch.fx.experimental.symbolic_shapes import guard_int

        fixed = guard_int(size)
        notes.append(f"{what} specialized to {fixed} (it shapes the kernel; a different value recompiles)")
        return fixed

    def _value_part(self, v_walk: _Walk, kv_parts: list, gathers: list) -> int:
        """Which key part the value reads (gathered values from gathered keys, plain from plain).
        The value may also be the first piece of a key built as ``cat([latent, rope], -1)``: that
        is the key's ``[..., :d_latent]`` prefix."""
        gathered = v_walk.gather is not None
        value = v_walk.gather.kv if gathered else v_walk.source
        candidates = [(i, w.gather.kv if gathered else w.source) for i, w in enumerate(kv_parts) if (w.gather is not None) == gathered]
        for i, key in candidates:
            if same_tensor(key, value):
                return i
        for i, key in candidates:
            width = _cat_head_width(key, value)
            if width is not None:
                if v_walk.prefix is None:
                    v_walk.prefix = width
                return i
        if gathered:
            raise Reject("value", f"the value is gathered from {_describe(value)}, which is not the key latent")
        keys = ", ".join(_describe(w.gather.kv if w.gather else w.source) for w in kv_parts)
        raise Reject("value", f"the value {_describe(value)} is not the key latent ({keys}); MLA reads values from the same latent as keys")

    def operand(self, node: torch.fx.Node, roles: dict) -> Operand:
        axes = []
        for ax in self.alg.canon(self.axes_of(node)):
            names = []
            for a in ax:
                if a not in roles:
                    raise Reject("layout", f"{_describe(node)} has an axis of size {self.alg.size(a)} with no role in the attention")
                names.append(roles[a])
            axes.append(tuple(names))
        return Operand(node, tuple(axes))

    def _sizes(self, roles: dict, q_parts, kv_parts, idx_walk, masks) -> dict:
        leaves = [w.source for w in q_parts] + [w.gather.kv if w.gather else w.source for w in kv_parts] + [idx_walk.source] + [m[0] for m in masks]
        sizes: dict[str, SizeWitness] = {}
        for atom, role in roles.items():
            size = self.alg.size(atom)
            fixed = static_int(size)
            if fixed is not None:
                sizes[role] = SizeWitness(fixed)
                continue
            witness = None
            for leaf in leaves:
                for i, ax in enumerate(self.alg.canon(self.axes_of(leaf))):
                    if ax == (self.alg.find(atom),):
                        witness = SizeWitness(None, leaf, i)
                        break
                if witness:
                    break
            if witness is None:
                raise Reject("layout", f"the dynamic length of the {role} axis cannot be read from an input of the attention")
            sizes[role] = witness
        return sizes

    def _check_escapes(self, out_mm: torch.fx.Node) -> None:
        for node in self.c.region:
            if node is out_mm:
                continue
            outside = [u for u in node.users if u not in self.c.region and u is not self.c.softmax]
            if outside:
                raise Reject("escape", f"{_describe(node)} is also used by {', '.join(_describe(u) for u in outside)} outside the attention")
        for node in self.c.region:
            if fx_ops.is_mutating(node) and node.args and node.args[0] not in self.c.region:
                raise Reject("mutation", f"{_describe(node)} updates {_describe(node.args[0])} in place inside the attention")

    def _check_mutations(self, out_mm: torch.fx.Node, leaves: list) -> None:
        """The op reads its inputs where the weighted sum was; the user's code read them earlier,
        where the region first used them. A write in between would change what is read."""
        order = {n: i for i, n in enumerate(out_mm.graph.nodes)}
        end = order[out_mm]
        first_read: dict = {}
        for leaf in leaves:
            users = [order[u] for u in leaf.users if u in self.c.region]
            root = _root_base(leaf)
            if users:
                first_read[root] = min(first_read.get(root, end), min(users))
        for node in out_mm.graph.nodes:
            if node in self.c.region or not fx_ops.is_mutating(node) or not node.args:
                continue
            root = _root_base(node.args[0])
            if root in first_read and first_read[root] < order[node] < end:
                raise Reject("mutation", f"{_describe(node)} writes into an input of the attention between the scores and the weighted sum")


def _keeps_axes(node: torch.fx.Node) -> bool:
    """True for layout ops that only move or add unit axes: a walk may look through them, and the
    operand the op reads stays a tensor the user wrote, not a reshape of one."""
    if fx_ops.kind_of(node) not in ("view", "squeeze"):
        return True
    src, out = fx_ops.meta_tensor(node.args[0]), fx_ops.meta_tensor(node)
    if src is None or out is None:
        return False
    non_unit = lambda shape: [s for s in shape if static_int(s) != 1]  # noqa: E731
    a, b = non_unit(src.shape), non_unit(out.shape)
    return len(a) == len(b) and all(x is y or (static_int(x) is not None and static_int(x) == static_int(y)) for x, y in zip(a, b))


def v_operand_node(v_walk: _Walk, out_mm: torch.fx.Node, probs: torch.fx.Node) -> torch.fx.Node:
    ops_ = _contraction_operands(out_mm)
    return ops_[1] if ops_[0] is probs else ops_[0]


def _contraction_operands(mm: torch.fx.Node) -> list:
    view = fx_ops.read(mm)
    if view.kind == "einsum":
        ops_ = view.varargs() if not view.method else [view.input] + view.varargs()
        if len(ops_) != 2:
            raise Reject("scores", f"{_describe(mm)} has {len(ops_)} operands; two are expected")
        return ops_
    return [view.input, view.arg("other")]


def _cat_head_width(key: torch.fx.Node, value: torch.fx.Node) -> Optional[int]:
    """The width of ``value`` when ``key`` is ``cat([value, ...], -1)`` (the value is then the
    key's prefix of that width), else None."""
    if fx_ops.kind_of(key) != "cat":
        return None
    view = fx_ops.read(key)
    pieces = view.arg("tensors")
    k_t, v_t = fx_ops.meta_tensor(key), fx_ops.meta_tensor(value)
    if not pieces or k_t is None or v_t is None or view.arg("dim", 0) % k_t.dim() != k_t.dim() - 1:
        return None
    return v_t.shape[-1] if same_tensor(pieces[0], value) else None


def _prefix_slice(node: torch.fx.Node) -> Optional[int]:
    """Width d when ``node`` is ``x[..., :d]`` (every other axis whole), else None."""
    items = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    src = fx_ops.meta_tensor(node.args[0])
    if src is None or not items:
        return None
    last = items[-1]
    stop = fx_ops.meta_value(last.stop) if isinstance(last, slice) else None
    if not isinstance(last, slice) or last.start not in (None, 0) or last.step not in (None, 1) or not isinstance(stop, (int, torch.SymInt)):
        return None
    head = items[:-1]
    if head and head[0] is Ellipsis:
        head = head[1:]
    elif len(items) != src.dim():
        return None
    if any(not (isinstance(it, slice) and it == slice(None)) for it in head):
        return None
    width = src.shape[-1]
    return min(stop, width) if isinstance(width, int) and isinstance(stop, int) else stop


def _arange_over(node: Any, size: Any) -> bool:
    cur = node
    while isinstance(cur, torch.fx.Node):
        kind = fx_ops.kind_of(cur)
        if kind == "arange":
            args = [a for a in cur.args]
            end = args[0] if len(args) == 1 else (args[1] if len(args) >= 2 and args[0] == 0 and (len(args) == 2 or args[2] == 1) else None)
            t = fx_ops.meta_tensor(cur)
            return t is not None and end is not None and (end is size or (isinstance(end, int) and end == size) or t.shape[0] == size)
        if kind in LAYOUT or kind == "getitem" or kind == "to_int" or kind == "to_dtype":
            cur = cur.args[0]
            continue
        return False
    return False


def _arange_chain(node: torch.fx.Node) -> list:
    chain = []
    cur = node
    while isinstance(cur, torch.fx.Node) and fx_ops.kind_of(cur) != "arange":
        chain.append(cur)
        cur = cur.args[0]
    return chain


def _strip(node: Any) -> Any:
    cur = node
    while isinstance(cur, torch.fx.Node) and fx_ops.kind_of(cur) in ("to_int", "to_dtype") + LAYOUT:
        cur = cur.args[0]
    return cur


def _root_base(node: Any) -> Any:
    cur = node
    while isinstance(cur, torch.fx.Node) and fx_ops.kind_of(cur) in ("getitem", "view", "permute", "transpose", "t", "unsqueeze", "squeeze", "expand"):
        cur = cur.args[0]
    return cur


def _proven_unique(node: torch.fx.Node) -> bool:
    """Indices read straight from ``topk(...)`` are distinct within a row."""
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 1:
        return fx_ops.kind_of(node.args[0]) == "topk"
    if node.op == "call_function" and node.target is getattr and node.args[1] == "indices":
        return fx_ops.kind_of(node.args[0]) == "topk"
    return False


def _widest(dtypes: set) -> torch.dtype:
    out = None
    for d in dtypes:
        out = d if out is None else torch.promote_types(out, d)
    return out


def analyze_softmax(softmax: torch.fx.Node, graph_name: str = "") -> Union[MatchedSite, Rejection]:
    try:
        return _Analysis(softmax, graph_name).run()
    except Reject as r:
        return Rejection(softmax, graph_name, fx_ops.source_line(softmax), r.reason, r.check)


def find_sites(gm: torch.fx.GraphModule, graph_name: str = "") -> list:
    """Every softmax of ``gm`` and of its higher-order-op bodies, as a MatchedSite or a Rejection."""
    results: list = []
    for node in list(gm.graph.nodes):
        if fx_ops.kind_of(node) == "softmax":
            results.append(analyze_softmax(node, graph_name))
    for name, sub in hop_bodies(gm):
        results.extend(find_sites(sub, f"{graph_name}.{name}" if graph_name else name))
    return results


def hop_bodies(gm: torch.fx.GraphModule) -> list:
    """Submodules that are bodies of higher-order ops Dynamo emits (activation checkpoint, wrap)."""
    bodies = []
    seen = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", "") or getattr(node.target, "_name", "")
        if not any(h in str(name) for h in HOP_TARGET_NAMES):
            continue
        for arg in node.args:
            if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" and arg.target not in seen:
                sub = getattr(gm, arg.target, None)
                if isinstance(sub, torch.fx.GraphModule):
                    seen.add(arg.target)
                    bodies.append((arg.target, sub))
    return bodies
