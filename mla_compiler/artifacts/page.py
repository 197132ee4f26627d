"""``index.html`` of a dump folder: one section per compile, a table of what matched and what was
rejected (with reasons), and a drawing of each site's subgraph. Static: no server, no script."""

from __future__ import annotations

import glob
import html
import json
import os
from collections import defaultdict

COLORS = {
    "matched": ("#d8f5dc", "#1b7a2e"),
    "anchor": ("#ffe2b8", "#b45f06"),
    "operand": ("#dde8ff", "#2851a3"),
    "rejected": ("#ffd6d6", "#b3261e"),
    "context": ("#f1f1f1", "#777777"),
}
BOX_W, BOX_H, GAP_X, GAP_Y = 150, 40, 40, 14

CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; margin-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0 16px 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f6f6f6; }
td.reason { max-width: 720px; }
code, .mono { font-family: Menlo, Consolas, monospace; font-size: 12px; }
.ok { color: #1b7a2e; font-weight: bold; } .bad { color: #b3261e; font-weight: bold; }
.legend span { display: inline-block; padding: 2px 8px; margin-right: 6px; border-radius: 4px; font-size: 12px; }
svg { border: 1px solid #eee; background: #fff; }
.drawing { overflow-x: auto; max-width: 100%; }
"""


def _esc(x) -> str:
    return html.escape(str(x))


def _layers(drawing: dict) -> dict:
    ids = [n["id"] for n in drawing["nodes"]]
    preds = defaultdict(list)
    for a, b in drawing["edges"]:
        preds[b].append(a)
    depth: dict = {}
    for i in ids:  # nodes come in graph (topological) order
        depth[i] = 1 + max((depth[p] for p in preds[i] if p in depth), default=-1)
    return depth


def svg(drawing: dict) -> str:
    """Left-to-right layered drawing: column = longest path from an input of the drawing."""
    depth = _layers(drawing)
    columns = defaultdict(list)
    for n in drawing["nodes"]:
        columns[depth[n["id"]]].append(n)
    pos = {}
    for col, nodes in columns.items():
        for row, n in enumerate(nodes):
            pos[n["id"]] = (20 + col * (BOX_W + GAP_X), 20 + row * (BOX_H + GAP_Y))
    width = 40 + (max(columns) + 1 if columns else 1) * (BOX_W + GAP_X)
    height = 40 + max((len(v) for v in columns.values()), default=1) * (BOX_H + GAP_Y)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">']
    parts.append('<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="8" refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#999"/></marker></defs>')
    for a, b in drawing["edges"]:
        if a in pos and b in pos:
            (x1, y1), (x2, y2) = pos[a], pos[b]
            parts.append(f'<line x1="{x1 + BOX_W}" y1="{y1 + BOX_H / 2}" x2="{x2}" y2="{y2 + BOX_H / 2}" stroke="#999" marker-end="url(#arrow)"/>')
    for n in drawing["nodes"]:
        x, y = pos[n["id"]]
        fill, stroke = COLORS.get(n["role"], COLORS["context"])
        width_ = 3 if n["role"] in ("anchor", "rejected") else 1
        parts.append(f'<g class="node {_esc(n["role"])}"><title>{_esc(n["id"])} {_esc(n["shape"])} {_esc(n["dtype"])}\n{_esc(n["source"])}</title>')
        parts.append(f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6" fill="{fill}" stroke="{stroke}" stroke-width="{width_}"/>')
        parts.append(f'<text x="{x + 6}" y="{y + 16}" font-size="12" font-family="monospace">{_esc(n["label"])[:20]}</text>')
        parts.append(f'<text x="{x + 6}" y="{y + 31}" font-size="10" fill="#555" font-family="monospace">{_esc(n["id"])[:14]} {_esc(n["shape"])[:14]}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _load(folder: str, name: str, default):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def _section(folder: str) -> str:
    report = _load(folder, "report.json", {})
    drawings = _load(folder, "drawings.json", {"sites": [], "rejections": []})
    inputs = _load(folder, "inputs.json", [])
    name = os.path.basename(folder)
    out = [f'<h2 id="{_esc(name)}">graph {_esc(report.get("compile_id", "?"))} <span class="mono">({_esc(name)})</span></h2>']
    n_sites, n_rej = len(report.get("sites", [])), len(report.get("rejections", []))
    out.append(f'<p><span class="ok">{n_sites} site(s) lowered</span>, <span class="bad">{n_rej} candidate(s) rejected</span>, '
               f'{len(report.get("near_misses", []))} near miss(es); inner compiler <code>{_esc(report.get("inner", ""))}</code></p>')
    for f in report.get("failures", []):
        out.append(f'<p class="bad">failure: {_esc(f)}</p>')
    if report.get("sites"):
        out.append("<h3>Lowered sites</h3><table><tr><th>#</th><th>source</th><th>form</th><th>dims</th><th>scale</th><th>kernel</th><th>FP8</th><th>masks / notes</th></tr>")
        for s in report["sites"]:
            fp8 = s.get("fp8", "no FP8 inputs")
            notes = "<br>".join(_esc(x) for x in s.get("masks", []) + s.get("notes", []))
            out.append(f'<tr class="site"><td>{s["index"]}</td><td class="mono">{_esc(s["source"])}</td><td>{_esc(s["form"])}</td><td>{_esc(s["dims"])}</td>'
                       f'<td>{_esc(s["scale"])}</td><td>{_esc(s["kernel"])}<br><small>{_esc(s["kernel_reason"])}</small></td><td>{_esc(fp8)}</td><td>{notes}</td></tr>')
        out.append("</table>")
    if report.get("rejections"):
        out.append("<h3>Rejected candidates</h3><table><tr><th>#</th><th>source</th><th>check</th><th>reason</th></tr>")
        for i, r in enumerate(report["rejections"]):
            out.append(f'<tr class="rejection"><td>{i}</td><td class="mono">{_esc(r["source"])}</td><td>{_esc(r["check"])}</td><td class="reason">{_esc(r["reason"])}</td></tr>')
        out.append("</table>")
    if report.get("near_misses"):
        out.append("<h3>Near misses (no softmax anchor)</h3><table><tr><th>source</th><th>what to change</th></tr>")
        for r in report["near_misses"]:
            out.append(f'<tr class="near-miss"><td class="mono">{_esc(r["source"])}</td><td class="reason">{_esc(r["reason"])}</td></tr>')
        out.append("</table>")
    for i, d in enumerate(drawings.get("sites", [])):
        out.append(f'<h3>Site {i}: subgraph replaced by <code>sparse_mla.sparse_attn</code></h3><div class="drawing site-drawing">{svg(d)}</div>')
    for i, d in enumerate(drawings.get("rejections", [])):
        reason = report["rejections"][i]["reason"] if i < len(report.get("rejections", [])) else ""
        out.append(f'<h3>Rejected candidate {i}</h3><p class="reason">{_esc(reason)}</p><div class="drawing rejection-drawing">{svg(d)}</div>')
    if inputs:
        out.append("<details><summary>Input table</summary><table><tr><th>name</th><th>shape</th><th>stride</th><th>dtype</th><th>device</th><th>grad</th><th>type</th><th>storage</th><th>payload</th><th>scale</th><th>convention</th><th>granularity</th></tr>")
        for r in inputs:
            out.append("<tr>" + "".join(f"<td>{_esc(r.get(k, ''))}</td>" for k in ("name", "shape", "stride", "dtype", "device", "requires_grad", "type", "storage", "payload_dtype", "scale", "scale_convention", "granularity")) + "</tr>")
        out.append("</table></details>")
    files = sorted(os.listdir(folder))
    out.append("<details><summary>Files</summary><ul>" + "".join(f'<li><a href="{_esc(name)}/{_esc(f)}">{_esc(f)}</a></li>' for f in files) + "</ul></details>")
    return "\n".join(out)


def final_folders(root: str) -> list[str]:
    """Compile folders in order, a retried frame's later attempt replacing the earlier one. (A new
    compile may reuse an id after ``torch._dynamo.reset()``; it starts again at attempt 0.)"""
    chosen: list[str] = []
    last_of: dict = {}
    for folder in sorted(p for p in glob.glob(os.path.join(root, "compile_*")) if os.path.isdir(p)):
        name = os.path.basename(folder)
        rest = name.split("_", 2)[2]  # "<frame>-<recompile>[_attempt<k>]_<pid>"
        pid = rest.rsplit("_", 1)[1]
        cid, _, attempt = rest.rsplit("_", 1)[0].partition("_attempt")
        key = (cid, pid)
        if attempt and key in last_of:
            chosen[last_of[key]] = folder
        else:
            last_of[key] = len(chosen)
            chosen.append(folder)
    return chosen


def render_index(root: str) -> str:
    folders = final_folders(root)
    total_sites = sum(len(_load(f, "report.json", {}).get("sites", [])) for f in folders)
    total_rej = sum(len(_load(f, "report.json", {}).get("rejections", [])) for f in folders)
    legend = "".join(f'<span style="background:{c[0]};border:1px solid {c[1]}">{k}</span>' for k, c in COLORS.items())
    body = [
        "<!doctype html><html><head><meta charset='utf-8'><title>sparse_mla graph dump</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>sparse_mla graph dump</h1>",
        f'<p id="summary">{len(folders)} compiled graph(s), {total_sites} site(s) lowered, {total_rej} candidate(s) rejected.</p>',
        f'<p class="legend">{legend}</p>',
    ]
    body += [_section(f) for f in folders]
    body.append("</body></html>")
    path = os.path.join(root, "index.html")
    with open(path, "w") as f:
        f.write("\n".join(body))
    return path
