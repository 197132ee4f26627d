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
    if sites:
        lines.append("")
        lines.append("Lowered sites")
    for i, (g, s) in enumerate(sites):
        where = f"graph {g.compile_id}" + (f" / {s.graph_name}" if s.graph_name else "")
        lines.append(f"  [{i}] {s.source}")
        lines.append(f"      {where}, {s.form} form")
        lines.append(f"      {s.dims}")
        lines.append(f"      scale {s.scale}")
        lines.append(f"      kernel {s.kernel} ({s.kernel_reason})")
        lines.append(f"      FP8: {s.fp8}")
        for m in s.masks:
            lines.append(f"      mask {m}")
        for n in s.notes:
            lines.append(f"      note: {n}")
    if rejected:
        lines.append("")
        lines.append("Rejected candidates")
    for i, (g, r) in enumerate(rejected):
        where = f"graph {g.compile_id}" + (f" / {r.graph_name}" if r.graph_name else "")
        lines.append(f"  [{i}] {r.source}")
        lines.append(f"      {where}, check '{r.check}': {r.reason}")
    near = [(g, n) for g in graphs for n in g.near_misses]
    if near:
        lines.append("")
        lines.append("Near misses (attention-like code with no softmax anchor)")
        for i, (g, n) in enumerate(near):
            lines.append(f"  [{i}] {n.source}")
            lines.append(f"      {n.reason}")
    downgrades = [(g, n) for g in graphs for n in g.fp8_downgrades]
    if downgrades:
        lines.append("")
        lines.append("Warnings: FP8 downgrades (FP8 storage dequantized before a product)")
        for i, (g, n) in enumerate(downgrades):
            lines.append(f"  [{i}] {n.source}")
            lines.append(f"      {n.reason}")
    fails = [(g, f) for g in graphs for f in g.failures]
    if fails:
        lines.append("")
        lines.append("Failures (the graph or site was compiled unchanged)")
        for g, f in fails:
            lines.append(f"  graph {g.compile_id}: {f}")
    if recompile_reasons:
        lines.append("")
        lines.append("Recompiles (the guard that failed)")
        for r in recompile_reasons:
            lines.append(f"  {r.splitlines()[0]}")
    return "\n".join(lines)


INPUT_COLUMNS = ("name", "shape", "stride", "dtype", "device", "requires_grad", "type", "storage", "payload_dtype", "scale", "scale_convention", "granularity")


def format_inputs(rows: list[dict]) -> str:
    """The input table as aligned text."""
    table = [[str(r.get(c, "")) for c in INPUT_COLUMNS] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in table]) for i, c in enumerate(INPUT_COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(INPUT_COLUMNS, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table]
    return "\n".join(lines) + "\n"
