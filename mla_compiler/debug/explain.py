"""``explain(model, *args, **kwargs)``: what the backend matched, rejected and chose, per graph.

Like ``torch._dynamo.explain``: it runs the model once through ``torch.compile`` with a
``sparse_mla`` backend whose inner compiler defaults to ``"eager"`` (no code generation, so it is
quick) and returns the reports the backend wrote. ``print(report)`` reads as a table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch

from mla_compiler.backend import make_backend
from mla_compiler.artifacts.text import format_report
from mla_compiler.sites import CompileReport, RejectionReport, SiteReport


@dataclass
class ExplainReport:
    graphs: list[CompileReport] = field(default_factory=list)
    recompiles: int = 0

    @property
    def sites(self) -> list[SiteReport]:
        return [s for g in self.graphs for s in g.sites]

    @property
    def rejections(self) -> list[RejectionReport]:
        return [r for g in self.graphs for r in g.rejections]

    @property
    def failures(self) -> list[str]:
        return [f for g in self.graphs for f in g.failures]

    def as_dict(self) -> dict:
        return {"graphs": [g.as_dict() for g in self.graphs], "recompiles": self.recompiles}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def __str__(self) -> str:
        return format_report(self.graphs, self.recompiles)


def explain(model: Union[torch.nn.Module, Callable], *args: Any, inner: Union[str, Callable] = "eager", dynamic: Any = None, **kwargs: Any) -> ExplainReport:
    """Compile ``model`` with the sparse_mla backend, call it once on ``args``/``kwargs``, and report.

    ``inner`` is the compiler behind the rewrite ("eager" by default; "inductor" to see the real
    compile). The model runs for real, so pass inputs it accepts.
    """
    from torch._dynamo.utils import counters

    graphs: list[CompileReport] = []
    before = sum(counters["recompiles"].values()) if "recompiles" in counters else 0
    compiled = torch.compile(model, backend=make_backend(inner=inner, on_report=graphs.append), dynamic=dynamic)
    compiled(*args, **kwargs)
    after = sum(counters["recompiles"].values()) if "recompiles" in counters else 0
    return ExplainReport(graphs=final_attempts(graphs), recompiles=after - before)


def final_attempts(graphs: list[CompileReport]) -> list[CompileReport]:
    """Drop reports of attempts Dynamo retried (same compile id, later attempt wins)."""
    last: dict[str, CompileReport] = {}
    order: list[str] = []
    for g in graphs:
        key = g.compile_id if g.compile_id != "?" else f"?{len(order)}"
        if key not in last:
            order.append(key)
        last[key] = g
    return [last[k] for k in order]
