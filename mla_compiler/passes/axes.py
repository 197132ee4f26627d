"""Axis algebra: which axes of which tensors are the same axis, through einsums, matmuls and views.

Every non-unit axis of a tensor gets one or more *atoms* (several where a reshape merged axes).
Ops constrain atoms to be equal (an einsum letter shared by two operands, broadcasting in an add);
a union-find keeps the classes. The matcher then asks questions that do not depend on how the user
spelled the attention: "is the softmax axis the axis the keys vary along?", "do the keys vary
across heads?", "is the mask the same for every head?".

Size-1 axes carry the empty tuple: they broadcast and belong to no class.
"""

from __future__ import annotations

import string
from typing import Any, Optional, Sequence

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from mla_compiler.passes import fx_ops

Atom = int
Axis = tuple[Atom, ...]
Axes = tuple[Axis, ...]


class Unsupported(Exception):
    """An op inside the attention region whose axes the algebra cannot follow; the text says which."""


def same_size(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - symbolic comparison of unrelated expressions
        return False


def static_int(size: Any) -> Optional[int]:
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt):
        maybe = size.node.maybe_as_int()
        return int(maybe) if maybe is not None else None
    return None


def is_unit(size: Any) -> bool:
    return static_int(size) == 1


class AxisAlgebra:
    def __init__(self) -> None:
        self._parent: list[int] = []
        self._size: list[Any] = []
        self._witness: list[Optional[tuple[torch.fx.Node, int]]] = []
        self._parts: dict[int, tuple[int, ...]] = {}

    # -- atoms -------------------------------------------------------------------------------
    def fresh(self, size: Any, witness: Optional[tuple[torch.fx.Node, int]] = None) -> Atom:
        self._parent.append(len(self._parent))
        self._size.append(size)
        self._witness.append(witness)
        return len(self._parent) - 1

    def find(self, a: Atom) -> Atom:
        while self._parent[a] != a:
            self._parent[a] = self._parent[self._parent[a]]
            a = self._parent[a]
        return a

    def size(self, a: Atom) -> Any:
        return self._size[self.find(a)]

    def witness(self, a: Atom) -> Optional[tuple[torch.fx.Node, int]]:
        return self._witness[self.find(a)]

    def unify(self, a: Atom, b: Atom) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        pa, pb = self._parts.get(ra), self._parts.get(rb)
        if pa or pb:
            # A refined atom meets a plain one: refine the other the same way, then pair parts.
            if not pa:
                pa = self._refine(ra, [self.size(p) for p in pb])
            if not pb:
                pb = self._refine(rb, [self.size(p) for p in pa])
            if len(pa) != len(pb):
                raise Unsupported("two reshapes split one axis differently")
            for x, y in zip(pa, pb):
                self.unify(x, y)
            return
        sa, sb = self._size[ra], self._size[rb]
        if not same_size(sa, sb) and static_int(sa) is not None and static_int(sb) is not None:
            raise Unsupported(f"axes of sizes {sa} and {sb} are used as one axis")
        # Keep a root whose size is a plain int when there is one; keep any run-time witness.
        if static_int(sa) is None and static_int(sb) is not None:
            ra, rb = rb, ra
        self._parent[rb] = ra
        if self._witness[ra] is None:
            self._witness[ra] = self._witness[rb]

    def _refine(self, root: Atom, sizes: Sequence[Any], witnesses=None) -> tuple[Atom, ...]:
        parts = tuple(self.fresh(s, witnesses[i] if witnesses else None) for i, s in enumerate(sizes))
        self._parts[root] = parts
        return parts

    def atoms(self, axis: Axis) -> tuple[Atom, ...]:
        """Canonical atoms of an axis, with refined atoms expanded into their parts."""
        out: list[Atom] = []
        for a in axis:
            r = self.find(a)
            if r in self._parts:
                out.extend(self.atoms(self._parts[r]))
            else:
                out.append(r)
        return tuple(out)

    def canon(self, axes: Axes) -> Axes:
        return tuple(self.atoms(ax) for ax in axes)

    def axis_size(self, axis: Axis) -> Any:
        total: Any = 1
        for a in self.atoms(axis):
            total = total * self.size(a)
        return total

    # -- leaves ------------------------------------------------------------------------------
    def leaf(self, node: torch.fx.Node) -> Axes:
        t = fx_ops.meta_tensor(node)
        if t is None:
            raise Unsupported(f"{node.name} has no recorded tensor value")
        return tuple(() if is_unit(s) else (self.fresh(s, (node, i)),) for i, s in enumerate(t.shape))

    # -- helpers -----------------------------------------------------------------------------
    def unify_axis(self, x: Axis, y: Axis) -> Axis:
        if not x:
            return y
        if not y:
            return x
        ax, ay = self.atoms(x), self.atoms(y)
        if len(ax) == len(ay):
            for a, b in zip(ax, ay):
                self.unify(a, b)
            return self.atoms(x)
        if len(ax) == 1:
            self.unify_refining(ax[0], ay)
            return self.atoms(y)
        if len(ay) == 1:
            self.unify_refining(ay[0], ax)
            return self.atoms(x)
        raise Unsupported("axes merged from different atoms are used as one axis")

    def unify_refining(self, a: Atom, parts: tuple[Atom, ...]) -> None:
        """``a`` is one atom standing for the merged ``parts``: refine it so the parts match."""
        ra = self.find(a)
        if not same_size(self.axis_size((ra,)), self.axis_size(parts)):
            raise Unsupported("a merged axis does not match the axes it merges")
        mine = self._parts.get(ra) or self._refine(ra, [self.size(p) for p in parts])
        for x, y in zip(mine, parts):
            self.unify(x, y)

    def broadcast(self, *axes_list: Axes) -> Axes:
        n = max(len(a) for a in axes_list)
        padded = [((),) * (n - len(a)) + tuple(a) for a in axes_list]
        out: list[Axis] = []
        for i in range(n):
            cur: Axis = ()
            for a in padded:
                cur = self.unify_axis(cur, a[i])
            out.append(cur)
        return tuple(out)


