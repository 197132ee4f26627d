"""Passes run on captured Dynamo graphs, without compiling: sites, roles, reasons, op calls."""


import pytest
import torch

from mla_compiler.debug.capture import capture_graphs
from mla_compiler.lowering.rewrite import SPARSE_ATTN, lower_site, sparse_attn_calls
from mla_compiler.models import TinyMLAModel, deepseek_v32_small, nam56r_small, spellings
from mla_compiler.passes.mla_match import find_sites
from mla_compiler.sites import MatchedSite, Rejection


def _sites(results):
    return [r for r in results if isinstance(r, MatchedSite)]


def _rejections(results):
    return [r for r in results if isinstance(r, Rejection)]


def _model_graph(cfg, batch=2, seqlen=40, dynamic=None, checkpoint=False):
    torch.manual_seed(0)
    model = TinyMLAModel(cfg, checkpoint=checkpoint)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seqlen))
    (gm,) = capture_graphs(model, tokens, dynamic=dynamic)
    return gm


@pytest.mark.parametrize("config, d_parts, d_v", [(deepseek_v32_small, (512, 64), 512), (nam56r_small, (64, 64), 64)])
def test_reference_model_sites_and_roles(config, d_parts, d_v):
    cfg = config(n_layers=2)
    gm = _model_graph(cfg)
    results = find_sites(gm)
    sites = _sites(results)
    assert len(sites) == 2 and not _rejections(results)
    site = sites[0]
    assert site.form == "index-mask"
    assert site.dims.d_parts == d_parts and site.dims.d_v == d_v and site.dims.heads == cfg.n_heads
    assert site.dims.topk == str(min(cfg.index_topk, 40)) and site.dims.batch == "2" and site.dims.s_q == "40"
    assert site.scale == pytest.approx(cfg.softmax_scale) and not site.scale_factors
    # latent query first (it carries the value), then rope; keys one latent for all heads
    assert [p.axes for p in site.q_parts] == [(("B",), ("S",), ("H",), ("D0",)), (("B",), ("S",), ("H",), ("D1",))]
    roles = lambda op: tuple(ax for ax in op.axes if ax)  # noqa: E731 - unit axes carry no role
    assert [roles(p) for p in site.kv_parts] == [(("B",), ("T",), ("D0",)), (("B",), ("T",), ("D1",))]
    assert site.indices.axes == (("B",), ("S",), ("K",)) and site.index_semantics == "scatter" and site.indices_unique
    # the causal mask built in the graph is proven 0/-inf, so it needs no run-time check
    assert [m.kind for m in site.masks] == ["additive"] and site.masks[0].operand.axes == (("S",), ("T",))
    assert site.output.axes == (("B",), ("S",), ("H",), ("V",))
    assert "mla.py" in site.source and "softmax" in site.source


def test_lowering_leaves_one_op_per_layer_and_no_score_tensor():
    cfg = nam56r_small(n_layers=3)
    gm = _model_graph(cfg)
    for site in _sites(find_sites(gm)):
        lower_site(gm, site)
    gm.graph.lint()
    gm.recompile()
    assert sparse_attn_calls(gm) == 3
    kinds = [n.target for n in gm.graph.nodes if n.op in ("call_method", "call_function")]
    assert "softmax" not in kinds and "scatter_" not in kinds
    # no tensor of the scores' size [b, s, h, t] survives
    for n in gm.graph.nodes:
        v = n.meta.get("example_value")
        if isinstance(v, torch.Tensor) and v.dim() == 4:
            assert tuple(v.shape) != (2, 40, cfg.n_heads, 40), n.format_node()
    call = next(n for n in gm.graph.nodes if n.target is SPARSE_ATTN)
    q, kv, idx = (a.meta["example_value"] for a in call.args[:3])
    assert q.shape == (80, cfg.n_heads, 128) and kv.shape == (80, 1, 128) and idx.shape == (80, 1, min(cfg.index_topk, 40))
    assert idx.dtype == torch.int32 and call.args[4] == 64


def test_checkpoint_regions_are_rewritten():
    gm = _model_graph(nam56r_small(n_layers=2), checkpoint=True)
    results = find_sites(gm)
    sites = _sites(results)
    assert len(sites) == 2 and all(s.graph_name.startswith("wrap_body") for s in sites)
    for site in sites:
        lower_site(gm.get_submodule(site.graph_name), site)
    assert sparse_attn_calls(gm) == 2


