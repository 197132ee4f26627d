"""The FP8-MMA forward (e4m3 products, gluon_fp8_mma.py): its reference's roundings are the ones
documented and its error against the exact FP8 reference is bounded (CPU); it compiles for Hopper
with e4m3 MMAs (CPU, no GPU needed); it declines with reasons; on a Hopper GPU it matches its
reference on awkward inputs."""

import pytest
import torch
from conftest import compiled_for_hopper, rel_err

from mla_compiler.kernels import fp8_reference as fr
from mla_compiler.kernels import gluon_common
from mla_compiler.kernels import gluon_fp8_mma as fm
from mla_compiler.kernels.awkward_inputs import awkward_inputs, extreme_scales, poison_unselected, zero_some_scales

hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not hopper, reason="needs a Hopper GPU")
SCALE = 576**-0.5


def _row_keys(heads: int, topk: int, device: str, extreme: bool = False, t: int = 6, s_kv: int = 3000):
    q, kv, idx = awkward_inputs(t=t, heads=heads, topk=topk, s_kv=s_kv, device=device)
    if extreme:
        q, kv = extreme_scales(q, kv)
    latent, scale, rope = fr.quantize_keys(kv, "row")
    if not extreme:
        poison_unselected(latent, scale, rope)
    return q, latent, scale, rope, idx


def _zero_scale_keys(device: str, heads: int = 64, topk: int = 200):
    """Row keys with some selected keys' scales 0 (``zero_some_scales``)."""
    q, latent, scale, rope, idx = _row_keys(heads, topk, device)
    zero_some_scales(scale, rope, idx)
    return q, latent, scale, rope, idx


def test_lazy_reference_moves_only_past_the_headroom():
    inf = float("inf")
    k = torch.tensor([-inf, 0.0, 0.0, 3.0, -inf])
    w = torch.tensor([5.3, 7.9, 8.5, -100.0, -inf])
    moved, factor = fm.lazy_reference(w, k)
    # From nothing to ceil(w) - LAZY_LOW (P' <= 2^LAZY_LOW); kept while P' <= 2^8; moved again past
    # it; kept where the block is smaller; still nothing where no key was valid.
    low = fm.LAZY_LOW
    assert 0 <= low < fm.P_HEADROOM_LOG2
    assert moved.tolist() == [6.0 - low, 0.0, 9.0 - low, 3.0, -inf]
    assert factor.tolist() == [1.0, 1.0, 2.0 ** (low - 9), 1.0, 1.0]


def test_lazy_reference_is_as_accurate_as_the_eager_one():
    # P' under a reference that rarely moves rounds at other places than under the running
    # maximum and the block's exponent, but no worse: against the exact FP8 arithmetic, the same
    # error (the kernel's LAZY_RESCALE=1 is checked against this emulation on the GPU).
    q, latent, scale, rope, idx = _row_keys(80, 200, "cpu")
    exact, _ = fr.sparse_attn_fp8kv_reference(q, latent, scale, rope, idx, SCALE, fr.LATENT, exact_keys=True)
    eager, eager_lse = fm.reference_fp8_mma(q, latent, scale, rope, idx, SCALE, block_n=128)
    lazy, lazy_lse = fm.reference_fp8_mma(q, latent, scale, rope, idx, SCALE, block_n=128, lazy=True)
    assert rel_err(lazy, exact) < 1.1 * rel_err(eager, exact), (rel_err(lazy, exact), rel_err(eager, exact))
    fin = torch.isfinite(eager_lse)
    assert torch.equal(fin, torch.isfinite(lazy_lse)) and (lazy_lse[fin] - eager_lse[fin]).abs().max() < 1e-4
    assert (lazy[2] == 0).all()


