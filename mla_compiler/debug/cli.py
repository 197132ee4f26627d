"""``mla-compiler``: the graph dump command.

    mla-compiler dump [--out DIR] [--expect-matches N] -- python script.py [args]
    python -m mla_compiler.dump [--out DIR] [--expect-matches N] -- python script.py [args]
    mla-compiler render DIR                       # rebuild DIR/index.html

``dump`` runs the command with ``MLA_COMPILER_DUMP=DIR`` (every sparse_mla backend in it writes one
folder per compile), Inductor's caches off (a warm cache would skip the passes) and ``TORCH_TRACE``
pointing into DIR (so tlparse shows the same artifacts), then writes ``DIR/index.html`` and prints
the report. Exit codes: the command's own when it fails; 3 when ``--expect-matches`` does not hold.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
from typing import Optional

from mla_compiler.artifacts.page import final_folders, render_index

EXIT_MISMATCH = 3


def final_reports(root: str) -> list[dict]:
    """report.json of every compile that ran (the last attempt of a retried frame)."""
    reports = []
    for folder in final_folders(root):
        path = os.path.join(folder, "report.json")
        if os.path.exists(path):
            with open(path) as f:
                reports.append(json.load(f))
    return reports


def summary(reports: list[dict]) -> str:
    lines = []
    for r in reports:
        lines.append(f"graph {r['compile_id']} ({r.get('inner', '')}): {len(r['sites'])} lowered, {len(r['rejections'])} rejected, {len(r.get('near_misses', []))} near misses")
        for s in r["sites"]:
            lines.append(f"  lowered  {s['source']}\n           {s['dims']}; kernel {s['kernel']}")
        for x in r["rejections"]:
            lines.append(f"  rejected {x['source']}\n           [{x['check']}] {x['reason']}")
        for x in r.get("near_misses", []):
            lines.append(f"  near miss {x['source']}\n           {x['reason']}")
    return "\n".join(lines)


def dump(out: str, command: list[str], expect_matches: Optional[int]) -> int:
    if not command:
        print("mla-compiler dump: give the command to run after '--', e.g. -- python train.py", file=sys.stderr)
        return 2
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    stale = [p for p in glob.glob(os.path.join(out, "compile_*")) + [os.path.join(out, "index.html"), os.path.join(out, "torch_trace")] if os.path.exists(p)]
    for path in stale:  # a previous dump's folders would be counted with this run's
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if stale:
        print(f"mla-compiler dump: removed {len(stale)} entries of an earlier dump in {out}", file=sys.stderr)
    env = dict(os.environ)
    env["MLA_COMPILER_DUMP"] = out
    env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    env.setdefault("TORCH_TRACE", os.path.join(out, "torch_trace"))
    print(f"mla-compiler dump: writing to {out}; compile caches are off so every pass runs", file=sys.stderr)
    rc = subprocess.call(command, env=env)
    reports = final_reports(out)
    index = render_index(out)
    matched = sum(len(r["sites"]) for r in reports)
    print(summary(reports))
    print(f"\n{len(reports)} graph(s), {matched} site(s) lowered; page: {index}")
    if rc != 0:
        print(f"mla-compiler dump: the command exited with {rc}", file=sys.stderr)
        return rc
    if expect_matches is not None and matched != expect_matches:
        print(f"mla-compiler dump: expected {expect_matches} lowered site(s), found {matched}", file=sys.stderr)
        return EXIT_MISMATCH
    return 0


def _dump_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run a command and dump what the sparse_mla backend saw, matched, rejected and ran.")
    p.add_argument("--out", default="sparse_mla_dump", help="dump folder (default: ./sparse_mla_dump)")
    p.add_argument("--expect-matches", type=int, default=None, metavar="N", help=f"exit with {EXIT_MISMATCH} unless exactly N sites are lowered")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    return p


def _command(args) -> list[str]:
    cmd = list(args.command)
    return cmd[1:] if cmd and cmd[0] == "--" else cmd


def dump_main(argv: Optional[list[str]] = None, prog: str = "python -m mla_compiler.dump") -> int:
    args = _dump_parser(prog).parse_args(argv)
    return dump(args.out, _command(args), args.expect_matches)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb == "dump":
        return dump_main(rest, prog="mla-compiler dump")
    if verb == "render":
        if len(rest) != 1:
            print("usage: mla-compiler render DIR", file=sys.stderr)
            return 2
        print(render_index(rest[0]))
        return 0
    print(f"mla-compiler: unknown command {verb!r}; commands: dump, render", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
