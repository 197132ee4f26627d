"""Replace a matched site by one ``sparse_mla.sparse_attn`` call.

The lowering reads only the ``MatchedSite`` record: operands with axis roles, the index semantics,
the masks and the scale. It builds, right before the site's output:

    q   [B*S, H, d_qk]   parts permuted to (B, S, H, D) and concatenated, latent first
    kv  [B*T, 1, d_qk]   parts permuted to (B, T, D) and concatenated (one row block per batch)
    idx [B*S, 1, topk]   int32, offset by b*T into the flattened kv; -1 where a slot is invalid:
                         out of range, masked (masks are gathered at the selected keys, never
                         materialized over all keys), or a duplicate a scatter mask would collapse
    out = sparse_attn(q, kv, idx, scale, d_v)[0] reshaped and permuted to the user's layout.

The replaced nodes are erased: no [B, S, H, T] score tensor remains in the graph. Every new node
gets a fake ``example_value`` computed under the graph's fake mode, so a shape mistake fails here,
at compile time, and later passes can read shapes.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Optional

import torch
import torch.fx
from torch.fx.node import map_arg

from mla_compiler.kernels import fp8_reference
from mla_compiler.lowering import ops as _ops  # noqa: F401 - registers torch.ops.sparse_mla
from mla_compiler.passes import fx_ops
from mla_compiler.sites import MatchedSite, Operand

SPARSE_ATTN = torch.ops.sparse_mla.sparse_attn.default
SPARSE_ATTN_FP8 = torch.ops.sparse_mla.sparse_attn_fp8kv.default


class _Builder:
    """Emits nodes before ``anchor`` and gives each a fake example value."""

    def __init__(self, graph: torch.fx.Graph, anchor: torch.fx.Node, provenance: torch.fx.Node) -> None:
        self.graph = graph
        self.anchor = anchor
        self.provenance = provenance
        self.created: list[torch.fx.Node] = []
        self._sizes: dict[str, Any] = {}
        fake = fx_ops.meta_value(provenance)
        self.fake_mode = getattr(fake, "fake_mode", None)

    def _emit(self, op: str, target: Any, args: tuple, kwargs: dict) -> torch.fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.create_node(op, target, args, kwargs)
        self.created.append(node)
        node.meta["stack_trace"] = self.provenance.meta.get("stack_trace", "")
        fargs = map_arg(args, fx_ops.meta_value)
        fkwargs = map_arg(kwargs, fx_ops.meta_value)
        ctx = self.fake_mode if self.fake_mode is not None else _null()
        with ctx:
            if op == "call_method":
                value = getattr(fargs[0], target)(*fargs[1:], **fkwargs)
            else:
                value = target(*fargs, **fkwargs)
        node.meta["example_value"] = value
        return node

    def call(self, target: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
        return self._emit("call_function", target, args, kwargs)

    def method(self, name: str, *args: Any, **kwargs: Any) -> torch.fx.Node:
        return self._emit("call_method", name, args, kwargs)

    def undo(self) -> None:
        for node in reversed(self.created):
            if not node.users:
                self.graph.erase_node(node)
        self.created.clear()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


ASSERT_MESSAGE_LIMIT = 254  # CUDA's device-side assert takes at most 255 bytes of message


def checked_mask_message(mask_name: str, source: str) -> str:
    """The run-time mask check's message: what failed and where, within CUDA's assert limit."""
    head = f"sparse_mla: mask {mask_name} holds a value other than 0 or -inf at a selected key (only 0/-inf masks fold into the indices); at "
    room = ASSERT_MESSAGE_LIMIT - len(head)
    where = source if len(source) <= room else "..." + source[-(room - 3):]
    return (head + where)[:ASSERT_MESSAGE_LIMIT]


class _SiteLowering:
    def __init__(self, site: MatchedSite, graph: torch.fx.Graph, fp8_mode: str = "none", fp8_products: int = 0) -> None:
        self.site = site
        self.fp8_mode = fp8_mode
        self.fp8_products = fp8_products
        self.b = _Builder(graph, site.output.node, site.anchor)
        self._size_nodes: dict[str, Any] = {}
        self.device = fx_ops.meta_value(site.q_parts[0].node).device

    def size(self, role: str) -> Any:
        """The length of a role's axis: an int, or a node reading it from an input at run time."""
        if role in self._size_nodes:
            return self._size_nodes[role]
        w = self.site.sizes[role]
        value = w.static if w.static is not None else self.b.method("size", w.node, w.dim)
        self._size_nodes[role] = value
        return value

    def has(self, role: str) -> bool:
        return role in self.site.sizes

    def canonical(self, operand: Operand, order: list[str]) -> torch.fx.Node:
        """``operand`` with axes in ``order``: merged axes split, unit axes dropped, missing roles as
        unit axes (expand them with ``expand``)."""
        x = operand.node
        axes = list(operand.axes)
        if any(len(ax) > 1 for ax in axes):
            shape = []
            split_axes = []
            for ax in axes:
                if not ax:
                    shape.append(1)
                    split_axes.append(())
                for r in ax:
                    shape.append(self.size(r))
                    split_axes.append((r,))
            x = self.b.method("reshape", x, *shape)
            axes = split_axes
        for i in reversed(range(len(axes))):
            if not axes[i]:
                x = self.b.method("squeeze", x, i)
                del axes[i]
        present = [ax[0] for ax in axes]
        target = [r for r in order if r in present]
        perm = [present.index(r) for r in target]
        if perm != list(range(len(perm))):
            x = self.b.method("permute", x, *perm)
        for i, r in enumerate(order):
            if r not in present:
                x = self.b.method("unsqueeze", x, i)
        return x

    def expanded(self, operand: Operand, order: list[str], full: list[str]) -> torch.fx.Node:
        """``canonical`` then broadcast every role of ``full`` to its length."""
        x = self.canonical(operand, order)
        present = operand.roles()
        if any(r not in present for r in full):
            x = self.b.method("expand", x, *[(-1 if r in present else self.size(r)) if r in full else -1 for r in order])
        return x

    def run(self) -> torch.fx.Node:
        s, b = self.site, self.b
        rows = [r for r in ("B", "S", "H") if self.has(r)]
        heads = s.dims.heads
        d_qk = s.dims.d_qk
        dt = s.compute_dtype

        q_list = []
        for i, part in enumerate(s.q_parts):
            order = rows + [f"D{i}"]
            x = self.expanded(part, order, rows)
            if fx_ops.meta_value(x).dtype != dt:
                x = b.method("to", x, dt)
            q_list.append(x)
        q = b.call(torch.cat, q_list, -1) if len(q_list) > 1 else q_list[0]
        if "H" not in rows:
            q = b.method("unsqueeze", q, -2)
        q = b.method("reshape", q, -1, heads, d_qk)

        kv_batched = any("B" in p.roles() for p in s.kv_parts)
        kv_rows = (["B"] if kv_batched else []) + ["T"]
        if self.fp8_mode == "preserve":
            return self.run_fp8(q, rows, kv_batched, kv_rows)
        kv_list = []
        for i, part in enumerate(s.kv_parts):
            x = self.expanded(part, kv_rows + [f"D{i}"], kv_rows)
            if fx_ops.meta_value(x).dtype != dt:
                x = b.method("to", x, dt)
            kv_list.append(x)
        kv = b.call(torch.cat, kv_list, -1) if len(kv_list) > 1 else kv_list[0]
        kv = b.method("reshape", kv, -1, 1, d_qk)

        idx = self.indices(kv_batched)
        result = b.call(SPARSE_ATTN, q, kv, idx, self.scale_value(), s.dims.d_v)
        out = b.call(operator.getitem, result, 0)
        return self.to_user_layout(out, rows)

    def run_fp8(self, q, rows, kv_batched, kv_rows) -> torch.fx.Node:
        """The split payload boundary: FP8 payload and scale (and the bf16 rope) go to the FP8 op;
        the user's dequantized copy is left unused (dead code)."""
        s, b, f = self.site, self.b, self.site.fp8
        part0 = s.kv_parts[0]
        rope = None
        if f.kind == "flashmla":
            views = b.call(fp8_reference.flashmla_views, f.source)
            payload, scale = b.call(operator.getitem, views, 0), b.call(operator.getitem, views, 1)
            if f.rope_in_cache:
                rope = Operand(b.call(operator.getitem, views, 2), part0.axes[:-1] + (("D1",),))
        elif f.kind == "subclass":
            payload = b.call(getattr, f.source, f.payload_field)
            if f.payload_dtype is not None:
                payload = b.method("view", payload, f.payload_dtype)
            scale = b.call(getattr, f.source, f.scale_field)
        else:
            payload, scale = f.source, f.scale
            if f.scale_const is not None:  # a Python-number scale: one fp32 element beside the payload
                scale = b.call(torch.full, (1,), f.scale_const, dtype=torch.float32, device=b.call(getattr, payload, "device"))
        if f.quant_scale:  # the scale multiplies toward fp8: the kernels take its inverse
            scale = b.method("reciprocal", b.method("float", scale))
        # One scale per row and tile; a per-tensor scale becomes a stride-0 view, never a buffer.
        pt, st = fx_ops.meta_value(payload), fx_ops.meta_value(scale)
        if st.dim() != pt.dim() or st.shape[:-1] != pt.shape[:-1]:
            scale = b.method("expand_as", b.method("reshape", scale, *([1] * pt.dim())), b.call(operator.getitem, payload, (Ellipsis, slice(None, 1))))
        if fx_ops.meta_value(scale).dtype != torch.float32:
            scale = b.method("float", scale)
        n_tiles = fx_ops.meta_value(scale).shape[-1]
        self._size_nodes["Z"] = n_tiles
        lat = self.expanded(Operand(payload, part0.axes), kv_rows + ["D0"], kv_rows)
        scl = self.expanded(Operand(scale, part0.axes[:-1] + (("Z",),)), kv_rows + ["Z"], kv_rows)
        if rope is None and len(s.kv_parts) > 1:
            rope = s.kv_parts[1]
        rope3 = self.expanded(rope, kv_rows + ["D1"], kv_rows) if rope is not None else None
        pitch = _common_pitch([lat, scl, rope3]) if kv_batched else None
        if pitch is not None:
            # A batch of caches sliced out of bigger ones (``cache[:bsz, :end_pos]``): rows of
            # batch b start ``pitch`` rows after batch b-1's. Read them in place as one 2-D view
            # with that pitch instead of copying the slice into packed rows every call.
            n_rows = b.call(operator.add, (fx_ops.meta_value(lat).shape[0] - 1) * pitch, self.size("T"))
            lat, scl, rope3 = (None if x is None else _rows_view(b, x, n_rows) for x in (lat, scl, rope3))
            rope2d = rope3
        else:
            lat = b.method("reshape", lat, -1, s.dims.d_parts[0])
            scl = b.method("reshape", scl, -1, n_tiles)
            rope2d = None if rope3 is None else b.method("reshape", rope3, -1, s.dims.d_parts[1])
        if rope2d is not None and fx_ops.meta_value(rope2d).dtype != fx_ops.meta_value(q).dtype:
            rope2d = b.method("to", rope2d, fx_ops.meta_value(q).dtype)
        idx = self.indices(kv_batched, pitch)
        scale_arg = self.scale_value()
        # The products kernel only where asked for: the default graph keeps the op's default.
        extra = {"fp8_products": int(self.fp8_products)} if self.fp8_products else {}
        result = b.call(SPARSE_ATTN_FP8, q, lat, scl, rope2d, idx, scale_arg, s.dims.d_v, **extra)
        return self.to_user_layout(b.call(operator.getitem, result, 0), rows)

    def scale_value(self) -> Any:
        scale: Any = self.site.scale
        for node, exponent in self.site.scale_factors:
            op = operator.mul if exponent > 0 else operator.truediv
            scale = node if (exponent > 0 and isinstance(scale, float) and scale == 1.0) else self.b.call(op, scale, node)
        return scale

    def indices(self, kv_batched: bool, pitch: Optional[int] = None) -> torch.fx.Node:
        """Flat key rows [rows, 1, K] (int32, -1 where invalid or masked); with ``kv_batched`` batch
        b's rows start at b * (``pitch`` or the key length)."""
        s, b = self.site, self.b
        bsk = [r for r in ("B", "S") if self.has(r)] + ["K"]
        idx = self.expanded(s.indices, bsk, bsk)
        idx = b.method("long", idx)
        t_len = self.size("T")
        if s.index_semantics == "python-index":
            idx = b.call(torch.where, b.call(operator.lt, idx, 0), b.call(operator.add, idx, t_len), idx)
        valid = b.call(operator.and_, b.call(operator.ge, idx, 0), b.call(operator.lt, idx, t_len))
        safe = b.call(torch.where, valid, idx, 0)
        dense = s.form == "index-mask"
        for mask in s.masks:
            if dense:
                rows_t = [r for r in ("B", "S") if self.has(r)] + ["T"]
                m = self.expanded(mask.operand, rows_t, rows_t)
                g = b.method("gather", m, -1, safe)
            else:
                g = self.expanded(mask.operand, bsk, bsk)
            valid = self.fold_mask(valid, g, mask)
        if dense and not s.indices_unique:
            idx, valid = self.drop_duplicates(idx, valid, t_len)
        if kv_batched:
            batch = b.call(torch.arange, self.size("B"), device=self.device)
            offset = b.call(operator.mul, b.method("view", batch, -1, *([1] * (len(bsk) - 1))), t_len if pitch is None else pitch)
            idx = b.call(operator.add, idx, offset)
        idx = b.call(torch.where, valid, idx, -1)
        idx = b.method("to", idx, torch.int32)
        return b.method("reshape", idx, -1, 1, self.size("K"))

    def fold_mask(self, valid: torch.fx.Node, g: torch.fx.Node, mask) -> torch.fx.Node:
        b = self.b
        if mask.kind == "fill":
            return b.call(operator.and_, valid, b.call(operator.invert, g))
        if mask.kind == "keep":
            return b.call(operator.and_, valid, g)
        zero = b.call(operator.eq, g, 0)
        if mask.kind == "checked":
            neg_inf = b.call(operator.eq, g, -math.inf)
            ok = b.call(operator.or_, b.call(operator.or_, zero, neg_inf), b.call(operator.invert, valid))
            b.call(torch._assert_async, b.method("all", ok), checked_mask_message(mask.operand.node.name, self.site.source))
        return b.call(operator.and_, valid, zero)

    def drop_duplicates(self, idx, valid, t_len):
        """Sort each row; a repeat of the previous index is invalid, as a scatter mask collapses it."""
        b = self.b
        key = b.call(torch.where, valid, idx, t_len)
        ordered = b.call(operator.getitem, b.method("sort", key, -1), 0)
        first = b.call(operator.getitem, ordered, (Ellipsis, slice(None, 1)))
        repeat = b.call(
            operator.eq,
            b.call(operator.getitem, ordered, (Ellipsis, slice(1, None))),
            b.call(operator.getitem, ordered, (Ellipsis, slice(None, -1))),
        )
        repeat = b.call(torch.cat, [b.call(torch.zeros_like, first, dtype=torch.bool), repeat], -1)
        valid = b.call(operator.and_, b.call(operator.lt, ordered, t_len), b.call(operator.invert, repeat))
        return ordered, valid

    def to_user_layout(self, out: torch.fx.Node, rows: list[str]) -> torch.fx.Node:
        s, b = self.site, self.b
        out = b.method("reshape", out, *[self.size(r) for r in rows], s.dims.d_v)
        sizes = {"V": s.dims.d_v}
        current = rows + ["V"]
        wanted = [r for ax in s.output.axes for r in ax]
        if sorted(wanted) != sorted(current):
            raise RuntimeError(f"output roles {wanted} differ from the lowered roles {current}")
        perm = [current.index(r) for r in wanted]
        if perm != list(range(len(perm))):
            out = b.method("permute", out, *perm)
        shape = []
        for ax in s.output.axes:
            n: Any = 1
            for r in ax:
                n = self._mul(n, sizes[r] if r in sizes else self.size(r))
            shape.append(n)
        if len(shape) != len(wanted) or any(len(ax) != 1 for ax in s.output.axes):
            out = b.method("reshape", out, *shape)
        if fx_ops.meta_value(out).dtype != s.output_dtype:
            out = b.method("to", out, s.output_dtype)
        return out

    def _mul(self, a: Any, c: Any) -> Any:
        if isinstance(a, int) and isinstance(c, int):
            return a * c
        if isinstance(a, int) and a == 1:
            return c
        return self.b.call(operator.mul, a, c)