def test_pow2_ceil_and_q_rows_are_exact():
    x = torch.tensor([1.0, 1.5, 0.75, 2.0**-130, 3.0e38, 0.0])
    assert fm.pow2_ceil(x).tolist() == [1.0, 2.0, 1.0, 2.0**-126, float("inf"), 0.0]
    q = torch.randn(3, 5, 512) * torch.logspace(-3, 3, 5)[None, :, None]
    q[1, 2] = 0
    q8, scale = fm.quantize_q_rows(q.to(torch.bfloat16))
    assert scale[1, 2] == 1 and (q8[1, 2].float() == 0).all()
    assert (torch.log2(scale) == torch.round(torch.log2(scale))).all()  # powers of two
    amax = q.to(torch.bfloat16).float().abs().amax(-1)
    used = amax / scale
    assert (used <= 448).all() and (used[amax > 0] >= 224).all()  # x / scale fits e4m3 and uses its top binade
    # e4m3 keeps 3 mantissa bits: within 2^-4 of each value (above the subnormal range).
    err = (q8.float() * scale[..., None] - q.to(torch.bfloat16).float()).abs()
    assert (err <= 2.0**-4 * q.to(torch.bfloat16).float().abs() + 2.0**-9 * scale[..., None]).all()


@pytest.mark.parametrize("extreme", [False, True], ids=["random", "extreme-scales"])
def test_reference_error_against_the_exact_fp8_reference(extreme):
    # The two extra roundings (Q and P in e4m3) against the FP8 reference with exact keys: on
    # random inputs about the keys' own rounding (3.5e-2 measured, the keys 3.4e-2 against bf16
    # keys); with extreme scales (heads 1e-2 .. 10, key rows 2^-20 .. 2^4) the scores reach
    # hundreds and Q's rounding moves them by units (out 0.176, lse up to 4.3 measured).
    q, latent, scale, rope, idx = _row_keys(64, 200, "cpu", extreme, t=4, s_kv=1000)
    out, lse = fm.reference_fp8_mma(q, latent, scale, rope, idx, SCALE)
    ref_out, ref_lse = fr.sparse_attn_fp8kv_reference(q, latent, scale, rope, idx, SCALE, fr.LATENT, exact_keys=True)
    assert out.isfinite().all() and (lse[2] == float("inf")).all() and (out[2] == 0).all()
    assert rel_err(out, ref_out) < (0.25 if extreme else 0.05)
    fin = torch.isfinite(ref_lse)
    assert (lse[fin] - ref_lse[fin]).abs().max() < (8.0 if extreme else 0.05)


def test_two_e4m3_terms_keep_bf16_values_exactly():
    # A bf16 value (8 significant bits) under its row's power-of-two scale is the rounded value
    # (4 bits) plus its residual (at most the other 4), both e4m3, while the residual is no finer
    # than e4m3's subnormal step 2^-9: everywhere from 2^-2 of e4m3's range up.
    q = (torch.randn(20, 512) * torch.logspace(-2, 2, 20)[:, None]).to(torch.bfloat16)
    _, qs = fm.quantize_q_rows(q)
    y = q.float() / qs[:, None]
    two = fm.e4m3_terms(y, terms=2)
    assert torch.equal(two[y.abs() >= 0.25], y[y.abs() >= 0.25])
    assert ((two - y).abs() <= 2.0**-10).all()
    one = fm.e4m3_terms(y)
    assert torch.equal(one, y.to(torch.float8_e4m3fn).float()) and not torch.equal(one, y)


