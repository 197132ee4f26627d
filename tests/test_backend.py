"""The backend as users meet it: options, counters, explain, failure behaviour, registration."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.utils import counters

import mla_compiler
from mla_compiler import BackendOptionError, SiteLoweringError, explain, make_backend
from mla_compiler.models import TinyMLAModel, deepseek_v32_small, spellings


def test_unknown_option_is_named():
    with pytest.raises(BackendOptionError, match="unknown option.*fp9"):
        make_backend(fp9=True)
    with pytest.raises(BackendOptionError, match="inner='tvm'"):
        make_backend(inner="tvm")


def test_backend_is_published_through_entry_point():
    assert "sparse_mla" in torch._dynamo.list_backends()
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("sparse_mla") is mla_compiler.backend.sparse_mla


def test_explain_reports_sites_dims_kernel_and_source():
    torch.manual_seed(0)
    cfg = deepseek_v32_small(n_layers=2)
    model = TinyMLAModel(cfg)
    report = explain(model, torch.randint(0, cfg.vocab_size, (2, 40)))
    assert len(report.sites) == 2 and not report.rejections and not report.failures
    text = str(report)
    assert "2 site(s) lowered" in text
    assert "d_qk 576 (512+64), d_v 512, heads 8" in text
    assert "kernel reference (cpu tensors take the reference)" in text
    assert "mla.py:" in text and "softmax" in text
    assert f"scale {cfg.softmax_scale!r}" in text
    assert report.to_json().startswith("{")


def test_explain_reports_rejections_with_reason():
    x = spellings.make_inputs()
    report = explain(spellings.module_for("value_not_latent"), *x.args(), x.scale)
    assert not report.sites
    (rej,) = report.rejections
    assert rej.check == "value" and "not the key latent" in rej.reason
    assert "Rejected candidates" in str(report) and "not the key latent" in str(report)


def test_a_failing_pass_compiles_the_graph_unchanged(monkeypatch):
    import mla_compiler.backend as backend

    def broken(gm, graph_name=""):
        raise RuntimeError("matcher bug")

    monkeypatch.setattr(backend, "find_sites", broken)
    x = spellings.make_inputs()
    module = spellings.module_for("absorbed_index_mask")
    reports = []
    out = torch.compile(module, backend=make_backend(inner="aot_eager", on_report=reports.append))(*x.args(), x.scale)
    torch.testing.assert_close(out, module(*x.args(), x.scale))
    assert counters["sparse_mla"]["pass_failed"] == 1
    assert "matcher bug" in reports[0].failures[0]
    torch._dynamo.reset()
    with pytest.raises(Exception, match="matcher bug"):
        torch.compile(module, backend=make_backend(inner="aot_eager", strict=True))(*x.args(), x.scale)


def test_a_failing_lowering_keeps_the_site_as_written(monkeypatch):
    import mla_compiler.backend as backend

    def broken(gm, site, replaced=None, fp8_mode="none", fp8_products=False):
        raise ValueError("lowering bug")

    monkeypatch.setattr(backend, "lower_site", broken)
    x = spellings.make_inputs()
    module = spellings.module_for("concat_576")
    out = torch.compile(module, backend=make_backend(inner="aot_eager"))(*x.args(), x.scale)
    torch.testing.assert_close(out, module(*x.args(), x.scale))
    assert counters["sparse_mla"]["lowering_failed"] == 1 and counters["sparse_mla"]["matched"] == 0
    torch._dynamo.reset()
    with pytest.raises(Exception, match="lowering bug"):
        torch.compile(module, backend=make_backend(inner="aot_eager", strict=True))(*x.args(), x.scale)
    assert SiteLoweringError.__mro__[1] is RuntimeError


def test_checked_mask_asserts_at_run_time():
    """A graph-input mask is folded into the indices; a value other than 0/-inf trips the check."""

    def attn(q, kv, idx, mask):
        s = torch.einsum("bshd,btd->bsht", q, kv) * 0.5
        s = s + torch.full((1, 5, 5), float("-inf")).scatter(-1, idx, 0.0).unsqueeze(2) + mask.view(1, 5, 1, 5)
        return torch.einsum("bsht,btd->bshd", s.softmax(-1), kv)

    q, kv = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 8)
    idx = torch.stack([torch.cat([torch.tensor([i]), torch.randperm(5)[:2]]).unique()[:2] for i in range(5)]).unsqueeze(0)
    causal = torch.full((5, 5), float("-inf")).triu(1)
    compiled = torch.compile(attn, backend=make_backend(inner="aot_eager"))
    torch.testing.assert_close(compiled(q, kv, idx, causal), attn(q, kv, idx, causal), equal_nan=True)
    with pytest.raises(RuntimeError, match="other than 0 or -inf"):
        compiled(q, kv, idx, causal + 0.5)


def test_checked_mask_message_fits_cuda_assert():
    """CUDA's device-side assert refuses messages of 255 bytes or more (seen on H200)."""
    from mla_compiler.lowering.rewrite import checked_mask_message

    msg = checked_mask_message("l_mask_", "/a/very/long/path/" * 30 + "model.py:145  scores = scores.softmax(dim=-1)")
    assert len(msg.encode()) < 255 and "l_mask_" in msg and msg.endswith("scores.softmax(dim=-1)")


