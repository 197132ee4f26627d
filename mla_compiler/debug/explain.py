"""``explain(model, *args, **kwargs)``: what the backend matched, rejected and chose, per graph.

Like ``torch._dynamo.explain``: it runs the model once through ``torch.compile`` with a
``sparse_mla`` backend whose inner compiler defaults to ``"eager"`` (no code generation, so it is
quick) and returns the reports the backend wrote. ``print(report)`` reads as a table.

Pass ``calls=[(args...), ...]`` to call the compiled model once per argument tuple (growing
sequence lengths, say): the report then lists every recompile with the guard that failed, which is
how to check that a model marked dynamic compiles once for all lengths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
import re
from typing import Any, Callable, Optional, Sequence, Union

import torch

from mla_compiler.backend import make_backend
from mla_compiler.errors import BackendOptionError
from mla_compiler.artifacts.text import format_report
from mla_compiler.sites import CompileReport, RejectionReport, SiteReport


@dataclass
class ExplainReport:
    graphs: list[CompileReport] = field(default_factory=list)
    recompile_reasons: list[str] = field(default_factory=list)

    @property
    def recompiles(self) -> int:
        """Graphs compiled for a frame that already had one (Dynamo's compile id ``frame/n``, n > 0)."""
        return sum(1 for g in self.graphs if recompile_index(g.compile_id) > 0)

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
        return {
            "graphs": [g.as_dict() for g in self.graphs],
            "recompiles": self.recompiles,
            "recompile_reasons": list(self.recompile_reasons),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def __str__(self) -> str:
        return format_report(self.graphs, self.recompiles, self.recompile_reasons)


def explain(
    model: Union[torch.nn.Module, Callable],
    *args: Any,
    inner: Union[str, Callable] = "eager",
    dynamic: Any = None,
    calls: Optional[Sequence[tuple]] = None,
    backend_options: Optional[dict] = None,
    **kwargs: Any,
) -> ExplainReport:
    """Compile ``model`` with the sparse_mla backend, call it on ``args``/``kwargs``, and report.

    ``inner`` is the compiler behind the rewrite ("eager" by default; "inductor" to see the real
    compile). ``calls`` adds more calls (each a tuple of positional arguments, after the first
    call) so recompiles between them are reported. ``backend_options`` are further
    ``make_backend`` options (``fp8``, ``fp8_products``, ...; not ``inner`` or ``on_report``). The
    model runs for real, so pass inputs it accepts.
    """
    from torch._dynamo.utils import guard_failures

    graphs: list[CompileReport] = []
    seen = {code: len(reasons) for code, reasons in guard_failures.items()}
    options = dict(backend_options or {})
    taken = sorted({"inner", "on_report"} & set(options))
    if taken:
        raise BackendOptionError(f"explain: backend_options {taken} are explain's own; pass inner= directly (on_report is how explain reads the reports)")
    compiled = torch.compile(model, backend=make_backend(inner=inner, on_report=graphs.append, **options), dynamic=dynamic)
    compiled(*args, **kwargs)
    for more in calls or ():
        compiled(*more)
    reasons = [r for code, rs in guard_failures.items() for r in rs[seen.get(code, 0):]]
    return ExplainReport(graphs=final_attempts(graphs), recompile_reasons=reasons)


_COMPILE_ID = re.compile(r"(\d+)/(\d+)")


def recompile_index(compile_id: str) -> int:
    """The ``n`` of Dynamo's compile id ``frame/n`` (0 for a frame's first graph; -1 if unknown)."""
    found = _COMPILE_ID.findall(compile_id)
    return int(found[-1][1]) if found else -1


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
