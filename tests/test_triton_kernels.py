"""Triton forward and backward against the pure-torch reference (CPU: Triton's interpreter).

The CPU interpreter's bf16 dot is wrong, so there the kernel casts dot operands to fp32
(``UPCAST``); everything else (gathers, masks, online softmax, atomics) runs as on the GPU.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

from mla_compiler import explain, make_backend  # noqa: E402
from mla_compiler.kernels import fp8_reference as fr  # noqa: E402
from mla_compiler.kernels import reference  # noqa: E402
from mla_compiler.kernels import triton_sparse_mla as tk  # noqa: E402
from mla_compiler.lowering.dispatch import Problem, choose_kernel  # noqa: E402
from mla_compiler.models import TinyMLAModel, nam56r_small  # noqa: E402
from test_sparse_attn_op import make_case  # noqa: E402

needs_interpreter_or_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() or tk.interpreted()), reason="needs CUDA or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SHAPES = {
    "deepseek-like 512+64/512": dict(t=6, heads=5, d_qk=576, d_v=512, s_kv=40, topk=19),
    "nam56r-like 128/64": dict(t=6, heads=6, d_qk=128, d_v=64, s_kv=50, topk=33),
    "two key groups, 40 wide": dict(t=7, heads=6, h_kv=2, d_qk=40, d_v=24, s_kv=23, topk=9),
    "one head, topk 3": dict(t=5, heads=1, d_qk=16, d_v=8, s_kv=9, topk=3),
    "40 heads: several head blocks": dict(t=4, heads=40, d_qk=40, d_v=24, s_kv=20, topk=7),
}


def _rel(a, b):
    a, b = a.double().nan_to_num(0.0), b.double().nan_to_num(0.0)
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _case(shape, dtype, seed=0):
    q, kv, idx, scale, d_v = make_case(dtype=torch.float64, seed=seed, **shape)
    return q.to(DEVICE, dtype), kv.to(DEVICE, dtype), idx.to(DEVICE), scale, d_v


@needs_interpreter_or_gpu
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extras", ["plain", "sink+topk_length"])
def test_kernels_match_reference(name, dtype, extras):
    q, kv, idx, scale, d_v = _case(SHAPES[name], dtype, seed=hash(name) % 100)
    t, heads = q.shape[:2]
    sink = topk_len = None
    if extras != "plain":
        g = torch.Generator().manual_seed(1)
        sink = torch.randn(heads, generator=g).to(DEVICE)
        topk_len = torch.randint(0, idx.shape[-1] + 1, (t,), generator=g, dtype=torch.int32).to(DEVICE)
    out, lse = tk.forward(q, kv, idx, scale, d_v, sink, topk_len)
    r_out, r_lse = reference.sparse_attn_reference(q, kv, idx, scale, d_v, sink, topk_len)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert not out.isnan().any()
    assert _rel(out, r_out) < tol
    torch.testing.assert_close(lse, r_lse, rtol=1e-5, atol=1e-5)  # +inf rows included
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # make_case's row with no valid index
    dout = torch.randn_like(r_out)
    dlse = torch.randn_like(r_lse)
    got = tk.backward(dout, dlse, q, kv, r_out, r_lse, idx, scale, d_v, sink, topk_len)
    want = reference.sparse_attn_backward_reference(dout, dlse, q, kv, r_out, r_lse, idx, scale, d_v, sink, topk_len)
    for a, b, what in zip(got, want, ("dq", "dkv", "dsink")):
        assert not a.isnan().any(), what
        assert _rel(a, b) < 3 * tol, what


SPLIT_SHAPES = dict(SHAPES, **{"long top-k: several blocks a split": dict(t=3, heads=5, d_qk=576, d_v=512, s_kv=170, topk=150)})


@needs_interpreter_or_gpu
@pytest.mark.parametrize("name", ["deepseek-like 512+64/512", "40 heads: several head blocks", "two key groups, 40 wide", "long top-k: several blocks a split"])
@pytest.mark.parametrize("splits", [2, 3])
def test_split_topk_matches_reference(name, splits):
    """Flash-decoding: SPLITS programs per (token, head block), merged by the combine kernel. With
    topk 19 and 16-key blocks, 3 splits leave the last one empty; with topk 150 every split walks
    several blocks (32-key blocks on the GPU: 2-3 a split); sink, topk_length, a row with no valid
    index and NaN in unselected KV rows are all in the case."""
    shape = dict(SPLIT_SHAPES[name], topk=max(SPLIT_SHAPES[name]["topk"], 19))
    q, kv, idx, scale, d_v = _case(shape, torch.float32, seed=splits)
    kv[0] = float("nan")  # make_case never selects row 0
    assert not ((idx == 0).any())
    t, heads = q.shape[:2]
    g = torch.Generator().manual_seed(splits)
    sink = torch.randn(heads, generator=g).to(DEVICE)
    topk_len = torch.randint(0, idx.shape[-1] + 1, (t,), generator=g, dtype=torch.int32).to(DEVICE)
    cfg = dict(tk.LaunchPolicy.forward(q.shape[-1], d_v, heads // kv.shape[1], q.dtype)[0], SPLITS=splits)
    for extras in ((None, None), (sink, topk_len)):
        out, lse = tk.forward(q, kv, idx, scale, d_v, *extras, launch=cfg)
        r_out, r_lse = reference.sparse_attn_reference(q, kv, idx, scale, d_v, *extras)
        assert not out.isnan().any()
        assert _rel(out, r_out) < 1e-5
        torch.testing.assert_close(lse, r_lse, rtol=1e-5, atol=1e-5)  # +inf rows included


def test_split_policy():
    """Split only when the programs do not fill the SMs; about 8 key blocks a split or more, none empty."""
    assert tk.LaunchPolicy.splits(programs=256, topk=2048, block_n=64, sms=132) == 1
    assert tk.LaunchPolicy.splits(programs=128, topk=2048, block_n=32, sms=132) == 2  # b64 at 16 heads
    assert tk.LaunchPolicy.splits(programs=4, topk=2048, block_n=64, sms=132) == 4  # 2048 / (8 * 64)
    assert tk.LaunchPolicy.splits(programs=32, topk=2048, block_n=32, sms=132) == 5
    assert tk.LaunchPolicy.splits(programs=1, topk=256, block_n=64, sms=132) == 1
    # never an empty split: 129 blocks over 16 wanted splits of 9 blocks leave 15 (the last has 3)
    assert tk.LaunchPolicy.splits(programs=4, topk=8200, block_n=64, sms=132) == 15


def test_fp8_launch_policy_on_gpu(monkeypatch):
    """The GPU's choice of FP8 dequantization form and first launch (measured on H200, see
    benchmarks/RESULTS.md): fp32 at 64-head blocks, folded row scale + prefetch for few heads with
    one scale per row, one stage for few heads with per-tile scales."""
    monkeypatch.setattr(tk, "interpreted", lambda: False)
    many = tk.LaunchPolicy.forward_fp8(576, 512, 128, torch.bfloat16, n_tiles=4)[0]
    assert many["DEQUANT"] == tk.DEQUANT_FP32 and many["BLOCK_H"] == 64 and "PREFETCH" not in many
    row_few = tk.LaunchPolicy.forward_fp8(576, 512, 16, torch.bfloat16, n_tiles=1)[0]
    assert row_few["DEQUANT"] == tk.DEQUANT_FOLD and row_few["PREFETCH"] and row_few["num_stages"] == 3
    tile_few = tk.LaunchPolicy.forward_fp8(576, 512, 16, torch.bfloat16, n_tiles=4)[0]
    assert tile_few["DEQUANT"] == tk.DEQUANT_FP32 and tile_few["num_stages"] == 1 and tile_few["BLOCK_N"] == 32


@needs_interpreter_or_gpu
def test_deterministic_backward_is_bitwise_repeatable(monkeypatch):
    q, kv, idx, scale, d_v = _case(SHAPES["two key groups, 40 wide"], torch.float32, seed=4)
    out, lse = reference.sparse_attn_reference(q, kv, idx, scale, d_v)
    dout = torch.randn_like(out)
    atomic = tk.backward(dout, None, q, kv, out, lse, idx, scale, d_v)
    monkeypatch.setenv(tk.ENV_DETERMINISTIC, "1")
    first = tk.backward(dout, None, q, kv, out, lse, idx, scale, d_v)
    second = tk.backward(dout, None, q, kv, out, lse, idx, scale, d_v)
    assert torch.equal(first[1], second[1]) and torch.equal(first[0], second[0])
    assert _rel(first[1], atomic[1]) < 1e-6


def test_dispatch_rules(monkeypatch):
    cpu = Problem("cpu", torch.bfloat16, 576, 512, 128, 1, 2048)
    cuda = Problem("cuda", torch.bfloat16, 576, 512, 128, 1, 2048)
    monkeypatch.delenv("MLA_COMPILER_KERNEL", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert choose_kernel(cpu).name == "reference"
    assert choose_kernel(cuda).name == "triton"
    # explain names the member of the family the shapes lead to
    assert "warp-specialized" in choose_kernel(Problem("cuda", torch.bfloat16, 576, 512, 128, 1, 2048)).reason
    assert "few-head" in choose_kernel(Problem("cuda", torch.bfloat16, 576, 512, 16, 1, 2048, fp8_layout=(512, 64, 4))).reason
    assert choose_kernel(Problem("cuda", torch.bfloat16, 128, 64, 16, 1, 2048)).reason.endswith("(forward: Triton)")
    assert choose_kernel(Problem("cuda", torch.float64, 576, 512, 128, 1, 2048)).reason.startswith("fallback")
    monkeypatch.setenv("MLA_COMPILER_KERNEL", "reference")
    assert choose_kernel(cuda).name == "reference"
    monkeypatch.setenv("MLA_COMPILER_KERNEL", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        choose_kernel(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_kernel(cpu).name == "triton"
    monkeypatch.setenv("MLA_COMPILER_KERNEL", "cutlass")
    with pytest.raises(ValueError, match="MLA_COMPILER_KERNEL"):
        choose_kernel(cpu)


@needs_interpreter_or_gpu
def test_compiled_model_runs_the_triton_kernel(monkeypatch):
    """Forced Triton: explain names it, and a compiled training step matches eager."""
    monkeypatch.setenv("MLA_COMPILER_KERNEL", "triton")
    torch.manual_seed(0)
    cfg = nam56r_small(n_layers=1, index_topk=24)
    model = TinyMLAModel(cfg).to(DEVICE)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), device=DEVICE)
    report = explain(model, tokens)
    assert [s.kernel for s in report.sites] == ["triton"]
    torch._dynamo.reset()
    calls = []
    real = tk.forward
    monkeypatch.setattr(tk, "forward", lambda *a: calls.append(1) or real(*a))
    from mla_compiler.lowering import dispatch

    dispatch._REGISTRY.pop("triton", None)  # re-register with the spy
    compiled = torch.compile(model, backend=make_backend(inner="aot_eager"))
    got, want = compiled(tokens), model(tokens)
    assert calls and _rel(got, want) < 1e-5
    params = list(model.parameters())
    g_got = torch.autograd.grad(got.square().mean(), params, allow_unused=True)
    g_want = torch.autograd.grad(want.square().mean(), params, allow_unused=True)
    for a, b in zip(g_got, g_want):
        if b is not None:
            assert _rel(a, b) < 1e-4
    dispatch._REGISTRY.pop("triton", None)


@needs_interpreter_or_gpu
def test_backward_in_token_chunks(monkeypatch):
    """The backward bounds its dS/P scratch by walking tokens in chunks; chunking changes nothing."""
    q, kv, idx, scale, d_v = _case(SHAPES["nam56r-like 128/64"], torch.float32, seed=9)
    out, lse = reference.sparse_attn_reference(q, kv, idx, scale, d_v)
    dout = torch.randn_like(out)
    whole = tk.backward(dout, None, q, kv, out, lse, idx, scale, d_v)
    monkeypatch.setattr(tk, "SCRATCH_BYTES", 2 * 6 * 33 * 4 * 2)  # two tokens per chunk
    chunked = tk.backward(dout, None, q, kv, out, lse, idx, scale, d_v)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


needs_40gib = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
                                 reason="needs a CUDA GPU with 40 GiB")


@needs_40gib
@pytest.mark.parametrize("warp_specialized", ["0", "1"])
def test_token_offsets_past_int32(monkeypatch, warp_specialized):
    """Query and output elements of the last tokens lie past 2^31: their row offsets must be 64-bit
    (an int32 t * stride wraps and reads or writes another token's rows)."""
    from mla_compiler.kernels import gluon_sparse_mla as ws

    monkeypatch.setenv(ws.ENV_OFF, warp_specialized)
    t, heads, s_kv, topk = 29200, 128, 4096, 64  # q: t * heads * 576 = 2.15e9 elements
    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(t, heads, 576, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(s_kv, 1, 576, device="cuda", dtype=torch.bfloat16, generator=g)
    idx = torch.randint(0, s_kv, (t, 1, topk), device="cuda", dtype=torch.int32, generator=g)
    out, lse = tk.forward(q, kv, idx, 0.05, 512)
    expected = "gluon warp-specialized" if warp_specialized == "1" and ws.declines(q, kv[:, 0, :512], None, kv[:, 0, 512:], 512) is None else "triton"
    assert tk.LAST_LAUNCH["forward"].get("kernel", "triton") == expected
    for rows in (slice(0, 3), slice(t - 3, t)):
        ref_out, ref_lse = reference.sparse_attn_reference(q[rows], kv, idx[rows], 0.05, 512)
        assert _rel(out[rows], ref_out) < 1e-2
        assert (lse[rows] - ref_lse).abs().max().item() < 1e-3
    del out, lse
    # The FP8 forward (FlashMLA's layout) over the same queries.
    latent, scale, rope = fr.flashmla_views(fr.quantize_flashmla(kv[:, 0, :512].float(), kv[:, 0, 512:]))
    out, lse = tk.forward_fp8(q, latent, scale, rope, idx, 0.05, 512)
    for rows in (slice(0, 3), slice(t - 3, t)):
        ref_out, ref_lse = fr.sparse_attn_fp8kv_reference(q[rows], latent, scale, rope, idx[rows], 0.05, 512)
        assert _rel(out[rows], ref_out) < 1e-2
        assert (lse[rows] - ref_lse).abs().max().item() < 1e-3


@needs_40gib
def test_backward_offsets_past_int32():
    """The three backward passes where q's offsets pass 2^31. The last tokens alone select keys
    from the cache's upper half, so those dKV rows are theirs and the reference on just those
    tokens gives them (and their dQ)."""
    t, heads, s_kv, topk, tail = 29200, 128, 4096, 64, 3
    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(t, heads, 576, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(s_kv, 1, 576, device="cuda", dtype=torch.bfloat16, generator=g)
    idx = torch.randint(0, s_kv // 2, (t, 1, topk), device="cuda", dtype=torch.int32, generator=g)
    idx[-tail:] = torch.randint(s_kv // 2, s_kv, (tail, 1, topk), device="cuda", dtype=torch.int32, generator=g)
    idx[-tail:, :, ::5] = -1
    out, lse = tk.forward(q, kv, idx, 0.05, 512)
    dout = torch.randn_like(out)
    dq, dkv, _ = tk.backward(dout, None, q, kv, out, lse, idx, 0.05, 512)
    rows, upper = slice(t - tail, t), slice(s_kv // 2, s_kv)
    ref_dq, ref_dkv, _ = reference.sparse_attn_backward_reference(dout[rows], None, q[rows], kv, out[rows], lse[rows], idx[rows], 0.05, 512)
    assert _rel(dq[rows], ref_dq) < 2e-2
    assert _rel(dkv[upper], ref_dkv[upper]) < 2e-2