def test_script_without_import_compiles_through_the_entry_point(tmp_path):
    """After ``pip install``, ``backend="sparse_mla"`` works with no import of ours (true Inductor)."""
    script = tmp_path / "user_script.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import torch

            class Attn(torch.nn.Module):
                def forward(self, q_nope, q_pe, kv, pe, topk, mask):
                    b, s = q_nope.shape[:2]
                    scores = (torch.einsum("bshc,btc->bsht", q_nope.float(), kv.float())
                              + torch.einsum("bshr,btr->bsht", q_pe.float(), pe.float())) * 0.1
                    index_mask = torch.full((b, s, kv.size(1)), float("-inf")).scatter_(-1, topk, 0)
                    index_mask += mask
                    scores += index_mask.unsqueeze(2)
                    p = scores.softmax(dim=-1, dtype=torch.float32)
                    return torch.einsum("bsht,btc->bshc", p.type_as(q_nope), kv)

            class Model(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.layers = torch.nn.ModuleList([Attn(), Attn()])
                def forward(self, q_nope, q_pe, kv, pe, topk, mask):
                    out = q_nope
                    for layer in self.layers:
                        out = layer(out, q_pe, kv, pe, topk, mask)
                    return out

            torch.manual_seed(0)
            b, s, h = 2, 16, 4
            q_nope, q_pe = torch.randn(b, s, h, 32), torch.randn(b, s, h, 16)
            kv, pe = torch.randn(b, s, 32), torch.randn(b, s, 16)
            mask = torch.full((s, s), float("-inf")).triu_(1)
            topk = (torch.randn(b, s, s) + mask).topk(6, dim=-1)[1]
            model = Model()
            compiled = torch.compile(model, backend="sparse_mla")
            out = compiled(q_nope, q_pe, kv, pe, topk, mask)
            torch.testing.assert_close(out, model(q_nope, q_pe, kv, pe, topk, mask), rtol=1e-4, atol=1e-4)
            assert "mla_compiler" in sys.modules  # loaded by the entry point, not by this script
            # Count the op's run-time calls by wrapping its kernel lookup (after compiling).
            ops = sys.modules["mla_compiler.lowering.ops"]
            calls, kernel_for = [], ops.kernel_for
            ops.kernel_for = lambda problem: calls.append(problem) or kernel_for(problem)
            compiled(q_nope, q_pe, kv, pe, topk, mask)
            from torch._dynamo.utils import counters
            print("matched", counters["sparse_mla"]["matched"], "calls", len(calls))
            """
        )
    )
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "matched 2 calls 2" in run.stdout, run.stdout + run.stderr[-2000:]
