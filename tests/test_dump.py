"""The graph dump: the CLI on real scripts, the files it writes, exit codes, the page in Chromium."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from mla_compiler.debug.cli import EXIT_MISMATCH, final_reports

MODEL_SCRIPT = """
import sys
import torch
from mla_compiler.models import TinyMLAModel, nam56r_small
torch.manual_seed(0)
cfg = nam56r_small(n_layers=int(sys.argv[1]))
model = TinyMLAModel(cfg)
out = torch.compile(model, backend=sys.argv[2] if sys.argv[2] == "sparse_mla" else __import__("mla_compiler").make_backend(inner=sys.argv[2]))(torch.randint(0, cfg.vocab_size, (2, 32)))
out.float().square().mean().backward()
"""

NEAR_MISS_SCRIPT = """
import torch
import mla_compiler
from mla_compiler.models import spellings
x = spellings.make_inputs()
backend = mla_compiler.make_backend(inner="eager")
torch.compile(spellings.module_for("value_not_latent"), backend=backend)(*x.args(), x.scale)

def hand_softmax(q, kv):
    s = torch.einsum("shd,td->sht", q, kv)
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return torch.einsum("sht,td->shd", e / e.sum(-1, keepdim=True), kv)

torch.compile(hand_softmax, backend=backend)(torch.randn(6, 2, 8), torch.randn(6, 8))
"""


def _run_dump(tmp_path, script_text, *args, expect=None):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(script_text))
    out = tmp_path / "dump"
    cmd = [sys.executable, "-m", "mla_compiler.dump", "--out", str(out)]
    if expect is not None:
        cmd += ["--expect-matches", str(expect)]
    cmd += ["--", sys.executable, str(script), *args]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    return run, out


def test_dump_of_reference_model_through_inductor(tmp_path):
    run, out = _run_dump(tmp_path, MODEL_SCRIPT, "1", "sparse_mla", expect=1)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "compile caches are off" in run.stderr
    (folder,) = [f for f in os.listdir(out) if f.startswith("compile_")]
    files = set(os.listdir(out / folder))
    for name in ("inputs.json", "inputs.txt", "graph_dynamo.py", "pass_1_lower.before.py", "pass_1_lower.after.py",
                 "pass_1_lower.diff", "report.json", "report.txt", "drawings.json", "output_code.txt"):
        assert name in files, name
    assert sum(1 for f in files if f.startswith("output_code_")) >= 2  # forward and backward
    report = json.loads((out / folder / "report.json").read_text())
    (site,) = report["sites"]
    assert "mla.py" in site["source"] and "d_qk 128 (64+64)" in site["dims"] and site["kernel"] == "reference"
    assert "sparse_mla.sparse_attn" in (out / folder / "pass_1_lower.after.py").read_text()
    assert "softmax" in (out / folder / "pass_1_lower.diff").read_text()
    inputs = json.loads((out / folder / "inputs.json").read_text())
    assert {"shape", "stride", "dtype", "device", "requires_grad", "type", "storage", "payload_dtype", "scale_convention", "granularity"} <= set(inputs[0])
    assert (out / "index.html").exists()
    trace_logs = "".join(p.read_text() for p in (out / "torch_trace").glob("*.log"))
    assert "sparse_mla_report_json" in trace_logs  # tlparse sees the same report
    assert "1 site(s) lowered" in run.stdout


def test_expect_matches_fails_with_the_report(tmp_path):
    # (A count that matches exits 0: the reference-model and near-miss dumps above and below.)
    run, out = _run_dump(tmp_path, MODEL_SCRIPT, "1", "aot_eager", expect=2)
    assert run.returncode == EXIT_MISMATCH
    assert "expected 2 lowered site(s), found 1" in run.stderr
    assert run.stdout.count("lowered  ") == 1  # the report is printed


def test_dump_of_near_misses_lists_reasons(tmp_path):
    run, out = _run_dump(tmp_path, NEAR_MISS_SCRIPT, expect=0)
    assert run.returncode == 0, run.stderr[-3000:]
    reports = final_reports(str(out))
    rejections = [r for rep in reports for r in rep["rejections"]]
    near = [n for rep in reports for n in rep["near_misses"]]
    assert any(r["check"] == "value" and "not the key latent" in r["reason"] for r in rejections)
    assert any("softmax written by hand" in n["reason"] for n in near)
    assert "not the key latent" in run.stdout and "near miss" in run.stdout


def test_a_failing_command_keeps_its_exit_code(tmp_path):
    run, _ = _run_dump(tmp_path, "import sys\nsys.exit(7)\n")
    assert run.returncode == 7


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("MLA_COMPILER_REQUIRE_CHROMIUM"):
        pytest.fail("chromium is required here (MLA_COMPILER_REQUIRE_CHROMIUM) but not installed")
    pytest.skip("chromium not installed")


def test_page_renders_in_headless_chromium(tmp_path):
    chromium = _chromium()
    script = MODEL_SCRIPT + NEAR_MISS_SCRIPT
    run, out = _run_dump(tmp_path, script, "1", "aot_eager")
    assert run.returncode == 0, run.stderr[-3000:]
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    url = (out / "index.html").as_uri()
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert "sparse_mla graph dump" in dom
    assert dom.count('class="site"') == 1 and dom.count('class="rejection"') == 1
    assert "not the key latent" in dom and "softmax written by hand" in dom
    assert 'class="node matched"' in dom and 'class="node rejected"' in dom and 'class="node anchor"' in dom
    png = tmp_path / "page.png"
    subprocess.run([chromium, *flags, f"--screenshot={png}", "--window-size=1200,1600", url], capture_output=True, timeout=120)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20000  # a drawn page, not a blank one
