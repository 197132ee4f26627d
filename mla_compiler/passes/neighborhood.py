"""The nodes around a site or a rejected candidate, as plain data a page can draw.

A matched site: the nodes it replaces (highlighted), the tensors it reads, the softmax anchor.
A rejected candidate: the softmax with a few producers and users around it.
"""

from __future__ import annotations

from typing import Iterable

import torch.fx

from mla_compiler.passes import fx_ops
from mla_compiler.sites import MatchedSite, Rejection

MAX_NODES = 48


def _describe(node: torch.fx.Node, role: str) -> dict:
    view = fx_ops.read(node)
    label = view.kind if view else (node.op if node.op in ("placeholder", "get_attr") else getattr(node.target, "__name__", str(node.target)))
    t = fx_ops.meta_tensor(node)
    return {
        "id": node.name,
        "label": label,
        "shape": "[" + ", ".join(str(s) for s in t.shape) + "]" if t is not None else "",
        "dtype": str(t.dtype).replace("torch.", "") if t is not None else "",
        "role": role,
        "source": fx_ops.source_line(node),
    }


def _drawing(roles: dict) -> dict:
    nodes = list(roles)[:MAX_NODES]
    keep = set(nodes)
    edges = [[a.name, n.name] for n in nodes for a in n.all_input_nodes if a in keep]
    return {"nodes": [_describe(n, roles[n]) for n in nodes], "edges": edges}


def _ordered(nodes: Iterable[torch.fx.Node]) -> list:
    nodes = list(nodes)
    if not nodes:
        return nodes
    order = {n: i for i, n in enumerate(nodes[0].graph.nodes)}
    return sorted(nodes, key=lambda n: order.get(n, 0))


def site_drawing(site: MatchedSite) -> dict:
    roles: dict = {}
    operands = [("q", p.node) for p in site.q_parts] + [("kv", p.node) for p in site.kv_parts]
    operands += [("indices", site.indices.node)] + [("mask", m.operand.node) for m in site.masks]
    for n in _ordered(list(site.region) + [o for _, o in operands]):
        roles[n] = "matched" if n in site.region else "operand"
    roles[site.anchor] = "anchor"
    return _drawing({n: roles[n] for n in _ordered(roles)})


def rejection_drawing(rejection: Rejection, up: int = 4, down: int = 2) -> dict:
    anchor = rejection.anchor
    picked = {anchor}
    frontier = [anchor]
    for _ in range(up):
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in picked]
        picked.update(frontier)
    frontier = [anchor]
    for _ in range(down):
        frontier = [u for n in frontier for u in n.users if u not in picked and u.op != "output"]
        picked.update(frontier)
        # what the anchor's users combine it with (the value of a weighted sum, say)
        picked.update(a for u in frontier for a in u.all_input_nodes)
    roles = {n: ("rejected" if n is anchor else "context") for n in _ordered(picked)}
    return _drawing(roles)
