"""Capture the Dynamo graphs of a call, untouched, to run passes on them directly.

    graphs = capture_graphs(model, *inputs)            # one GraphModule per compiled frame
    results = find_sites(graphs[0])                    # MatchedSite / Rejection records

Used by the unit tests (passes on captured graphs, no compile) and handy for checking a model's
attention before compiling it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def capture_graphs(fn: Callable, *args: Any, dynamic: Any = None, **kwargs: Any) -> list[torch.fx.GraphModule]:
    """Run ``fn(*args, **kwargs)`` under ``torch.compile`` with a backend that only records graphs."""
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(gm)
        return gm.forward

    torch.compile(fn, backend=record, dynamic=dynamic)(*args, **kwargs)
    return graphs