def _common_pitch(parts: list) -> Optional[int]:
    """The row pitch (in rows) shared by batched [B, T, width] operands whose rows are evenly
    spaced within and across batches, from their strides (static even where the key length is
    dynamic: a slice keeps its cache's strides); None when a stride or the batch size is dynamic,
    the batch is 1 (packed rows are a view then), an operand is not unit-stride along its width,
    or the operands are spaced differently (those are packed by a reshape instead). Row b * pitch
    + t of the 2-D view is then exactly element [b, t]. A stride-0 operand fits any pitch."""
    pitch = None
    for x in parts:
        if x is None:
            continue
        t = fx_ops.meta_value(x)
        strides = t.stride()
        if t.dim() != 3 or not all(isinstance(v, int) for v in (*strides, t.shape[0])) or t.shape[0] < 2:
            return None
        s_b, s_t, s_w = strides
        if s_b == 0 and s_t == 0:
            continue
        if (s_w != 1 and t.shape[2] != 1) or s_t <= 0 or s_b % s_t or (pitch is not None and s_b // s_t != pitch):
            return None
        pitch = s_b // s_t
    return pitch


def _rows_view(b: "_Builder", x: torch.fx.Node, n_rows: Any) -> torch.fx.Node:
    """[B, T, w] as the ``n_rows`` = (B - 1) * pitch + T rows it spans (a view)."""
    t = fx_ops.meta_value(x)
    return b.call(torch.as_strided, x, (n_rows, t.shape[2]), (t.stride(1), t.stride(2)))


def lower_site(gm: torch.fx.GraphModule, site: MatchedSite, replaced: Optional[dict] = None, fp8_mode: str = "none",
               fp8_products: int = 0) -> torch.fx.Node:
    """Rewrite one site in ``gm`` (the graph module that owns the site's nodes). All or nothing.

    ``replaced`` maps the outputs of sites lowered earlier to their replacements: a site matched
    before an earlier one was lowered may read that earlier output (stacked layers do). It is
    updated with this site's output. ``fp8_mode`` "preserve" sends an FP8 latent (``site.fp8``) to
    the FP8 op as payload and scale (with ``fp8_products``, the e4m3 terms of Q and P, asking it for
    the FP8-products kernel);
    otherwise the site reads the user's dequantized tensors."""
    replaced = {} if replaced is None else replaced
    site = _renamed(site, replaced)
    graph = site.output.node.graph
    lowering = _SiteLowering(site, graph, fp8_mode, fp8_products)
    try:
        replacement = lowering.run()
    except Exception:
        lowering.b.undo()
        raise
    site.output.node.replace_all_uses_with(replacement)
    replaced[site.output.node] = replacement
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(site.region, key=order.__getitem__, reverse=True):
        if not node.users:
            graph.erase_node(node)
    if fp8_mode == "preserve":
        _erase_unused(graph, [p.node for p in site.kv_parts] + [site.value.node])
    return replacement


# Dequantizing ops, beside fx_ops' pass-through kinds: a user's dequantized copy is made of these
# and is safe to drop once unused. Anything else (in-place forms, cache writes, other ops) stays.
_DEQUANT_METHODS = {"dequantize", "to_original_precision"}
_DEQUANT_FUNCTIONS = {torch.ops.sparse_mla.flashmla_kv_dequant, torch.ops.sparse_mla.flashmla_kv_dequant.default}


def _pure_value_step(node: torch.fx.Node) -> bool:
    if node.op == "call_method" and node.target in _DEQUANT_METHODS or node.op == "call_function" and node.target in _DEQUANT_FUNCTIONS:
        return True
    view = fx_ops.read(node)
    return view is not None and view.kind in fx_ops.PASS_THROUGH_KINDS and not view.inplace


def _erase_unused(graph: torch.fx.Graph, starts: list) -> None:
    """Drops the user's dequantized copy of an FP8 latent that the FP8 op made unused (with the
    eager inner compiler or in an exported program it would otherwise still run every call).
    Size reads of the copy (``kv.size(1)`` for a mask, kept symbolic) are first moved to the FP8
    bytes it was made from, where those extents are the same."""
    for start in starts:
        if isinstance(start, torch.fx.Node):
            _move_size_reads(start)
    stack = [n for n in starts if isinstance(n, torch.fx.Node)]
    erased: set = set()
    while stack:
        node = stack.pop()
        if node in erased or node.graph is not graph or node.users or not _pure_value_step(node):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased.add(node)
        stack.extend(inputs)


_SIZE_FUNCTIONS = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_size}


