"""The canonical op against a dense fp64 reference: values, lse, gradients, edge cases, contract."""

import math

import pytest
import torch

import mla_compiler  # noqa: F401 - registers torch.ops.sparse_mla
from mla_compiler.errors import SparseAttnArgumentError
from dense_reference import dense_sparse_attn

sparse_attn = torch.ops.sparse_mla.sparse_attn


def make_case(t=7, heads=5, d_qk=40, d_v=24, s_kv=23, h_kv=1, topk=11, seed=0, dtype=torch.float64):
    """Fresh random inputs with every invalid-index kind, an empty row, duplicates and NaN in
    key rows that no index selects (row 0 among them: a careless gather reads it for -1)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, heads, d_qk, generator=g, dtype=torch.float64).to(dtype)
    kv = torch.randn(s_kv, h_kv, d_qk, generator=g, dtype=torch.float64).to(dtype)
    idx = torch.randint(1, s_kv - 2, (t, h_kv, topk), generator=g, dtype=torch.int32)
    fillers = torch.tensor([-1, s_kv, -(2**31), 2**31 - 1, -123456, s_kv + 5], dtype=torch.int32)
    holes = torch.rand(t, h_kv, topk, generator=g) < 0.3
    idx = torch.where(holes, fillers[torch.randint(0, len(fillers), (t, h_kv, topk), generator=g)], idx)
    idx[1] = fillers[0]  # a row with no valid index
    idx[2, :, 1] = idx[2, :, 0]  # a duplicate
    unused = torch.ones(s_kv, dtype=torch.bool)
    unused[idx.clamp(0, s_kv - 1)[(idx >= 0) & (idx < s_kv)].long()] = False
    unused[0] = True
    idx = torch.where(idx == 0, 1, idx)  # keep row 0 unused (and NaN)
    kv[unused] = float("nan")
    return q, kv, idx, 1.0 / math.sqrt(d_qk), d_v


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout, allow_unused=True)


@pytest.mark.parametrize(
    "shape",
    [
        dict(),  # odd heads, topk 11 (not a power of two), d_v < d_qk
        dict(heads=6, h_kv=2, topk=9, d_v=40),  # two key groups, d_v == d_qk
        dict(t=5, heads=1, topk=3, s_kv=9, d_qk=16, d_v=8),  # one head
    ],
)
def test_forward_and_backward_match_dense_reference(shape):
    q, kv, idx, scale, d_v = make_case(**shape)
    q.requires_grad_(True)
    kv.requires_grad_(True)
    out, lse = sparse_attn(q, kv, idx, scale, d_v)
    ref_out, ref_lse = dense_sparse_attn(q, kv, idx, scale, d_v)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, ref_out.to(out.dtype), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isposinf(lse[1]).all()
    dout = torch.randn_like(out)
    dq, dkv = _grads(out, (q, kv), dout)
    rq, rkv = _grads(ref_out, (q, kv), dout)
    # lse is saved in fp32 (the op's contract), so recomputed probabilities carry ~1e-7 error.
    torch.testing.assert_close(dq, rq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.nan_to_num(dkv, nan=123.0), torch.nan_to_num(rkv, nan=123.0), rtol=1e-5, atol=1e-6)
    assert not dq.isnan().any() and not dkv.isnan().any()


def test_attn_sink_and_topk_length():
    q, kv, idx, scale, d_v = make_case(heads=4, seed=3)
    sink = torch.randn(4, dtype=torch.float32)
    sink[0] = float("inf")  # FlashMLA: a +inf sink zeroes the head's output
    lengths = torch.tensor([11, 11, 4, 0, 7, 11, 1], dtype=torch.int32)
    q.requires_grad_(True)
    kv.requires_grad_(True)
    sink_p = sink.clone().requires_grad_(True)
    out, lse = sparse_attn(q, kv, idx, scale, d_v, sink_p, lengths)
    ref_out, ref_lse = dense_sparse_attn(q, kv, idx, scale, d_v, sink_p, lengths)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse.float())
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))
    dout = torch.randn_like(out)
    finite = torch.isfinite(sink)
    got = _grads(out, (q, kv, sink_p), dout)
    want = _grads(ref_out, (q, kv, sink_p), dout)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.nan_to_num(got[1], nan=0.0), torch.nan_to_num(want[1], nan=0.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2][finite], want[2][finite].float(), rtol=1e-5, atol=1e-6)


def test_gradient_of_lse():
    q, kv, idx, scale, d_v = make_case(seed=5)
    kv = torch.nan_to_num(kv)
    q.requires_grad_(True)
    kv.requires_grad_(True)
    out, lse = sparse_attn(q, kv, idx, scale, d_v)
    ref_out, ref_lse = dense_sparse_attn(q, kv, idx, scale, d_v)
    w_out, w_lse = torch.randn_like(out), torch.randn_like(lse)
    finite = torch.isfinite(lse)
    loss = (out * w_out).sum() + (torch.where(finite, lse, 0) * w_lse).sum()
    ref_loss = (ref_out * w_out).sum() + (torch.where(finite, ref_lse, 0) * w_lse).sum()
    for a, b in zip(torch.autograd.grad(loss, (q, kv)), torch.autograd.grad(ref_loss, (q, kv))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision_inputs(dtype):
    q, kv, idx, scale, d_v = make_case(dtype=dtype, seed=7)
    out, lse = sparse_attn(q, kv, idx, scale, d_v)
    ref_out, _ = dense_sparse_attn(q, kv, idx, scale, d_v)
    assert out.dtype == dtype and lse.dtype == torch.float32
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)


def test_reference_bounds_gathered_slice(monkeypatch):
    """The reference never gathers more than its budget of [T, topk, d_qk] at once."""
    from mla_compiler.kernels import reference

    seen = []
    real = reference._gather_chunk

    def spy(q, kv, indices, topk_length, t0, t1, acc):
        seen.append(t1 - t0)
        return real(q, kv, indices, topk_length, t0, t1, acc)

    monkeypatch.setattr(reference, "GATHER_BUDGET_BYTES", 3 * 11 * 40 * 8)
    monkeypatch.setattr(reference, "_gather_chunk", spy)
    q, kv, idx, scale, d_v = make_case()
    out, _ = sparse_attn(q, kv, idx, scale, d_v)
    ref_out, _ = dense_sparse_attn(q, kv, idx, scale, d_v)
    assert max(seen) == 3 and sum(seen) == q.shape[0]
    torch.testing.assert_close(out, ref_out)


@pytest.mark.parametrize(
    "change, argument, words",
    [
        (lambda a: {**a, "q": a["q"][0]}, "q", "rank 2"),
        (lambda a: {**a, "kv": a["kv"][..., :-1]}, "kv", "d_qk"),
        (lambda a: {**a, "indices": a["indices"].float()}, "indices", "floating dtype"),
        (lambda a: {**a, "indices": a["indices"].long()}, "indices", "int32"),
        (lambda a: {**a, "d_v": 41}, "d_v", "d_v <= d_qk"),
        (lambda a: {**a, "d_v": 0}, "d_v", "outside"),
        (lambda a: {**a, "kv": a["kv"].float()}, "kv", "dtype"),
        (lambda a: {**a, "indices": a["indices"][:3]}, "indices", "rows"),
        (lambda a: {**a, "attn_sink": torch.zeros(3)}, "attn_sink", "[H]"),
        (lambda a: {**a, "topk_length": torch.zeros(7)}, "topk_length", "int32"),
    ],
)
def test_bad_input_names_the_argument(change, argument, words):
    q, kv, idx, scale, d_v = make_case()
    args = change(dict(q=q, kv=kv, indices=idx, sm_scale=scale, d_v=d_v))
    with pytest.raises(SparseAttnArgumentError) as err:
        sparse_attn(**args)
    assert f"argument '{argument}'" in str(err.value) and words in str(err.value)


def test_bad_input_fails_at_compile_time_too():
    """The fake kernel runs the same checks, so a compiled call fails while tracing."""
    q, kv, idx, scale, d_v = make_case(dtype=torch.float32)

    def f(q, kv, idx):
        return sparse_attn(q, kv, idx, scale, 50)[0]

    with pytest.raises(Exception) as err:
        torch.compile(f, backend="aot_eager")(q, kv, idx)
    assert "argument 'd_v'" in str(err.value)