@pytest.mark.parametrize("extreme", [False, True], ids=["random", "extreme-scales"])
def test_two_term_reference_is_the_exact_fp8_arithmetic(extreme):
    # Q and P' as two e4m3 terms: the e4m3 roundings' error is gone, what is left is P' below
    # e4m3's subnormal step and the order of the sums (measured 1.8e-3 random, 7.9e-4 extreme,
    # against 3.6e-2 and 0.18 with one term).
    q, latent, scale, rope, idx = _row_keys(64, 200, "cpu", extreme, t=4, s_kv=1000)
    ref_out, ref_lse = fr.sparse_attn_fp8kv_reference(q, latent, scale, rope, idx, SCALE, fr.LATENT, exact_keys=True)
    one, _ = fm.reference_fp8_mma(q, latent, scale, rope, idx, SCALE, block_n=64, lazy=True)
    out, lse = fm.reference_fp8_mma(q, latent, scale, rope, idx, SCALE, block_n=64, lazy=True, terms=2)
    assert out.isfinite().all() and (lse[2] == float("inf")).all() and (out[2] == 0).all()
    assert rel_err(out, ref_out) < 5e-3 and rel_err(out, ref_out) < rel_err(one, ref_out) / 10
    fin = torch.isfinite(ref_lse)
    assert (lse[fin] - ref_lse[fin]).abs().max() < 1e-3
    with pytest.raises(ValueError, match="terms=2: 1, or 2 with lazy=True"):
        fm.reference_fp8_mma(q, latent, scale, rope, idx, SCALE, terms=2)


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_reference_keeps_keys_whose_scale_is_zero(lazy):
    # The lazy form takes P' = P sigma and recovers P from P' / sigma: a selected key with scale 0
    # must still count in the sums (its scale is floored at 2^-64 there), as in the exact reference.
    q, latent, scale, rope, idx = _zero_scale_keys("cpu")
    out, lse = fm.reference_fp8_mma(q, latent, scale, rope, idx, SCALE, block_n=128, lazy=lazy)
    ref_out, ref_lse = fr.sparse_attn_fp8kv_reference(q, latent, scale, rope, idx, SCALE, fr.LATENT, exact_keys=True)
    fin = torch.isfinite(ref_lse)
    assert (lse[fin] - ref_lse[fin]).abs().max() < 0.05
    assert rel_err(out, ref_out) < 0.05 and out[4].abs().max() < 1e-12
    # The inputs can tell: with token 3's zero-scale keys dropped, its lse moves by far more.
    dropped = idx.clone()
    dropped[3, 0, ::3] = -1
    _, lse_dropped = fr.sparse_attn_fp8kv_reference(q, latent, scale, rope, dropped, SCALE, fr.LATENT, exact_keys=True)
    assert (lse_dropped[3] - ref_lse[3]).abs().max() > 0.5


def test_reference_keeps_small_scaled_keys_that_dominate():
    # One key with a large scale but a very low score beside keys with scales 2^-20 smaller that
    # carry the softmax mass: P's exponent is per row (from P sigma, not sigma alone), so the
    # small keys' P' stays in e4m3's normal range and the output is theirs.
    torch.manual_seed(0)
    q = torch.randn(1, 64, 576).to(torch.bfloat16)
    kv = torch.randn(70, 1, 576).to(torch.bfloat16) * 2.0**-20
    kv[5] = -q[0, 0] * 4  # large and anti-aligned with head 0
    latent, scale, rope = fr.quantize_keys(kv, "row")
    idx = torch.arange(64, dtype=torch.int32).view(1, 1, 64)
    out, _ = fm.reference_fp8_mma(q, latent, scale, rope, idx, SCALE)
    ref_out, _ = fr.sparse_attn_fp8kv_reference(q, latent, scale, rope, idx, SCALE, fr.LATENT, exact_keys=True)
    # An exponent from the scales alone flushes the small keys' P' to 0: error 1.0.
    assert rel_err(out[0, 0], ref_out[0, 0]) < 0.1


def test_declines_with_reasons(monkeypatch):
    q = torch.randn(2, 128, 576, dtype=torch.bfloat16)
    kv = torch.randn(64, 1, 576, dtype=torch.bfloat16)
    assert fm.declines(q, kv[:, 0, :512], None, kv[:, 0, 512:], 512) in ("not a CUDA tensor", "this Triton has no Gluon dialect")
    monkeypatch.setattr(fm, "platform_problem", lambda *a: None)
    assert "bf16 keys" in fm.declines(q, kv[:, 0, :512], None, kv[:, 0, 512:], 512)
    tiles = fr.quantize_keys(kv, "flashmla")
    assert "quantize the cache with layout 'row'" in fm.declines(q, *tiles, 512)
    rows = fr.quantize_keys(kv, "row")
    assert fm.declines(q, *rows, 512) is None
    assert "heads" in fm.declines(q[:, :32], *rows, 512)
    assert "attn_sink" in fm.declines(q, *rows, 512, attn_sink=torch.zeros(128))
    # The FP8 forward hands it a call only where the programs fill the SMs; forward() runs any.
    assert fm.dispatch_declines(q, *rows, 512) is None
    monkeypatch.setattr(gluon_common, "sm_count", lambda device: 132)  # 2 tokens x 2 head blocks
    assert fm.declines(q, *rows, 512) is None
    assert "4 programs for 132 SMs" in fm.dispatch_declines(q, *rows, 512)
    assert "bf16 keys" in fm.dispatch_declines(q, kv[:, 0, :512], None, kv[:, 0, 512:], 512)
    monkeypatch.undo()
    monkeypatch.setenv(fm.ENV_OFF, "0")
    assert fm.declines(q, *rows, 512) == f"{fm.ENV_OFF}=0"