def _norm_dim(d: int, ndim: int) -> int:
    if not isinstance(d, int):
        raise Unsupported(f"dimension {d!r} is not a constant")
    if d < 0:
        d += ndim
    if not 0 <= d < ndim:
        raise Unsupported(f"dimension {d} out of range for rank {ndim}")
    return d


def parse_einsum(equation: str, ranks: Sequence[int]) -> tuple[list[str], str]:
    """Operand subscripts and output subscripts, with '...' expanded to fresh upper-case letters."""
    eq = equation.replace(" ", "")
    if "->" in eq:
        lhs, rhs = eq.split("->")
    else:
        lhs, rhs = eq, None
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise Unsupported(f"einsum '{equation}' has {len(terms)} subscripts for {len(ranks)} operands")
    spare = [c for c in string.ascii_uppercase if c not in eq]
    ell_rank = max((r - (len(t) - 3) for t, r in zip(terms, ranks) if "..." in t), default=0)
    ell = "".join(spare[:ell_rank])
    expanded = []
    for t, r in zip(terms, ranks):
        if "..." in t:
            k = r - (len(t) - 3)
            t = t.replace("...", ell[ell_rank - k:])
        if len(t) != r:
            raise Unsupported(f"einsum subscript '{t}' does not match an operand of rank {r}")
        expanded.append(t)
    if rhs is None:
        counts: dict[str, int] = {}
        for t in expanded:
            for c in t:
                counts[c] = counts.get(c, 0) + 1
        rhs = ell + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ell))
    else:
        rhs = rhs.replace("...", ell)
    return expanded, rhs


def view_axes(alg: AxisAlgebra, in_axes: Axes, in_shape: Sequence[Any], out_shape: Sequence[Any], node: torch.fx.Node) -> Axes:
    """Axes after a reshape: atoms flow in order; a merge concatenates them, a split refines one."""
    for ax, s in zip(in_axes, in_shape):
        if not ax and not is_unit(s):
            raise Unsupported(f"{node.name} reshapes an expanded (stride-0) axis")
    queue: list[Atom] = [a for ax in in_axes for a in alg.atoms(ax)]
    out: list[Axis] = []
    for j, n in enumerate(out_shape):
        if is_unit(n):
            out.append(())
            continue
        taken: list[Atom] = []
        prod: Any = 1
        while not same_size(prod, n):
            if not queue:
                raise Unsupported(f"{node.name}: cannot follow the reshape {list(in_shape)} -> {list(out_shape)}")
            a = queue[0]
            if same_size(prod * alg.size(a), n) or _divides(prod * alg.size(a), n):
                taken.append(queue.pop(0))
                prod = prod * alg.size(a)
                continue
            if taken:
                raise Unsupported(f"{node.name}: the reshape {list(in_shape)} -> {list(out_shape)} splits an axis mid-way")
            # Atom larger than this output axis: split it over this and the following output axes.
            sizes, total = [], 1
            for k in range(j, len(out_shape)):
                if is_unit(out_shape[k]):
                    continue
                sizes.append(out_shape[k])
                total = total * out_shape[k]
                if same_size(total, alg.size(a)):
                    break
            else:
                raise Unsupported(f"{node.name}: the reshape {list(in_shape)} -> {list(out_shape)} splits an axis unevenly")
            wit, k2 = [], j
            for s in sizes:
                while is_unit(out_shape[k2]):
                    k2 += 1
                wit.append((node, k2))
                k2 += 1
            queue.pop(0)
            queue[0:0] = list(alg._refine(alg.find(a), sizes, wit))
        out.append(tuple(taken))
    if queue:
        raise Unsupported(f"{node.name}: cannot follow the reshape {list(in_shape)} -> {list(out_shape)}")
    return tuple(out)


