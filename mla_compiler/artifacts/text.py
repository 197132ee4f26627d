"""The compile report as text (``print(explain(...))`` and ``report.txt`` of a dump)."""

from __future__ import annotations

from typing import Sequence

from mla_compiler.sites import CompileReport


def format_report(graphs: list[CompileReport], recompiles: int = 0, recompile_reasons: Sequence[str] = ()) -> str:
    sites = [(g, s) for g in graphs for s in g.sites]
    rejected = [(g, r) for g in graphs for r in g.rejections]
    lines = [
        f"sparse_mla: {len(graphs)} graph(s), {len(sites)} site(s) lowered, {len(rejected)} candidate(s) rejected"
        + (f", {recompiles} recompile(s)" if recompiles else "")
    ]
    site_entries = []
    for g, s in sites:
        site_entries.append(
            [s.source, f"{_where(g, s.graph_name)}, {s.form} form", s.dims, f"scale {s.scale}", f"kernel {s.kernel} ({s.kernel_reason})", f"FP8: {s.fp8}"]
            + [f"storage {k}: {v}" for k, v in s.storage.items()]
            + [f"mask {m}" for m in s.masks]
            + [f"note: {n}" for n in s.notes]
        )
    _plain_section(lines, "Inputs held as FP8 storage", [f"graph {g.compile_id}: {r['name']} {r.get('shape', '')}: {r.get('storage')}, payload "
                                                         f"{r.get('payload_dtype')}, scale {r.get('scale')} ({r.get('scale_convention')}, {r.get('granularity')})"
                                                         for g in graphs for r in g.inputs if r.get("storage") not in (None, "", "plain")])
    _plain_section(lines, "FP8 values the graph computes", [f"graph {g.compile_id}: {r['name']} {r.get('shape', '')}: {r.get('storage')}, "
                                                           f"payload {r.get('payload_dtype')} ({r.get('source') or 'no source line'})"
                                                           for g in graphs for r in g.fp8_values])
    _section(lines, "Lowered sites", site_entries)
    _section(lines, "Rejected candidates", [[r.source, f"{_where(g, r.graph_name)}, check '{r.check}': {r.reason}"] for g, r in rejected])
    _section(lines, "Near misses (attention-like code with no softmax anchor)", [[n.source, n.reason] for g in graphs for n in g.near_misses])
    _section(lines, "Warnings: FP8 downgrades (FP8 storage dequantized before a product)", [[n.source, n.reason] for g in graphs for n in g.fp8_downgrades])
    _plain_section(lines, "Failures (the graph or site was compiled unchanged)", [f"graph {g.compile_id}: {f}" for g in graphs for f in g.failures])
    _plain_section(lines, "Recompiles (the guard that failed)", [r.splitlines()[0] for r in recompile_reasons])
    return "\n".join(lines)


def _where(g: CompileReport, graph_name: str) -> str:
    return f"graph {g.compile_id}" + (f" / {graph_name}" if graph_name else "")


def _section(lines: list[str], title: str, entries: list[list[str]]) -> None:
    """A numbered section: each entry's first line after ``[i]``, the rest indented under it."""
    if not entries:
        return
    lines += ["", title]
    for i, (first, *rest) in enumerate(entries):
        lines.append(f"  [{i}] {first}")
        lines += [f"      {x}" for x in rest]


def _plain_section(lines: list[str], title: str, items: list[str]) -> None:
    if items:
        lines += ["", title] + [f"  {x}" for x in items]


INPUT_COLUMNS = ("name", "shape", "stride", "dtype", "device", "requires_grad", "type", "storage", "payload_dtype", "scale", "scale_convention", "granularity")


def format_inputs(rows: list[dict]) -> str:
    """The input table as aligned text."""
    table = [[str(r.get(c, "")) for c in INPUT_COLUMNS] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in table]) for i, c in enumerate(INPUT_COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(INPUT_COLUMNS, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table]
    return "\n".join(lines) + "\n"