@pytest.mark.skipif(not fm.HAVE_GLUON, reason="this Triton has no Gluon dialect")
def test_compiles_for_hopper_with_e4m3_products():
    script = (
        "import json; from mla_compiler.kernels import gluon_fp8_mma as fm\n"
        "c = fm.compile_for_hopper()\n"
        "ptx = c.asm['ptx']\n"
        "kinds = ('m64n32k32.f32.e4m3.e4m3', 'm64n128k32.f32.e4m3.e4m3', 'm64n32k16.f32.bf16.bf16')\n"
        "print(json.dumps(dict(shared=c.metadata.shared, setmaxnreg='setmaxnreg' in ptx,\n"
        "                      mma={k: ptx.count('wgmma.mma_async.sync.aligned.' + k) for k in kinds})))\n"
    )
    info = compiled_for_hopper(script)
    assert info["shared"] <= 227 * 1024 and info["setmaxnreg"], info
    # Each consumer warpgroup: Q K^T over 512 latent columns as 16 e4m3 steps, P V as four e4m3
    # 64 x 128 products (a key half by a 128-column accumulator), the rope product as four bf16 steps.
    assert info["mma"] == {"m64n32k32.f32.e4m3.e4m3": 32, "m64n128k32.f32.e4m3.e4m3": 8, "m64n32k16.f32.bf16.bf16": 8}, info


def _assert_matches_emulation(out, lse, ref_out, ref_lse, lse_tol: float = 1e-2, out_tol: float = 1.5e-2):
    """The kernel against reference_fp8_mma: the same roundings, but e4m3 products accumulate in
    the tensor cores' reduced precision and exp2 is approximate, so some P' entries round to the
    neighbouring e4m3 value (2^-3 of the entry): out within 1.5e-2 (relative L2; 6.0e-3 to
    7.2e-3 measured on H200 over these inputs), lse within ``lse_tol``; token 2 (no valid index)
    lse +inf and out 0."""
    fin = torch.isfinite(ref_lse)
    assert rel_err(out, ref_out) < out_tol, rel_err(out, ref_out)
    dl = (lse[fin] - ref_lse[fin]).abs().max().item()
    assert dl < lse_tol, f"lse differs from the reference by {dl:.3g}"
    assert (lse[2] == float("inf")).all() and (out[2] == 0).all()


@needs_hopper
@pytest.mark.parametrize("launch", [None, dict(fm.ONE_PRODUCER), dict(fm.ONE_PRODUCER, CONSUMER_REGS=208, PRODUCER_REGS=88),
                                    dict(fm.ONE_PRODUCER, SPLIT=0),
                                    dict(fm.ONE_PRODUCER, SPLIT=0, BLOCK_N=32, STAGES=6, VT_STAGES=2, AHEAD=5),
                                    dict(fm.ONE_PRODUCER, SPLIT=0, BLOCK_N=32, STAGES=5, VT_STAGES=3, AHEAD=4),
                                    dict(fm.ONE_PRODUCER, STAGES=3, VT_STAGES=1, AHEAD=2), dict(STAGES=3, VT_STAGES=1), dict(VT_STAGES=3)],
                         ids=["default", "one-producer", "one-producer-regs-208-88", "whole-64", "whole-32-s6-a5", "whole-32-s5-vt3",
                              "one-producer-s3-vt1-a2", "s3-vt1", "vt3"])
