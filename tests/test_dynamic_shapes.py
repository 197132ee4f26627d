"""Recompiles: one graph for all lengths once marked dynamic; guards only on what shapes the lowering."""

import torch

from mla_compiler import explain
from mla_compiler.debug.explain import recompile_index
from mla_compiler.models import TinyMLAModel, nam56r_small, spellings


def _tokens(cfg, b, s, seed):
    return torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


def test_marked_dynamic_model_compiles_once_for_growing_lengths_and_batches():
    torch.manual_seed(0)
    cfg = nam56r_small(n_layers=1)
    model = TinyMLAModel(cfg).eval()
    first = _tokens(cfg, 2, 8, 0)
    torch._dynamo.mark_dynamic(first, 0)
    torch._dynamo.mark_dynamic(first, 1)
    more = [(_tokens(cfg, b, s, i),) for i, (b, s) in enumerate([(3, 12), (2, 16), (4, 24), (5, 9)])]
    report = explain(model, first, calls=more)
    assert report.recompiles == 0, report.recompile_reasons
    assert not report.recompile_reasons
    (site,) = report.sites
    # Lengths stay symbolic; the widths the kernel is built for are specialized.
    assert "s_q dynamic" in site.dims and "s_kv dynamic" in site.dims and "batch dynamic" in site.dims
    assert "d_qk 128 (64+64), d_v 64" in site.dims


def test_unmarked_model_recompiles_once_then_generalizes_and_reports_why():
    torch.manual_seed(0)
    cfg = nam56r_small(n_layers=1)
    model = TinyMLAModel(cfg).eval()
    more = [(_tokens(cfg, 2, s, s),) for s in (12, 16, 20, 28)]
    report = explain(model, _tokens(cfg, 2, 8, 0), calls=more)
    # Dynamo's automatic dynamic shapes: the second length recompiles with symbolic lengths, and
    # no later length recompiles (nothing in the rewrite guards on a length's value).
    assert report.recompiles == 1
    (reason,) = report.recompile_reasons
    assert "size mismatch at index 1" in reason and "expected 8, actual 12" in reason
    assert "1 recompile(s)" in str(report) and "Recompiles (the guard that failed)" in str(report)
    assert report.as_dict()["recompile_reasons"] == [reason]


def test_a_dtype_change_recompiles_because_it_changes_the_lowering():
    module = spellings.module_for("absorbed_index_mask")
    x32 = spellings.make_inputs(seed=1)
    x16 = spellings.make_inputs(seed=2, dtype=torch.bfloat16)
    report = explain(module, *x32.args(), x32.scale, calls=[(*x16.args(), x16.scale)])
    assert report.recompiles == 1 and len(report.sites) == 2
    assert any("dtype mismatch" in r for r in report.recompile_reasons), report.recompile_reasons


def test_recompile_index_reads_dynamo_compile_ids():
    assert recompile_index("0/0") == 0
    assert recompile_index("3/2") == 2
    assert recompile_index("!1@0/4") == 4
    assert recompile_index("?") == -1
