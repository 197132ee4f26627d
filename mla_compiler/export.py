"""``rewrite(model, *example_inputs)``: the model as one FX graph whose MLA sites call the canonical op.

For export and inspection. Dynamo captures the whole model in one graph (``torch._dynamo.export``:
a graph break is an error here, not a split), the backend's passes match and lower every site, and
the result is a ``torch.fx.GraphModule`` callable like the model. ``torch.export.export`` of it keeps
one ``sparse_mla.sparse_attn`` node per site (the op's fake kernel traces it), and the exported
program runs and packages with AOTInductor in a Python process (the op's kernels are Python).
"""

from __future__ import annotations

from typing import Any, Callable, Union

import torch

from mla_compiler.backend import make_backend
from mla_compiler.sites import CompileReport

REPORT_ATTR = "sparse_mla_report"


def rewrite(model: Union[torch.nn.Module, Callable], *example_inputs: Any, fp8: str = "preserve", fp8_products: Union[bool, str] = False,
            **example_kwargs: Any) -> torch.fx.GraphModule:
    """Capture ``model`` on the example inputs and lower its MLA sites to ``torch.ops.sparse_mla``.

    Returns a GraphModule taking the model's arguments. Its ``sparse_mla_report`` attribute is the
    ``CompileReport`` (sites, rejections with reasons, near misses). Lengths stay symbolic where
    Dynamo keeps them so; widths are specialized (they shape the kernel). A pass or lowering that
    fails raises here (there is no plain graph to fall back to that the caller asked for).
    ``fp8`` is the backend's FP8 policy ("preserve" or "dequantize"), ``fp8_products`` its
    choice of the FP8-products kernel for the sites that stay FP8 (see ``BackendOptions``).
    """
    captured, _guards = torch._dynamo.export(model)(*example_inputs, **example_kwargs)
    backend = make_backend(strict=True, fp8=fp8, fp8_products=fp8_products)
    report = CompileReport(compile_id="rewrite", inner="none")
    rewritten = backend.rewrite_graph(captured, report)
    setattr(rewritten, REPORT_ATTR, report)
    return rewritten