@pytest.mark.parametrize("heads, topk", [(80, 200), (128, 2048), (64, 64), (192, 63), (64, 1)])
def test_matches_its_reference_on_awkward_inputs(heads, topk, launch):
    q, latent, scale, rope, idx = _row_keys(heads, topk, "cuda")
    out, lse = fm.forward(q, latent, scale, rope, idx, SCALE, launch=launch)
    block_n = dict(fm.LAUNCH, **(launch or {}))["BLOCK_N"]
    _assert_matches_emulation(out, lse, *fm.reference_fp8_mma(q, latent, scale, rope, idx, SCALE, block_n=block_n))
    # Against exact FP8 keys: Q's and P's roundings add about the keys' own error (3.2e-2 to
    # 3.5e-2 measured here; the layout alone gives 3.4e-2 against bf16 keys).
    ref_out, _ = fr.sparse_attn_fp8kv_reference(q, latent, scale, rope, idx, SCALE, fr.LATENT, exact_keys=True)
    assert rel_err(out, ref_out) < 0.05


@needs_hopper
@pytest.mark.parametrize("launch", [None, dict(fm.ONE_PRODUCER), dict(fm.ONE_PRODUCER, SPLIT=0, BLOCK_N=32, STAGES=6, VT_STAGES=2, AHEAD=5)],
                         ids=["default", "one-producer", "whole-32"])
def test_keeps_extreme_scales(launch):
    q, latent, scale, rope, idx = _row_keys(80, 200, "cuda", extreme=True)
    out, lse = fm.forward(q, latent, scale, rope, idx, SCALE, launch=launch)
    block_n = dict(fm.LAUNCH, **(launch or {}))["BLOCK_N"]
    assert out.isfinite().all()
    # Scores here reach hundreds (base 2): the products' reduced-precision accumulation moves the
    # lse by up to ~0.2 (0.155 measured on H200), the output stays within 1e-2.
    _assert_matches_emulation(out, lse, *fm.reference_fp8_mma(q, latent, scale, rope, idx, SCALE, block_n=block_n), lse_tol=0.5)


@needs_hopper
@pytest.mark.parametrize("launch", [None, dict(fm.ONE_PRODUCER)], ids=["default", "one-producer"])
def test_keeps_keys_whose_scale_is_zero(launch):
    q, latent, scale, rope, idx = _zero_scale_keys("cuda")
    out, lse = fm.forward(q, latent, scale, rope, idx, SCALE, launch=launch)
    _assert_matches_emulation(out, lse, *fm.reference_fp8_mma(q, latent, scale, rope, idx, SCALE))
    assert out[4].abs().max() < 1e-12


