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
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.fx
from torch._dynamo.utils import counters

from mla_compiler.artifacts.page import render_index
from mla_compiler.artifacts.text import format_inputs, format_report
from mla_compiler.artifacts.writer import CompileDump, OutputCodeCapture, readable
from mla_compiler.errors import BackendOptionError, FP8DispatchError, SiteLoweringError
from mla_compiler.lowering.dispatch import PRODUCT_TERMS, PRODUCT_TERMS_TEXT, Problem, choose_kernel
from mla_compiler.lowering.rewrite import lower_site
from mla_compiler.passes.inputs import describe_fp8_values, describe_inputs
from mla_compiler.passes.axes import static_int
from mla_compiler.passes.mla_match import find_sites
from mla_compiler.passes.fp8_downgrade import find_downgrades
from mla_compiler.passes.near_miss import find_near_misses
from mla_compiler.passes.neighborhood import rejection_drawing, site_drawing
from mla_compiler.passes.storage import storage_facts
from mla_compiler.sites import CompileReport, MatchedSite, NearMissReport, Rejection, RejectionReport, SiteReport

log = logging.getLogger("mla_compiler")

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
FP8_POLICIES = ("preserve", "dequantize")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COUNTER = "sparse_mla"
ENV_DUMP = "MLA_COMPILER_DUMP"
_dump_announced = False
_fp8_warned: set = set()


@dataclass(frozen=True)
class BackendOptions:
    """Options of ``make_backend``.

    inner:     what compiles the rewritten graph: "inductor" (default), "aot_eager" (AOTAutograd,
               no code generation: fast, for tests), "eager" (run the rewritten graph as is), or a
               callable ``(gm, example_inputs) -> callable``.
    strict:    raise when a pass or a lowering fails instead of compiling the graph unchanged.
    on_report: called with each graph's ``CompileReport`` (``explain`` uses it).
    fp8:       "preserve" (default): a site whose key latent is FP8 storage runs the FP8 kernel on
               payload + scale; a layout no FP8 kernel takes raises ``FP8DispatchError``.
               "dequantize": such a site (only) may run the bf16 kernels on the dequantized copy
               instead (warned once per site, counted as ``fp8_dequantized``); the others still
               run the FP8 kernel.
    fp8_products: the sites that stay FP8 ask for the FP8-products kernel (Hopper, DeepSeek
               widths, one scale a key row, 64 heads or more): Q K^T and P V as e4m3 tensor-core
               products. True: Q and P rounded to e4m3, about 1.7x the default FP8 kernel's
               speed at the V3.2 decode shape with about 1.4x its error against bf16 keys.
               "two_term": Q and P each as two e4m3 terms (the value and its rounding
               residual), about 1.2x the default FP8 kernel's speed with its error against bf16
               keys (benchmarks/RESULTS.md). Where it does not apply the default FP8 kernel runs
               (on a CUDA device ``triton_sparse_mla.FP8_MMA_DECLINED`` says why; CPU tensors
               take the reference). MLA_COMPILER_FP8_MMA=0 switches it off. Default False.
    mode:      Inductor's mode, as ``torch.compile(mode=...)`` takes it for the inductor backend:
               "reduce-overhead" captures the compiled graphs in CUDA graphs, "max-autotune" ...
    dump_dir:  write what each compile saw, matched, rejected and ran under this folder (see
               artifacts/writer.py); ``MLA_COMPILER_DUMP`` sets it for every backend. While
               dumping, Inductor's caches are off, so every pass really runs.
    """

    inner: Union[str, Callable] = "inductor"
    strict: bool = False
    on_report: Optional[Callable[[CompileReport], None]] = None
    dump_dir: Optional[str] = None
    fp8: str = "preserve"
    fp8_products: Union[bool, int, str] = False
    mode: Optional[str] = None

    def product_terms(self) -> int:
        """``fp8_products`` as the e4m3 terms of Q and P asked for (0: the FP8-products kernel is not)."""
        return PRODUCT_TERMS[self.fp8_products]


def _validate(options: dict) -> BackendOptions:
    known = {f for f in BackendOptions.__dataclass_fields__}
    unknown = sorted(set(options) - known)
    if unknown:
        raise BackendOptionError(f"make_backend: unknown option(s) {', '.join(unknown)}; known options are {', '.join(sorted(known))}")
    opts = BackendOptions(**options)
    if not callable(opts.inner) and opts.inner not in INNER_COMPILERS:
        raise BackendOptionError(f"make_backend: inner={opts.inner!r}; use one of {', '.join(INNER_COMPILERS)} or a callable (gm, example_inputs) -> callable")
    if opts.mode is not None and opts.mode not in MODES:
        raise BackendOptionError(f"make_backend: mode={opts.mode!r}; use one of {', '.join(MODES)}")
    if opts.fp8 not in FP8_POLICIES:
        raise BackendOptionError(f"make_backend: fp8={opts.fp8!r}; use one of {', '.join(FP8_POLICIES)}")
    if not isinstance(opts.strict, bool):
        raise BackendOptionError(f"make_backend: strict={opts.strict!r}; use True or False")
    if not isinstance(opts.fp8_products, (bool, int, str)) or opts.fp8_products not in PRODUCT_TERMS:
        raise BackendOptionError(f"make_backend: fp8_products={opts.fp8_products!r}; use False, True (e4m3 Q and P) or "
                                 "'two_term' (Q and P as two e4m3 terms each), or 0, 1, 2 as the op takes them")
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


