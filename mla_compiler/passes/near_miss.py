"""Attention-like clusters no rule claimed: what a user may have meant to be matched.

The matcher anchors on ``softmax``. This pass lists what it cannot see: a softmax written by hand
(``exp`` of scores, divided by a ``sum``), ``log_softmax`` between two products, and fused
``scaled_dot_product_attention`` calls (dense attention, nothing to sparsify). Each comes with its
source line and what to change for the matcher to take it.
"""

from __future__ import annotations

import torch.fx

from mla_compiler.passes import fx_ops
from mla_compiler.sites import NearMiss

CONTRACTIONS = ("einsum", "matmul")


def _near(node: torch.fx.Node, kinds: tuple, forward: bool, hops: int) -> bool:
    frontier = [node]
    seen = {node}
    for _ in range(hops):
        nxt = []
        for n in frontier:
            neighbours = list(n.users) if forward else [a for a in n.all_input_nodes]
            for m in neighbours:
                if m in seen:
                    continue
                seen.add(m)
                if fx_ops.kind_of(m) in kinds:
                    return True
                nxt.append(m)
        frontier = nxt
    return False


def find_near_misses(gm: torch.fx.GraphModule, graph_name: str = "") -> list[NearMiss]:
    out: list[NearMiss] = []
    for node in gm.graph.nodes:
        kind = fx_ops.kind_of(node)
        if kind == "exp" and _near(node, CONTRACTIONS, False, 5) and _near(node, CONTRACTIONS, True, 5) and _near(node, ("sum",), True, 3):
            out.append(NearMiss(node, graph_name, fx_ops.source_line(node), "a softmax written by hand (exp of scores, divided by a sum) between two products; write torch.softmax (or x.softmax(dim)) for the matcher to anchor on it"))
        elif kind == "log_softmax" and _near(node, CONTRACTIONS, False, 5):
            out.append(NearMiss(node, graph_name, fx_ops.source_line(node), "log_softmax over scores: only a softmax whose probabilities feed a weighted sum is attention"))
        elif kind == "sdpa":
            out.append(NearMiss(node, graph_name, fx_ops.source_line(node), "scaled_dot_product_attention: already a fused dense attention; sparse MLA needs the latent form with a top-k selection"))
    return out