def _shared_wavefronts(reg_bases, lane_bases, warp_bases, offset_of, vector_dim: int) -> tuple[int, int]:
    """(wavefronts, ideal) of a register layout's shared accesses (bases as [key, column] pairs,
    one dimension each; 1 byte an element), its vector the register bases 1, 2, 4, .. of
    ``vector_dim`` (accesses of 4, 8 or 16 bytes, checked contiguous and aligned): per access instruction and
    lane phase (32 lanes for 4-byte accesses, 16 for 8, 8 for 16), the most distinct 4-byte words
    one bank serves, summed over instructions and warps."""
    from test_shared_bank_layouts import _xor

    vec = []
    while len(vec) < 4 and [1 << len(vec) if d == vector_dim else 0 for d in (0, 1)] in reg_bases:
        vec.append(reg_bases.index([1 << len(vec) if d == vector_dim else 0 for d in (0, 1)]))
    width = 1 << len(vec)
    other = [i for i in range(len(reg_bases)) if i not in vec]
    lanes_at_once = {4: 32, 8: 16, 16: 8}[width]

    def at(reg, lane, warp):
        return offset_of(tuple(a ^ b ^ c for a, b, c in zip(_xor(reg_bases, reg), _xor(lane_bases, lane), _xor(warp_bases, warp))))

    total = 0
    for warp in range(1 << len(warp_bases)):
        for r in range(1 << len(other)):
            reg = sum(1 << other[j] for j in range(len(other)) if r >> j & 1)
            starts = []
            for lane in range(32):
                run = [at(reg | sum(1 << vec[j] for j in range(len(vec)) if k >> j & 1), lane, warp) for k in range(width)]
                assert run == list(range(run[0], run[0] + width)) and run[0] % width == 0, "a vector is not one aligned run"
                starts.append(run[0])
            for g in range(0, 32, lanes_at_once):
                banks: dict = {}
                for start in starts[g:g + lanes_at_once]:
                    for w in range(width // 4):
                        banks.setdefault((start // 4 + w) % 32, set()).add(start // 4 + w)
                total += max(len(words) for words in banks.values())
    return total, (1 << (len(reg_bases) + len(lane_bases) + len(warp_bases))) // 128


@pytest.mark.skipif(not fm.HAVE_GLUON, reason="this Triton has no Gluon dialect")
def test_transpose_layout_takes_twice_the_ideal_shared_wavefronts():
    # The producer's transpose against Triton's own swizzled layouts: the key rows (128-byte
    # swizzle) read in 4-byte runs, the transposed tile (64 keys a row, 64-byte swizzle) written
    # in 16-byte runs, each at 2x the ideal wavefronts; the former layout (8 x 4 a thread, into two
    # 32-key tiles) wrote at 4x.
    from test_shared_bank_layouts import _offsets, _triton_linear
    from triton.experimental.gluon import language as gl

    rows = _offsets(_triton_linear(gl.NVMMASharedLayout.get_default_for([64, 512], gl.float8e4nv), [64, 512]))
    tile = _offsets(_triton_linear(gl.NVMMASharedLayout.get_default_for([256, 64], gl.float8e4nv), [256, 64]))
    t = fm.TRANSPOSE_LAYOUT.value
    bases = (t.reg_bases, t.lane_bases, t.warp_bases)
    assert set(map(tuple, t.reg_bases)) >= {(0, 1), (0, 2), (1, 0), (2, 0), (4, 0), (8, 0)}
    loads = _shared_wavefronts(*bases, lambda kc: rows[kc], vector_dim=1)
    stores = _shared_wavefronts(*bases, lambda kc: tile[(kc[1], kc[0])], vector_dim=0)
    assert loads == (128, 64) and stores == (128, 64), (loads, stores)
    # The former: BlockedLayout([4, 8], [8, 4], [1, 4]) over [32 keys, 128 columns], tiles [512, 32].
    half = _offsets(_triton_linear(gl.NVMMASharedLayout.get_default_for([512, 32], gl.float8e4nv), [512, 32]))
    old = ([[0, 1], [0, 2], [0, 4], [1, 0], [2, 0]], [[0, 8], [0, 16], [4, 0], [8, 0], [16, 0]], [[0, 32], [0, 64]])
    assert _shared_wavefronts(*old, lambda kc: half[(kc[1], kc[0])], vector_dim=0) == (128, 32)


@pytest.mark.skipif(not fm.HAVE_GLUON, reason="this Triton has no Gluon dialect")
def test_shared_memory_is_the_compilers_count():
    # Settings at the edge of sm_90's 227 KB are judged by what the compiler allocates: whole scores
    # with three raw-row slots fit (232,328 bytes with Triton 3.6), four slots do not.
    script = (
        "import json; from mla_compiler.kernels import gluon_fp8_mma as fm\n"
        "out = {}\n"
        "for name, cfg in (('fits', dict(fm.ONE_PRODUCER, SPLIT=0, STAGES=3, AHEAD=2)), ('over', dict(STAGES=4, AHEAD=3))):\n"
        "    try:\n"
        "        out[name] = fm.compile_for_hopper(cfg).metadata.shared\n"
        "    except ValueError as e:\n"
        "        out[name] = str(e)\n"
        "print(json.dumps(out))\n"
    )
    info = compiled_for_hopper(script)
    assert isinstance(info["fits"], int) and info["fits"] <= fm.SHARED_LIMIT, info
    assert "shared memory, over sm_90's" in info["over"] and "STAGES" in info["over"], info


def test_launch_settings_are_checked():
    fm.check_launch(dict(fm.LAUNCH))
    for bad, words in ((dict(CONSUMER_REGS=220), "multiple of 8"), (dict(CONSUMER_REGS=216), "<= 512"),
                       (dict(fm.ONE_PRODUCER, CONSUMER_REGS=232), "<= 504"),
                       (dict(PROBE_SKIP=3), "PROBE_SKIP=3"), (dict(STAGE=3), "unknown"),
                       (dict(fm.ONE_PRODUCER, BLOCK_N=48), "BLOCK_N=48"), (dict(fm.ONE_PRODUCER, BLOCK_N=32), "SPLIT=1"),
                       (dict(AHEAD=2), "AHEAD=2"), (dict(VT_STAGES=0), "VT_STAGES=0"),
                       (dict(fm.ONE_PRODUCER, PROBE_SKIP=2, SPLIT=0), "split consumers only"),
                       (dict(SPLIT=0, BLOCK_N=32), "SPLIT=1 only"), (dict(COPIER_REGS=60), "multiple of 8")):
        with pytest.raises(ValueError, match=words):
            fm.check_launch(dict(fm.LAUNCH, **bad))
    # Settings the GPU tests and the probe run are accepted.
    for good in (dict(STAGES=3, VT_STAGES=1, AHEAD=2), dict(fm.ONE_PRODUCER, SPLIT=0, BLOCK_N=32, STAGES=6, AHEAD=5), dict(PROBE_SKIP=2),
                 dict(fm.ONE_PRODUCER), dict(fm.ONE_PRODUCER, STAGES=3, VT_STAGES=1, AHEAD=2)):
        fm.check_launch(dict(fm.LAUNCH, **good))


def test_dispatch_names_it_only_when_asked_for(monkeypatch):
    # MLA_COMPILER_FP8_MMA=1 is an explicit choice (e4m3 Q and P cost accuracy): unset, the FP8
    # forward at 128 heads stays with the dequantizing warp-specialized kernel.
    from mla_compiler.kernels import triton_sparse_mla as tk
    from mla_compiler.lowering.dispatch import Problem

    def member(layout):
        return tk.forward_member(Problem("cuda", torch.bfloat16, 576, 512, 128, 1, 2048, fp8_layout=layout))

    monkeypatch.delenv(fm.ENV_OFF, raising=False)
    assert not fm.asked_for() and "warp-specialized" in member((512, 64, 1))
    monkeypatch.setenv(fm.ENV_OFF, "1")
    assert fm.asked_for() and "FP8-products" in member((512, 64, 1))
    # FlashMLA's four tile scales: this kernel declines them, so the report does not name it.
    assert "warp-specialized" in member((512, 64, 4))
    assert fm.product_terms() == 1 and "e4m3 Q and P" in member((512, 64, 1))
    monkeypatch.setenv(fm.ENV_OFF, "2")  # Q and P as two e4m3 terms each
    assert fm.product_terms() == 2 and "two e4m3 terms" in member((512, 64, 1))
    monkeypatch.setenv(fm.ENV_OFF, "0")
    assert not fm.asked_for() and fm.product_terms() == 0
    # Asked for by the call (make_backend(fp8_products=True)), without the environment variable.
    monkeypatch.delenv(fm.ENV_OFF)
    asked = Problem("cuda", torch.bfloat16, 576, 512, 128, 1, 2048, fp8_layout=(512, 64, 1), fp8_products=True)
    assert fm.asked_for(True) and "FP8-products" in tk.forward_member(asked) and "fp8_products" in tk.forward_member(asked)
    two = Problem("cuda", torch.bfloat16, 576, 512, 128, 1, 2048, fp8_layout=(512, 64, 1), fp8_products=2)
    assert fm.product_terms(2) == 2 and "fp8_products: Q and P as two e4m3 terms" in tk.forward_member(two)
    monkeypatch.setenv(fm.ENV_OFF, "0")  # switched off: the report names the kernel that runs instead
    assert "warp-specialized" in tk.forward_member(asked)


@needs_hopper
def test_fp8_op_takes_it_when_asked_for(monkeypatch):
    from mla_compiler.kernels import triton_sparse_mla as tk

    q, kv, idx = awkward_inputs(t=200, heads=128, topk=300, s_kv=3000, device="cuda")
    rows, tiles = fr.quantize_keys(kv, "row"), fr.quantize_keys(kv, "flashmla")
    monkeypatch.setenv(fm.ENV_OFF, "1")
    out, lse = torch.ops.sparse_mla.sparse_attn_fp8kv(q, *rows, idx, SCALE, 512)
    assert tk.LAST_LAUNCH["forward_fp8"]["kernel"] == "gluon FP8 products"
    assert "P_STAGES" in tk.LAST_LAUNCH["forward_fp8"]  # scores and values apart (gluon_fp8_mma_split)
    from mla_compiler.kernels import gluon_fp8_mma_split as fs

    _assert_matches_emulation(out.float(), lse, *fm.reference_fp8_mma(q, *rows, idx, SCALE, **fs.reference_settings()))
    # A layout it declines goes to the dequantizing kernel, the reason kept.
    torch.ops.sparse_mla.sparse_attn_fp8kv(q, *tiles, idx, SCALE, 512)
    assert tk.LAST_LAUNCH["forward_fp8"]["kernel"] == "gluon warp-specialized"
    assert "layout 'row'" in tk.FP8_MMA_DECLINED["forward_fp8"]
    # Not asked for: the dequantizing kernel.
    monkeypatch.delenv(fm.ENV_OFF)
    torch.ops.sparse_mla.sparse_attn_fp8kv(q, *rows, idx, SCALE, 512)
    assert tk.LAST_LAUNCH["forward_fp8"]["kernel"] == "gluon warp-specialized"
    assert "forward_fp8" not in tk.FP8_MMA_DECLINED  # not consulted: the old reason is gone
    # Asked for by the call (make_backend(fp8_products=True) lowers to this), no environment variable.
    out_asked, _ = torch.ops.sparse_mla.sparse_attn_fp8kv(q, *rows, idx, SCALE, 512, fp8_products=True)
    assert tk.LAST_LAUNCH["forward_fp8"]["kernel"] == "gluon FP8 products"
    assert out_asked.equal(out)
    # Two e4m3 terms (make_backend(fp8_products="two_term")): the split kernel's RESIDUAL_LAUNCH.
    out_two, lse_two = torch.ops.sparse_mla.sparse_attn_fp8kv(q, *rows, idx, SCALE, 512, fp8_products=2)
    assert tk.LAST_LAUNCH["forward_fp8"]["kernel"] == "gluon FP8 products" and tk.LAST_LAUNCH["forward_fp8"]["RESIDUALS"] == 1
    _assert_matches_emulation(out_two.float(), lse_two,
                              *fm.reference_fp8_mma(q, *rows, idx, SCALE, **fs.reference_settings(fs.RESIDUAL_LAUNCH)))


@needs_hopper
def test_backend_option_runs_it_in_a_compiled_model(monkeypatch):
    # make_backend(fp8_products=True) end to end, no environment variable: a one-layer model of
    # V3.2's widths at 128 heads with an e4m3 cache (one scale a token), its 128-token prefill
    # compiled, runs the products kernel, close to what the dequantizing kernel gives.
    from mla_compiler import make_backend
    from mla_compiler.kernels import triton_sparse_mla as tk
    from mla_compiler.models import TinyMLAModel, deepseek_v32_small

    monkeypatch.delenv(fm.ENV_OFF, raising=False)
    cfg = deepseek_v32_small(n_layers=1, n_heads=128)
    torch.manual_seed(0)
    model = TinyMLAModel(cfg).eval().to("cuda", torch.bfloat16)
    prompt = torch.randint(0, cfg.vocab_size, (1, 128), device="cuda")
    logits, kernel = {}, {}
    for products in (False, True, "two_term"):
        model.allocate_cache(1, 256, kv_format="float8", device="cuda")
        torch._dynamo.reset()
        with torch.no_grad():
            logits[products] = torch.compile(model, backend=make_backend(inner="eager", fp8_products=products))(prompt).float()
        kernel[products] = (tk.LAST_LAUNCH["forward_fp8"]["kernel"], tk.LAST_LAUNCH["forward_fp8"].get("RESIDUALS"))
    assert kernel == {False: ("gluon warp-specialized", None), True: ("gluon FP8 products", 0),
                      "two_term": ("gluon FP8 products", 1)}, kernel
    one, two = rel_err(logits[True], logits[False]), rel_err(logits["two_term"], logits[False])
    print(f"logits against the dequantizing kernel's: one term {one:.2e}, two terms {two:.2e}")
    assert one < 5e-2, one
    # Two e4m3 terms: closer to the dequantizing kernel's arithmetic than one (H200: 2.43e-3
    # against 4.24e-3; the logits pass the output projection, which both share).
    assert two < 1e-2 and two < 0.75 * one, (two, one)
