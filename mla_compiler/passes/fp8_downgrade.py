"""FP8 storage turned into bf16/fp32 right before a matmul or attention, in the user's own graph.

Run on the graph after lowering: what is left is a dequantize the compiler could not remove. A
dequantize (``t.dequantize()`` of an FP8 subclass, ``payload.float()`` of a float8 tensor,
``flashmla_kv_dequant``) whose result reaches a product within a few hops is reported with its
source line: that product runs in bf16 and reads the dequantized copy, not the FP8 bytes.
"""

from __future__ import annotations

import torch
import torch.fx

from mla_compiler.passes import fx_ops
from mla_compiler.passes.fp8_source import _float8, _is_op
from mla_compiler.passes.storage import is_fp8, storage_facts
from mla_compiler.sites import NearMiss

_PRODUCTS = ("einsum", "matmul", "sdpa")
_LINEAR = {torch.nn.functional.linear, torch._C._nn.linear, torch.mm, torch.addmm, torch.bmm}


def _consumer(node: torch.fx.Node, hops: int = 8):
    frontier = [node]
    seen = {node}
    for _ in range(hops):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                if fx_ops.kind_of(u) in _PRODUCTS or (u.op == "call_function" and (u.target in _LINEAR or _is_op(u, "sparse_attn"))):
                    return u
                if fx_ops.kind_of(u) in fx_ops.PASS_THROUGH_KINDS or (u.op == "call_method" and u.target == "narrow"):
                    nxt.append(u)
        frontier = nxt
    return None


def _dequantized(node: torch.fx.Node):
    """(the FP8 storage, its description) when ``node`` makes a wide copy of FP8 storage."""
    if node.op == "call_method" and node.target == "dequantize" and isinstance(node.args[0], torch.fx.Node):
        facts = storage_facts(fx_ops.meta_value(node.args[0]))
        return (node.args[0], facts.describe()) if is_fp8(facts) else None
    if fx_ops.kind_of(node) == "to_dtype" and isinstance(node.args[0], torch.fx.Node) and _float8(node.args[0]):
        out = fx_ops.meta_tensor(node)
        if out is not None and out.dtype.is_floating_point and out.dtype.itemsize > 1:
            return node.args[0], f"float8 payload {node.args[0].name} converted to {str(out.dtype).replace('torch.', '')}"
    if _is_op(node, "flashmla_kv_dequant"):
        return node.args[0], "FlashMLA FP8 KV cache (656 B/token) dequantized to bf16"
    return None


def find_downgrades(gm: torch.fx.GraphModule, graph_name: str = "") -> list[NearMiss]:
    found = []
    for node in gm.graph.nodes:
        hit = _dequantized(node)
        if hit is None:
            continue
        consumer = _consumer(node)
        if consumer is None:
            continue
        what = "the sparse_mla op (fp8='dequantize' fallback)" if _is_op(consumer, "sparse_attn") else f"{consumer.name} ({fx_ops.source_line(consumer)})"
        found.append(NearMiss(node, graph_name, fx_ops.source_line(node), f"FP8 downgrade: {hit[1]} feeds {what}; it runs in bf16 on a dequantized copy"))
    return found