def _dims_read(read: torch.fx.Node, node: torch.fx.Node) -> Optional[list]:
    """Which dimensions of ``node`` a size read uses: ``[d]`` for ``node.size(d)`` / ``sym_size``,
    the indices of ``node.size()[i]`` when every use indexes it with a constant, ``None`` when the
    read is not one of these (or the whole size is used)."""
    if read.op == "call_function" and read.target in _SIZE_FUNCTIONS and len(read.args) == 2 and read.args[0] is node:
        return [read.args[1]] if isinstance(read.args[1], int) else None
    if read.op != "call_method" or read.target != "size" or read.args[:1] != (node,):
        return None
    dim = read.args[1] if len(read.args) > 1 else read.kwargs.get("dim")
    if dim is not None:
        return [dim] if isinstance(dim, int) else None
    uses = list(read.users)
    if uses and all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int) for u in uses):
        return [u.args[1] for u in uses]
    return None


def _extents(node: torch.fx.Node, dims: list) -> Optional[list]:
    value = fx_ops.meta_value(node)
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return [value.shape[d] for d in dims]
    except IndexError:
        return None


def _same_extent(a, b) -> bool:
    """Equal without adding a guard: equal ints, or SymInts of the same expression."""
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return isinstance(a, int) and isinstance(b, int) and a == b