def _divides(part: Any, whole: Any) -> bool:
    """True when ``part`` is statically known to be a proper factor on the way to ``whole``."""
    p, w = static_int(part), static_int(whole)
    if p is not None and w is not None:
        return w % p == 0 and p < w
    try:
        import sympy

        pe = part.node.expr if isinstance(part, torch.SymInt) else sympy.Integer(part)
        we = whole.node.expr if isinstance(whole, torch.SymInt) else sympy.Integer(whole)
        q = sympy.simplify(we / pe)
        return q.is_integer is True and q != 1
    except Exception:  # noqa: BLE001 - an expression sympy cannot decide is not a known factor
        return False


def propagate(alg: AxisAlgebra, node: torch.fx.Node, axes_of) -> Axes:
    """Axes of ``node`` given ``axes_of(input)`` for its inputs. Raises Unsupported."""
    view = fx_ops.read(node)
    if view is None:
        raise Unsupported(f"{node.name} ({node.target}) is not an op the matcher follows")
    kind = view.kind
    out_t = fx_ops.meta_tensor(node)
    if kind in ("full", "zeros", "ones", "full_like", "zeros_like", "ones_like", "arange"):
        return alg.leaf(node)
    if kind in ("to_dtype", "identity", "softmax", "log_softmax", "neg", "triu", "tril", "dropout", "fill", "to_int", "not"):
        return axes_of(view.input)
    if kind in ("add", "sub", "mul", "div", "where", "masked_fill", "and", "or"):
        if kind == "where":
            tensors = [view.arg("condition"), view.arg("input"), view.arg("other")]
        elif kind == "masked_fill":
            tensors = [view.input, view.arg("mask")]
        else:
            tensors = [view.input, view.arg("other")]
        tensors = [t for t in tensors if fx_ops.meta_tensor(t) is not None]
        result = alg.broadcast(*[axes_of(t) for t in tensors])
        if kind == "masked_fill" or view.inplace:
            # The result keeps the first operand's shape; broadcast only constrains the atoms.
            base = axes_of(view.input)
            return tuple(alg.unify_axis(a, b) for a, b in zip(base, result[len(result) - len(base):]))
        return result
    if kind == "permute":
        dims = view.varargs() if view.method else view.arg("dims")
        src = axes_of(view.input)
        dims = [_norm_dim(d, len(src)) for d in dims]
        return tuple(src[d] for d in dims)
    if kind in ("transpose", "t"):
        src = list(axes_of(view.input))
        if kind == "t":
            d0, d1 = 0, len(src) - 1
        else:
            d0, d1 = _norm_dim(view.arg("dim0"), len(src)), _norm_dim(view.arg("dim1"), len(src))
        src[d0], src[d1] = src[d1], src[d0]
        return tuple(src)
    if kind == "unsqueeze":
        src = list(axes_of(view.input))
        d = view.arg("dim")
        d = d + len(src) + 1 if d < 0 else d
        src.insert(d, ())
        return tuple(src)
    if kind in ("squeeze", "view", "expand"):
        src = axes_of(view.input)
        in_t = fx_ops.meta_tensor(view.input)
        if kind == "expand":
            pad = len(out_t.shape) - len(src)
            return ((),) * pad + tuple(src)
        return view_axes(alg, src, in_t.shape, out_t.shape, node)
    if kind == "einsum":
        operands = view.varargs()
        if not operands and view.method:
            operands = [view.input]
        eq = view.arg("equation") if not view.method else None
        ranks = [len(fx_ops.meta_tensor(o).shape) for o in operands]
        terms, rhs = parse_einsum(eq, ranks)
        letter: dict[str, Axis] = {}
        for op, term in zip(operands, terms):
            for c, ax in zip(term, axes_of(op)):
                letter[c] = alg.unify_axis(letter.get(c, ()), ax)
        return tuple(letter.get(c, ()) for c in rhs)
    if kind == "matmul":
        a, b = axes_of(view.input), axes_of(view.arg("other"))
        if len(a) < 2 or len(b) < 2:
            raise Unsupported(f"{node.name}: matmul with a vector operand")
        alg.unify_axis(a[-1], b[-2])
        batch = alg.broadcast(a[:-2], b[:-2])
        return tuple(batch) + (a[-2], b[-1])
    if kind == "getitem":
        return getitem_axes(alg, node, axes_of)
    if kind == "scatter":
        base = axes_of(view.input)
        idx_node = view.arg("index")
        idx = axes_of(idx_node)
        d = _norm_dim(view.arg("dim"), len(base))
        base_t, idx_t = fx_ops.meta_tensor(view.input), fx_ops.meta_tensor(idx_node)
        for i, (bx, ix) in enumerate(zip(base, idx)):
            if i != d and same_size(base_t.shape[i], idx_t.shape[i]):
                alg.unify_axis(bx, ix)
        return base
    if kind in ("gather", "take_along_dim"):
        inp = axes_of(view.input)
        idx_node = view.arg("index") if kind == "gather" else view.arg("indices")
        idx = axes_of(idx_node)
        d = _norm_dim(view.arg("dim"), len(inp))
        out = []
        for i, (ax, ix) in enumerate(zip(inp, idx)):
            if i == d:
                out.append(ix)
            else:
                out.append(alg.unify_axis(ix, ax) if ix else ax)
        return tuple(out)
    if kind == "index_select":
        inp = list(axes_of(view.input))
        idx = axes_of(view.arg("index"))
        d = _norm_dim(view.arg("dim"), len(inp))
        inp[d] = idx[0] if idx else ()
        return tuple(inp)
    raise Unsupported(f"{node.name}: axes through '{kind}' are not followed")