def _problem(site: MatchedSite, fp8_mode: str = "none", fp8_products: int = 0) -> Problem:
    device = site.q_parts[0].node.meta["example_value"].device
    topk = static_int(site.sizes["K"].static) if site.sizes["K"].static is not None else -1
    layout = None
    if fp8_mode == "preserve":
        d = site.dims.d_parts
        layout = (d[0], d[1] if len(d) > 1 else 0, site.fp8.n_tiles)
    return Problem(device.type, site.compute_dtype, site.dims.d_qk, site.dims.d_v, site.dims.heads, site.dims.h_kv, topk, layout,
                   fp8_products if layout is not None else 0)


def _requires_grad(node: torch.fx.Node) -> bool:
    value = node.meta.get("example_value")
    return isinstance(value, torch.Tensor) and value.requires_grad


class SparseMLABackend:
    """A configured backend: ``torch.compile(model, backend=make_backend(...))``."""

    def __init__(self, options: BackendOptions) -> None:
        self.options = options
        # Counts booked per compile id, taken back when Dynamo retries the same frame.
        self._booked: dict[str, tuple] = {}

    def __repr__(self) -> str:
        return f"SparseMLABackend({self.options})"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        compile_id, attempt = _compile_id()
        report = CompileReport(compile_id=compile_id, attempt=attempt, inner=self._inner_name())
        self._unbook(compile_id)
        dump = self._open_dump(compile_id, attempt, report)
        drawings: dict = {"sites": [], "rejections": []}
        try:
            rewritten = self.rewrite_graph(gm, report, drawings if dump else None)
            if dump:
                dump.pass_diff(1, "lower", readable(gm), readable(rewritten))
            gm = rewritten
        except (SiteLoweringError, FP8DispatchError):
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
        if dump:
            self._close_dump(dump, report, drawings)
        return self._inner(gm, example_inputs, dumping=dump is not None, dump=dump)

    def rewrite_graph(self, gm: torch.fx.GraphModule, report: CompileReport, drawings: Optional[dict] = None) -> torch.fx.GraphModule:
        """Match and lower every site of a Dynamo graph; fill ``report``. The rewrite is done on a
        copy: if anything fails, ``gm`` is still the graph as captured."""
        report.inputs = describe_inputs(gm)
        report.fp8_values = describe_fp8_values(gm)
        rewritten = copy_for_rewrite(gm)
        self._rewrite(rewritten, report, drawings)
        report.near_misses = [NearMissReport(n.graph_name, n.source, n.reason) for n in find_near_misses(rewritten)]
        report.fp8_downgrades = [NearMissReport(n.graph_name, n.source, n.reason) for n in find_downgrades(rewritten)]
        return rewritten

    def _dump_root(self) -> Optional[str]:
        return self.options.dump_dir or os.environ.get(ENV_DUMP) or None

    def _open_dump(self, compile_id: str, attempt: int, report: CompileReport):
        root = self._dump_root()
        if not root:
            return None
        global _dump_announced
        if not _dump_announced:
            _dump_announced = True
            print(f"sparse_mla: dumping to {root}; Inductor's compile caches are off so every pass runs", file=sys.stderr)
        dump = CompileDump(root, compile_id, attempt)
        report.dump_folder = dump.folder
        OutputCodeCapture.install().by_compile[compile_id] = dump
        return dump

    def _close_dump(self, dump, report: CompileReport, drawings: dict) -> None:
        dump.json("inputs.json", report.inputs)
        dump.text("inputs.txt", format_inputs(report.inputs))
        dump.json("report.json", report.as_dict())
        dump.text("report.txt", format_report([report]) + "\n")
        dump.json("drawings.json", drawings)
        render_index(dump.root)

    def _book(self, report: CompileReport) -> None:
        booked = {
            "matched": len(report.sites),
            "rejected": len(report.rejections),
            "fp8_preserved": sum(1 for s in report.sites if s.fp8.startswith("preserved")),
            "fp8_dequantized": sum(1 for s in report.sites if s.fp8.startswith("dequantized")),
        }
        for key, n in booked.items():
            if n:
                counters[COUNTER][key] += n
        if report.compile_id != "?":
            # With the counter object booked into: after torch._dynamo.reset() or counters.clear()
            # compile ids start again, and a new compile must not take back counts already gone.
            self._booked[report.compile_id] = (counters[COUNTER], booked)

    def _unbook(self, compile_id: str) -> None:
        into, booked = self._booked.pop(compile_id, (None, {}))
        if into is not counters[COUNTER]:
            return
        for key, n in booked.items():
            if n:
                counters[COUNTER][key] -= n

    def _rewrite(self, gm: torch.fx.GraphModule, report: CompileReport, drawings: Optional[dict] = None) -> None:
        if drawings is not None and report.dump_folder:
            from mla_compiler.artifacts.writer import readable as _readable

            with open(os.path.join(report.dump_folder, "graph_dynamo.py"), "w") as f:
                f.write(_readable(gm))
        results = find_sites(gm)
        touched = set()
        replaced: dict = {}  # a lowered site's output node -> its replacement (later sites may read it)
        for result in results:
            if isinstance(result, Rejection):
                report.rejections.append(RejectionReport(result.graph_name, result.source, result.check, result.reason))
                if drawings is not None:
                    drawings["rejections"].append(rejection_drawing(result))
                continue
            site: MatchedSite = result
            owner = gm.get_submodule(site.graph_name) if site.graph_name else gm
            fp8_mode, fp8_text = self._fp8_policy(site)
            choice = choose_kernel(_problem(site, fp8_mode, self.options.product_terms()))
            drawing = site_drawing(site) if drawings is not None else None
            storage = {f"{role}{i}": storage_facts(p.node.meta.get("example_value")) for role, parts in (("q", site.q_parts), ("kv", site.kv_parts)) for i, p in enumerate(parts)}
            if site.fp8 is not None:
                storage["kv0"] = site.fp8.facts
            try:
                lower_site(owner, site, replaced, fp8_mode, self.options.product_terms())
            except Exception as exc:  # noqa: BLE001 - one site failing leaves the others lowered
                if self.options.strict:
                    raise SiteLoweringError(f"lowering the site at {site.source} failed: {exc}") from exc
                counters[COUNTER]["lowering_failed"] += 1
                report.failures.append(f"site at {site.source}: {type(exc).__name__}: {exc}")
                log.warning("sparse_mla: lowering the site at %s failed (%s); it stays as written", site.source, exc)
                continue
            touched.add(owner)
            if drawing is not None:
                drawings["sites"].append(drawing)
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
                    storage={k: v.describe() for k, v in storage.items()},
                    fp8=fp8_text,
                )
            )
        for mod in touched:
            mod.graph.lint()
            mod.recompile()

    def _fp8_policy(self, site: MatchedSite) -> tuple[str, str]:
        """("preserve" | "dequantize" | "none", what the report says about FP8 for this site)."""
        f = site.fp8
        if f is None:
            return "none", "no FP8 inputs"
        why = f.unsupported
        if why is None and any(_requires_grad(p.node) for p in site.q_parts + site.kv_parts):
            why = "the site needs gradients and there is no FP8 backward kernel"
        if why is None:  # under either policy: "dequantize" only allows the fallback where it is needed
            terms = self.options.product_terms()
            kernel = f"the FP8-products kernel (asked for; {PRODUCT_TERMS_TEXT[terms]})" if terms else "the FP8 kernel"
            return "preserve", f"preserved: {f.describe()} -> payload + scale to {kernel}"
        if self.options.fp8 == "dequantize":
            key = (site.source, f.kind)
            if key not in _fp8_warned:
                _fp8_warned.add(key)
                log.warning("sparse_mla: FP8 key latent at %s runs dequantized (%s): %s", site.source, why, f.describe())
            return "dequantize", f"dequantized ({why}): {f.describe()}"
        raise FP8DispatchError(
            f"sparse_mla: the FP8 key latent {f.source.name} at {site.source} cannot stay FP8: {why}.\n"
            f"  storage: {f.describe()}\n"
            "  options: store it in a layout an FP8 kernel takes (FlashMLA's 656-byte cache, a torchao "
            "Float8Tensor or float8 payload with per-row or per-tensor scales, a Transformer Engine "
            "Float8Tensor), or compile with make_backend(fp8='dequantize') to run the bf16 kernels on "
            "the dequantized cache (counted as fp8_dequantized and logged)."
        )

    def _inner_name(self) -> str:
        return self.options.inner if isinstance(self.options.inner, str) else getattr(self.options.inner, "__name__", "callable")

    def _inner(self, gm: torch.fx.GraphModule, example_inputs: list, dumping: bool = False, dump=None) -> Callable:
        inner = self.options.inner
        if callable(inner):
            return inner(gm, example_inputs)
        if inner == "eager":
            return gm.forward
        if inner == "aot_eager":
            from torch._dynamo.backends.debugging import aot_eager

            return aot_eager(gm, example_inputs)
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = dict(list_mode_options(self.options.mode)) if self.options.mode else {}
        if dumping:
            # A warm FX-graph cache would skip Inductor's passes (and its output code) while dumping.
            patches["force_disable_caches"] = True
        return compile_fx(gm, example_inputs, config_patches=patches or None)


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