def _shape_source(node: torch.fx.Node, dims: list) -> Optional[torch.fx.Node]:
    """A tensor input of the pure value step ``node`` with the same extents at ``dims`` (through a
    multi-output step such as FlashMLA's dequantization: its inputs), or None."""
    wanted = _extents(node, dims)
    if wanted is None:
        return None
    candidates = []
    for inp in node.all_input_nodes:
        if isinstance(fx_ops.meta_value(inp), (tuple, list)) and _pure_value_step(inp):
            candidates.extend(inp.all_input_nodes)
        else:
            candidates.append(inp)
    for cand in candidates:
        got = _extents(cand, dims)
        if got is not None and len(got) == len(wanted) and all(_same_extent(a, b) for a, b in zip(got, wanted)):
            return cand
    return None


def _move_size_reads(node: torch.fx.Node) -> None:
    """Points the size reads of ``node`` (a dequantized copy) at the earliest value up its chain of
    pure value steps with the same extents there, so the copy can become unused."""
    if not _pure_value_step(node):
        return
    for read in list(node.users):
        dims = _dims_read(read, node)
        if dims is None or any(not isinstance(d, int) for d in dims):
            continue
        if any(d < 0 for d in dims):
            continue  # negative dims may name different axes on inputs of another rank
        src, cur = None, node
        while _pure_value_step(cur):
            nxt = _shape_source(cur, dims)
            if nxt is None:
                break
            src, cur = nxt, nxt
        if src is not None:
            read.replace_input_with(node, src)
    for inp in node.all_input_nodes:
        if _pure_value_step(inp) and not isinstance(fx_ops.meta_value(inp), (tuple, list)):
            _move_size_reads(inp)