def getitem_axes(alg: AxisAlgebra, node: torch.fx.Node, axes_of) -> Axes:
    """Basic and advanced indexing: slices keep or shorten axes, None inserts one, tensors gather."""
    src_node, index = node.args[0], node.args[1]
    src = list(axes_of(src_node))
    out_t = fx_ops.meta_tensor(node)
    items = list(index) if isinstance(index, tuple) else [index]
    n_used = sum(1 for it in items if it is not None and it is not Ellipsis)
    expanded: list[Any] = []
    for it in items:
        if it is Ellipsis:
            expanded.extend([slice(None)] * (len(src) - n_used))
        else:
            expanded.append(it)
    expanded.extend([slice(None)] * (len(src) - sum(1 for it in expanded if it is not None)))
    tensor_pos = [i for i, it in enumerate(expanded) if isinstance(it, torch.fx.Node)]
    out: list[Axis] = []
    src_i = 0
    out_i = 0
    adv_done = False
    for pos, it in enumerate(expanded):
        if it is None:
            out.append(())
            out_i += 1
            continue
        if isinstance(it, torch.fx.Node):
            it_t = fx_ops.meta_tensor(it)
            if it_t is not None and it_t.dtype == torch.bool:
                raise Unsupported(f"{node.name} indexes with a boolean mask")
            if not adv_done:
                if tensor_pos != list(range(tensor_pos[0], tensor_pos[0] + len(tensor_pos))):
                    raise Unsupported(f"{node.name}: advanced indices that are not adjacent")
                adv = alg.broadcast(*[axes_of(t) for t in (expanded[p] for p in tensor_pos)])
                out.extend(adv)
                out_i += len(adv)
                adv_done = True
            src_i += 1
            continue
        if isinstance(it, int):
            src_i += 1
            continue
        if isinstance(it, slice):
            full = it.start in (None, 0) and it.stop is None and it.step in (None, 1)
            if full:
                out.append(src[src_i])
            else:
                size = out_t.shape[out_i]
                out.append(() if is_unit(size) else (alg.fresh(size, (node, out_i)),))
            src_i += 1
            out_i += 1
            continue
        raise Unsupported(f"{node.name}: index item {it!r} is not followed")
    return tuple(out)
