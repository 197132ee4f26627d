"""The ``sparse_mla`` torch.compile backend: inspect -> match -> lower -> inner compiler.

This is the only module that knows the order of the stages. The entry point
``torch_dynamo_backends: sparse_mla`` names the plain function ``sparse_mla`` below; nothing here
calls ``register_backend``, so loading the entry point cannot register the name twice.

The rewrite runs on the Dynamo graph, before AOTAutograd: it sees torch-level ops and tensor
subclasses, works for training and inference and under ``dynamic=True``, and AOTAutograd then traces
the canonical op's registered backward.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.fx
from torch._dynamo.utils import counters

from mla_compiler.errors import BackendOptionError, SiteLoweringError
from mla_compiler.lowering.dispatch import Problem, choose_kernel
from mla_compiler.lowering.rewrite import lower_site
from mla_compiler.passes.inputs import describe_inputs
from mla_compiler.passes.mla_match import find_sites
from mla_compiler.passes.axes import static_int
from mla_compiler.sites import CompileReport, MatchedSite, Rejection, RejectionReport, SiteReport

log = logging.getLogger("mla_compiler")

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
COUNTER = "sparse_mla"


@dataclass(frozen=True)
class BackendOptions:
    """Options of ``make_backend``.

    inner:     what compiles the rewritten graph: "inductor" (default), "aot_eager" (AOTAutograd,
               no code generation: fast, for tests), "eager" (run the rewritten graph as is), or a
               callable ``(gm, example_inputs) -> callable``.
    strict:    raise when a pass or a lowering fails instead of compiling the graph unchanged.
    on_report: called with each graph's ``CompileReport`` (``explain`` uses it).
    """

    inner: Union[str, Callable] = "inductor"
    strict: bool = False
    on_report: Optional[Callable[[CompileReport], None]] = None


def _validate(options: dict) -> BackendOptions:
    known = {f for f in BackendOptions.__dataclass_fields__}
    unknown = sorted(set(options) - known)
    if unknown:
        raise BackendOptionError(f"make_backend: unknown option(s) {', '.join(unknown)}; known options are {', '.join(sorted(known))}")
    opts = BackendOptions(**options)
    if not callable(opts.inner) and opts.inner not in INNER_COMPILERS:
        raise BackendOptionError(f"make_backend: inner={opts.inner!r}; use one of {', '.join(INNER_COMPILERS)} or a callable (gm, example_inputs) -> callable")
    if not isinstance(opts.strict, bool):
        raise BackendOptionError(f"make_backend: strict={opts.strict!r}; use True or False")
    return opts


def _compile_id() -> tuple[str, int]:
    """(frame/recompile id, attempt). Dynamo retries a frame (a new attempt) when tracing our op
    specializes a symbolic float; the retry replaces the earlier attempt's graph."""
    try:
        from torch._guards import CompileContext

        ctx = CompileContext.try_get()
        if ctx is None or ctx.compile_id is None:
            return "?", 0
        return str(ctx.compile_id), int(ctx.attempt)
    except Exception:  # noqa: BLE001 - outside a Dynamo compile there is no id
        return "?", 0


def _problem(site: MatchedSite) -> Problem:
    device = site.q_parts[0].node.meta["example_value"].device
    topk = static_int(site.sizes["K"].static) if site.sizes["K"].static is not None else -1
    return Problem(device.type, site.compute_dtype, site.dims.d_qk, site.dims.d_v, site.dims.heads, site.dims.h_kv, topk)