def test_dynamic_shapes_read_sizes_at_run_time():
    gm = _model_graph(nam56r_small(n_layers=1), dynamic=True)
    (site,) = _sites(find_sites(gm))
    assert site.dims.d_parts == (64, 64) and site.dims.heads == 6
    assert site.sizes["B"].static is None and site.sizes["S"].static is None and site.sizes["T"].static is None
    lower_site(gm, site)
    gm.recompile()
    assert any(n.op == "call_method" and n.target == "size" for n in gm.graph.nodes)


def test_decode_with_latent_cache():
    cfg = nam56r_small(n_layers=1)
    torch.manual_seed(0)
    model = TinyMLAModel(cfg).eval()
    model.allocate_cache(batch=3, max_len=64)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (3, 20)))
        (gm,) = capture_graphs(model, torch.randint(0, cfg.vocab_size, (3, 1)), start_pos=20)
    (site,) = _sites(find_sites(gm))
    assert site.dims.s_q == "1" and site.dims.s_kv == "21" and site.dims.batch == "3"
    # keys are slices of the cache buffers; no query axis (one token)
    assert site.kv_parts[0].axes == (("B",), ("T",), ("D0",))
    assert site.masks == ()


@pytest.mark.parametrize("name", list(spellings.MATCHED))
def test_matched_spellings(name):
    x = spellings.make_inputs()
    (gm,) = capture_graphs(spellings.module_for(name), *x.args(), x.scale)
    results = find_sites(gm)
    assert len(_sites(results)) == 1, [r.reason for r in _rejections(results)]
    site = _sites(results)[0]
    assert site.dims.d_qk == 48 and site.dims.d_v == 32 and site.dims.heads == 4
    # separate latent/rope products keep two parts; concatenated ones are one 48-wide part
    assert site.dims.d_parts in ((32, 16), (48,))
    expected_form = "gather" if name.startswith("gather") else "index-mask"
    assert site.form == expected_form


@pytest.mark.parametrize("name", list(spellings.NEAR_MISSES))
def test_near_misses_are_rejected_with_reason(name):
    _, check, words = spellings.NEAR_MISSES[name]
    x = spellings.make_inputs()
    (gm,) = capture_graphs(spellings.module_for(name), *x.args(), x.scale)
    results = find_sites(gm)
    assert not _sites(results)
    (rej,) = _rejections(results)
    assert rej.check == check and words in rej.reason, rej.reason
    assert "spellings.py" in rej.source


def test_mask_kinds():
    """A graph-input mask is checked at run time; a -inf fill is a boolean fold; bias is refused."""

    def with_input_mask(q, kv, idx, mask):
        s = torch.einsum("bshd,btd->bsht", q, kv) * 0.5
        sel = torch.full((q.size(0), q.size(1), kv.size(1)), float("-inf")).scatter(-1, idx, 0.0)
        s = (s + sel.unsqueeze(2) + mask.view(1, mask.size(0), 1, -1)).masked_fill(~(mask == 0).view(1, mask.size(0), 1, -1), float("-inf"))
        return torch.einsum("bsht,btd->bshd", s.softmax(-1), kv)

    q, kv = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 8)
    idx = torch.stack([torch.randperm(5)[:3] for _ in range(5)]).unsqueeze(0)
    mask = torch.full((5, 5), float("-inf")).triu(1)
    (gm,) = capture_graphs(with_input_mask, q, kv, idx, mask)
    (site,) = _sites(find_sites(gm))
    assert sorted(m.kind for m in site.masks) == ["checked", "fill"]
    assert not site.indices_unique  # indices came from an input: duplicates are dropped at run time
    assert any("duplicates" in n for n in site.notes)


def test_probabilities_returned_are_not_lowered():
    def f(q, kv, idx):
        s = torch.einsum("bshd,btd->bsht", q, kv)
        s = s + torch.full((1, 5, 5), float("-inf")).scatter(-1, idx, 0.0).unsqueeze(2)
        p = s.softmax(-1)
        return torch.einsum("bsht,btd->bshd", p, kv), p

    idx = torch.stack([torch.randperm(5)[:3] for _ in range(5)]).unsqueeze(0)
    (gm,) = capture_graphs(f, torch.randn(1, 5, 2, 8), torch.randn(1, 5, 8), idx)
    (rej,) = _rejections(find_sites(gm))
    assert rej.check == "probabilities" and "used by" in rej.reason
