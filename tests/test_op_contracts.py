"""``torch.library.opcheck`` on every op the backend emits: schema, fake kernel, autograd
registration and ``aot_dispatch_dynamic``, per kernel (reference, Triton) and device."""

import pytest
import torch

import mla_compiler  # noqa: F401 - registers torch.ops.sparse_mla
from mla_compiler.kernels import fp8_reference as fr
from test_sparse_attn_op import make_case

ops = torch.ops.sparse_mla

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _triton_runs_here(device: str) -> bool:
    try:
        from mla_compiler.kernels import triton_sparse_mla as tk
    except ImportError:
        return False
    return device == "cuda" or tk.interpreted()


# (device, kernel): the reference everywhere; the Triton kernels on CUDA, and on CPU through the
# interpreter (CI). opcheck runs each op several times, so the interpreted shapes stay small.
CASES = [(d, "reference") for d in DEVICES] + [(d, "triton") for d in DEVICES if _triton_runs_here(d)]


@pytest.fixture(params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def where(request, monkeypatch):
    device, kernel = request.param
    monkeypatch.setenv("MLA_COMPILER_KERNEL", kernel)
    return device, kernel


def _case(device, kernel, **shape):
    dtype = torch.float64 if kernel == "reference" else torch.float32
    q, kv, idx, scale, d_v = make_case(dtype=dtype, **shape)
    # opcheck compares runs with each other; NaN in unselected rows would compare unequal.
    kv = torch.nan_to_num(kv)
    return q.to(device), kv.to(device), idx.to(device), scale, d_v


SHAPES = [dict(), dict(t=4, heads=6, h_kv=2, topk=5, d_v=40, d_qk=40, s_kv=17)]


@pytest.mark.parametrize("shape", SHAPES, ids=["odd-heads", "two-groups"])
def test_sparse_attn(where, shape):
    q, kv, idx, scale, d_v = _case(*where, **shape)
    torch.library.opcheck(ops.sparse_attn, (q.requires_grad_(), kv.requires_grad_(), idx, scale, d_v))


def test_sparse_attn_with_sink_and_topk_length(where):
    device, _ = where
    q, kv, idx, scale, d_v = _case(*where)
    t, heads = q.shape[:2]
    sink = torch.randn(heads, dtype=torch.float32, device=device, requires_grad=True)
    topk_length = torch.randint(0, idx.shape[-1] + 1, (t,), dtype=torch.int32, device=device)
    torch.library.opcheck(ops.sparse_attn, (q.requires_grad_(), kv.requires_grad_(), idx, scale, d_v), {"attn_sink": sink, "topk_length": topk_length})


def test_sparse_attn_bwd(where):
    # The backward op is not differentiable again (no double backward), so its inputs do not
    # require grad; opcheck still checks its schema, fake kernel and tracing.
    q, kv, idx, scale, d_v = _case(*where)
    out, lse = ops.sparse_attn(q, kv, idx, scale, d_v)
    dout = torch.randn_like(out)
    torch.library.opcheck(ops.sparse_attn_bwd, (dout, None, q, kv, out, lse, idx, scale, d_v))
    dlse = torch.randn_like(lse).masked_fill(torch.isinf(lse), 0.0)
    torch.library.opcheck(ops.sparse_attn_bwd, (dout, dlse, q, kv, out, lse, idx, scale, d_v))


@pytest.mark.parametrize("fmt", ["flashmla", "rowwise"])
def test_sparse_attn_fp8kv(where, fmt):
    device, kernel = where
    g = torch.Generator().manual_seed(5)
    s_kv, t, heads, topk = 19, 3, 3, 7
    lat, rope = torch.randn(s_kv, 512, generator=g), torch.randn(s_kv, 64, generator=g)
    if fmt == "flashmla":
        kv_lat, kv_scale, kv_rope = fr.flashmla_views(fr.quantize_flashmla(lat, rope))
    else:
        (kv_lat, kv_scale), kv_rope = fr.quantize_rowwise(lat), rope.bfloat16()
    q = torch.randn(t, heads, 576, generator=g).bfloat16()
    idx = torch.randint(0, s_kv, (t, 1, topk), generator=g, dtype=torch.int32)
    idx[0, 0, ::2] = -1
    idx[1] = s_kv  # a row with nothing valid
    args = [x.to(device) for x in (q, kv_lat, kv_scale, kv_rope, idx)]
    # Forward only (an FP8 cache is for inference): inputs do not require grad. opcheck's
    # test_schema detects mutation with torch.allclose, which has no float8 kernel; the same
    # check is done here on the bytes (no input changed, no output aliases an input).
    before = [a.view(torch.uint8).clone() if a.dtype == torch.float8_e4m3fn else a.clone() for a in args]
    outs = ops.sparse_attn_fp8kv(*args, 0.07, 512)
    for a, b in zip(args, before):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a, b)
    storages = {a.untyped_storage().data_ptr() for a in args}
    assert not any(o.untyped_storage().data_ptr() in storages for o in outs)
    torch.library.opcheck(
        ops.sparse_attn_fp8kv, (*args, 0.07, 512), test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    )


def test_flashmla_cache_ops(where):
    device, _ = where
    g = torch.Generator().manual_seed(6)
    lat, rope = torch.randn(2, 5, 512, generator=g).to(device), torch.randn(2, 5, 64, generator=g).to(device)
    torch.library.opcheck(ops.flashmla_kv_quant, (lat, rope))
    torch.library.opcheck(ops.flashmla_kv_dequant, (ops.flashmla_kv_quant(lat, rope),))