class SparseMLABackend:
    """A configured backend: ``torch.compile(model, backend=make_backend(...))``."""

    def __init__(self, options: BackendOptions) -> None:
        self.options = options
        # Counts booked per compile id, taken back when Dynamo retries the same frame.
        self._booked: dict[str, dict[str, int]] = {}

    def __repr__(self) -> str:
        return f"SparseMLABackend({self.options})"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        compile_id, attempt = _compile_id()
        report = CompileReport(compile_id=compile_id, attempt=attempt, inner=self._inner_name())
        self._unbook(compile_id)
        try:
            report.inputs = describe_inputs(gm)
            # Rewrite a copy: if anything fails, the user's graph is compiled exactly as captured.
            rewritten = copy_for_rewrite(gm)
            self._rewrite(rewritten, report)
            gm = rewritten
        except SiteLoweringError:
            raise
        except Exception as exc:  # noqa: BLE001 - a pass bug must not break the user's program
            if self.options.strict:
                raise
            counters[COUNTER]["pass_failed"] += 1
            report.sites.clear()
            report.failures.append(f"{type(exc).__name__}: {exc}")
            log.warning("sparse_mla: a pass failed (%s: %s); compiling graph %s unchanged", type(exc).__name__, exc, report.compile_id)
        self._book(report)
        if self.options.on_report is not None:
            self.options.on_report(report)
        return self._inner(gm, example_inputs)

    def _book(self, report: CompileReport) -> None:
        booked = {"matched": len(report.sites), "rejected": len(report.rejections)}
        for key, n in booked.items():
            if n:
                counters[COUNTER][key] += n
        if report.compile_id != "?":
            self._booked[report.compile_id] = booked

    def _unbook(self, compile_id: str) -> None:
        for key, n in self._booked.pop(compile_id, {}).items():
            if n:
                counters[COUNTER][key] -= n

    def _rewrite(self, gm: torch.fx.GraphModule, report: CompileReport) -> None:
        results = find_sites(gm)
        touched = set()
        replaced: dict = {}  # a lowered site's output node -> its replacement (later sites may read it)
        for result in results:
            if isinstance(result, Rejection):
                report.rejections.append(RejectionReport(result.graph_name, result.source, result.check, result.reason))
                continue
            site: MatchedSite = result
            owner = gm.get_submodule(site.graph_name) if site.graph_name else gm
            choice = choose_kernel(_problem(site))
            try:
                lower_site(owner, site, replaced)
            except Exception as exc:  # noqa: BLE001 - one site failing leaves the others lowered
                if self.options.strict:
                    raise SiteLoweringError(f"lowering the site at {site.source} failed: {exc}") from exc
                counters[COUNTER]["lowering_failed"] += 1
                report.failures.append(f"site at {site.source}: {type(exc).__name__}: {exc}")
                log.warning("sparse_mla: lowering the site at %s failed (%s); it stays as written", site.source, exc)
                continue
            touched.add(owner)
            report.sites.append(
                SiteReport(
                    index=len(report.sites),
                    graph_name=site.graph_name,
                    source=site.source,
                    form=site.form,
                    dims=site.dims.describe(),
                    scale=site.scale_text,
                    kernel=choice.name,
                    kernel_reason=choice.reason,
                    masks=[f"{m.kind}: {m.description}" for m in site.masks],
                    notes=list(site.notes),
                    storage={},
                )
            )
        for mod in touched:
            mod.graph.lint()
            mod.recompile()

    def _inner_name(self) -> str:
        return self.options.inner if isinstance(self.options.inner, str) else getattr(self.options.inner, "__name__", "callable")

    def _inner(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        inner = self.options.inner
        if callable(inner):
            return inner(gm, example_inputs)
        if inner == "eager":
            return gm.forward
        if inner == "aot_eager":
            from torch._dynamo.backends.debugging import aot_eager

            return aot_eager(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)


def copy_for_rewrite(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule with copied graphs (its own and its higher-order-op bodies) sharing parameters,
    buffers and node metadata with ``gm``: rewriting it leaves ``gm`` as captured."""
    new = torch.fx.GraphModule(gm, _copy_graph(gm.graph), class_name=type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    for attr in ("_param_name_to_source", "_source_to_user_stacks", "compile_subgraph_reason"):
        if hasattr(gm, attr):
            setattr(new, attr, getattr(gm, attr))
    for name, child in gm.named_children():
        if isinstance(child, torch.fx.GraphModule):
            setattr(new, name, copy_for_rewrite(child))
    return new


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    val_map: dict = {}
    new = torch.fx.Graph(tracer_cls=graph._tracer_cls)
    out, old_output = new.graph_copy(graph, val_map=val_map, return_output_node=True)
    new._codegen = copy.deepcopy(graph._codegen)
    new_output = new.output(out, type_expr=getattr(old_output, "type", None))
    new_output.meta = copy.copy(old_output.meta)
    for old, node in val_map.items():
        # Dynamo hangs the input's source on placeholders as a plain attribute.
        for attr, value in vars(old).items():
            if attr.startswith("_dynamo"):
                setattr(node, attr, value)
    return new


def make_backend(**options: Any) -> SparseMLABackend:
    """A ``sparse_mla`` backend with options (see ``BackendOptions``)."""
    return SparseMLABackend(_validate(options))


_default: Optional[SparseMLABackend] = None


def sparse_mla(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """The backend behind ``torch.compile(model, backend="sparse_mla")`` (default options)."""
    global _default
    if _default is None:
        _default = make_backend()
    return _default(gm, example_inputs)
