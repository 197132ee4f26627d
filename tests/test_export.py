"""``mla_compiler.rewrite``: one FX graph whose sites call the canonical op; torch.export and
AOTInductor packaging of it."""

import pytest
import torch
from torch.export import Dim

import mla_compiler
from conftest import rel_err
from mla_compiler.models import TinyMLAModel, deepseek_v32_small, nam56r_small, spellings

ops = torch.ops.sparse_mla

# On a GPU machine the same tests run on CUDA tensors (the Triton kernels, TF32 products).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5 if DEVICE == "cpu" else 5e-3


def _op_nodes(graph: torch.fx.Graph, op) -> list:
    return [n for n in graph.nodes if n.op == "call_function" and n.target in (op, op.default)]


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return TinyMLAModel(cfg).eval().to(DEVICE)


def _tokens(cfg, b, s, seed=0):
    return torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def test_rewrite_returns_a_graph_module_with_one_op_per_site():
    cfg = nam56r_small(n_layers=2)
    model = _model(cfg)
    tok = _tokens(cfg, 2, 8)
    gm = mla_compiler.rewrite(model, tok)
    assert isinstance(gm, torch.fx.GraphModule)
    assert len(_op_nodes(gm.graph, ops.sparse_attn)) == 2
    assert not [n for n in gm.graph.nodes if "softmax" in str(n.target)]  # the sites' softmaxes are gone
    report = gm.sparse_mla_report
    assert len(report.sites) == 2 and not report.rejections and not report.failures
    with torch.no_grad():
        assert rel_err(gm(tok), model(tok)) < TOL
        # lengths stayed symbolic: another batch and length run through the same graph
        other = _tokens(cfg, 3, 13, seed=1)
        assert rel_err(gm(other), model(other)) < TOL


def test_torch_export_keeps_the_op_and_runs_with_dynamic_lengths():
    cfg = nam56r_small(n_layers=2)
    model = _model(cfg)
    tok = _tokens(cfg, 2, 8)
    gm = mla_compiler.rewrite(model, tok)
    # The indexer keeps min(index_topk, s) keys; export's solver cannot prove the guards that
    # min() creates, so they become run-time asserts (the model alone needs the same flag).
    dims = ({0: Dim("batch", min=1, max=8), 1: Dim("seq", min=2, max=64)},)
    ep = torch.export.export(gm, (tok,), dynamic_shapes=dims, prefer_deferred_runtime_asserts_over_guards=True)
    nodes = _op_nodes(ep.graph, ops.sparse_attn)
    assert len(nodes) == 2
    assert all(n.meta["val"][0].shape[-1] == cfg.v_head_dim for n in nodes)  # traced by the fake kernel
    with torch.no_grad():
        for b, s in ((3, 13), (1, 60)):  # top-k below and at index_topk
            other = _tokens(cfg, b, s, seed=s)
            assert rel_err(ep.module()(other), model(other)) < TOL


def test_rewrite_of_a_near_miss_leaves_the_graph_and_says_why():
    x = spellings.make_inputs()
    gm = mla_compiler.rewrite(spellings.module_for("value_not_latent"), *x.args(), x.scale)
    assert not _op_nodes(gm.graph, ops.sparse_attn)
    (rej,) = gm.sparse_mla_report.rejections
    assert rej.check == "value" and "not the key latent" in rej.reason


def test_rewrite_keeps_an_fp8_cache_fp8_through_export():
    cfg = deepseek_v32_small(n_layers=1)
    model = _model(cfg)
    twin = _model(cfg)
    twin.load_state_dict(model.state_dict())
    for m in (model, twin):
        m.allocate_cache(1, 32, kv_format="flashmla", device=DEVICE)
    prompt = _tokens(cfg, 1, 8)
    with torch.no_grad():
        gm = mla_compiler.rewrite(model, prompt)
        (site,) = gm.sparse_mla_report.sites
        assert site.fp8.startswith("preserved")
        ep = torch.export.export(gm, (prompt,))
        assert len(_op_nodes(ep.graph, ops.sparse_attn_fp8kv)) == 1 and not _op_nodes(ep.graph, ops.sparse_attn)
        assert rel_err(ep.module()(prompt), twin(prompt)) < TOL
        # The FP8-products choice is an argument of the op, so it survives export.
        asked = torch.export.export(mla_compiler.rewrite(model, prompt, fp8_products=True), (prompt,))
        (node,) = _op_nodes(asked.graph, ops.sparse_attn_fp8kv)
        assert node.args[6:] == (512, None, None, 1)  # d_v, attn_sink, topk_length, fp8_products (one e4m3 term)


def test_a_graph_break_is_an_error_not_a_split():
    def broken(x):
        y = x.sin()
        torch._dynamo.graph_break()
        return y.cos()

    with pytest.raises(Exception, match="graph_break|graph break|Graph break"):
        mla_compiler.rewrite(broken, torch.randn(3))


@pytest.mark.inductor
@pytest.mark.skipif(DEVICE == "cuda", reason="on H200 with torch 2.11, aoti_load_package of this package segfaults in _load_aoti (the package builds); see the README")
def test_aot_inductor_package_runs(tmp_path):
    """AOTInductor packages the exported program; the op runs through the proxy executor, which
    calls its Python kernel: the package loads in a Python process that imported mla_compiler."""
    cfg = nam56r_small(n_layers=1)
    model = _model(cfg)
    tok = _tokens(cfg, 2, 8)
    ep = torch.export.export(mla_compiler.rewrite(model, tok), (tok,))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "mla.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        assert rel_err(loaded(tok), model(tok)) < TOL