def _renamed(site: MatchedSite, replaced: dict) -> MatchedSite:
    if not replaced:
        return site
    fix = lambda n: replaced.get(n, n)  # noqa: E731
    op = lambda o: dataclasses.replace(o, node=fix(o.node))  # noqa: E731
    sizes = {r: dataclasses.replace(w, node=fix(w.node)) if w.node is not None else w for r, w in site.sizes.items()}
    return dataclasses.replace(
        site,
        q_parts=tuple(op(o) for o in site.q_parts),
        kv_parts=tuple(op(o) for o in site.kv_parts),
        value=op(site.value),
        indices=op(site.indices),
        masks=tuple(dataclasses.replace(m, operand=op(m.operand)) for m in site.masks),
        sizes=sizes,
        scale_factors=tuple((fix(n), e) for n, e in site.scale_factors),
        fp8=dataclasses.replace(site.fp8, source=fix(site.fp8.source), scale=fix(site.fp8.scale) if site.fp8.scale is not None else None) if site.fp8 else None,
    )


def sparse_attn_calls(gm: torch.fx.GraphModule) -> int:
    """Number of ``sparse_attn`` calls in ``gm`` and its submodules (for tests and reports)."""
    n = 0
    for mod in gm.modules():
        if isinstance(mod, torch.fx.GraphModule):
            n += sum(1 for node in mod.graph.nodes if node.op == "call_function" and node.target in (SPARSE_ATTN, torch.ops.sparse_mla.sparse_attn, SPARSE_ATTN_FP8, torch.ops.sparse_mla.sparse_attn_fp8kv))
    return n
