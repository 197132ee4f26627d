"""The FP8-MMA forward without transposed keys (O^T = V^T P'^T, gluon_fp8_mma_vregs.py): its
value-operand layout is the A fragment it claims to be and reads shared memory without bank
conflicts it could avoid (CPU); it compiles for Hopper with e4m3 products and no transposes (CPU);
on a Hopper GPU it matches reference_fp8_mma on awkward inputs, as gluon_fp8_mma does."""

import random
import re

import pytest
from conftest import compiled_for_hopper, rel_err
from test_gluon_fp8_mma import SCALE, _assert_matches_emulation, _row_keys, _shared_wavefronts, _zero_scale_keys, hopper

from mla_compiler.kernels import fp8_reference as fr
from mla_compiler.kernels import gluon_fp8_mma as fm
from mla_compiler.kernels import gluon_fp8_mma_vregs as fv

needs_hopper = pytest.mark.skipif(not hopper, reason="needs a Hopper GPU")
needs_gluon = pytest.mark.skipif(not fv.HAVE_GLUON, reason="this Triton has no Gluon dialect")
PAIRS = dict(STEP_KEYS=128)
ONE_BLOCK = dict(STEP_KEYS=64)


def _fragment_owner(m: int, k: int) -> tuple[int, int]:
    """(warp, lane) holding element [m, k] of a [256, 32] e4m3 wgmma A operand in registers (PTX
    ISA, wgmma register fragments for .e4m3 A: a warp's 16 rows per 64-row product, lanes 4 g + c
    holding rows g and g + 8, keys 4 c .. 4 c + 3 and + 16)."""
    warp, row = (m % 64) // 16, m % 16
    g, c = row % 8, (k % 16) // 4
    return warp, 4 * g + c


def _spread_key(k: int) -> int:
    """The key of the products' key k under KEY_ORDER=1 (k's bits 1, 2, 4, 8, 16 -> 1, 8, 2, 4, 16)."""
    return (k & 1) | (k >> 1 & 1) << 3 | (k >> 2 & 1) << 1 | (k >> 3 & 1) << 2 | (k & 16)


@needs_gluon
@pytest.mark.parametrize("spread", [False, True], ids=["slot-order", "spread"])
def test_value_load_layout_is_the_a_fragment_with_rows_regrouped(spread):
    # The load layout over [32 keys, 256 columns], with column 4 r + q taken as A row 64 q + r (and
    # with KEY_ORDER=1 key _spread_key(k) as A column k), puts every element in the warp and lane
    # that holds it in wgmma's A fragment: the regrouping in registers (_v_operand) moves no data
    # between threads.
    lay = (fv.V_LOAD_LAYOUT_SPREAD if spread else fv.V_LOAD_LAYOUT).value
    to_k = {(_spread_key(k) if spread else k): k for k in range(32)}

    def element(reg, lane, warp):
        pos = [0, 0]
        for bases, bits in ((lay.reg_bases, reg), (lay.lane_bases, lane), (lay.warp_bases, warp)):
            for j, base in enumerate(bases):
                if bits >> j & 1:
                    pos = [pos[0] ^ base[0], pos[1] ^ base[1]]
        return tuple(pos)

    seen = set()
    for warp in range(4):
        for lane in range(32):
            for reg in range(1 << len(lay.reg_bases)):
                key, col = element(reg, lane, warp)
                m = 64 * (col % 4) + col // 4
                assert _fragment_owner(m, to_k[key]) == (warp, lane), (reg, lane, warp)
                seen.add((key, col))
    assert len(seen) == 32 * 256


def _prmt(a: int, b: int, selector: int) -> int:
    """PTX prmt.b32 (default mode): result byte i is byte (selector's nibble i) & 7 of {b, a}."""
    pool = (b << 32 | a).to_bytes(8, "little")
    return int.from_bytes(bytes(pool[selector >> 4 * i & 7] for i in range(4)), "little")


def _run_prmt_block(ptx: str, inputs: list[int]) -> list[int]:
    """The words a block of prmt.b32 instructions leaves in $0 .. $3, from $4 .. $7 = inputs."""
    regs = {f"${4 + i}": w for i, w in enumerate(inputs)}
    for dst, a, b, sel in re.findall(r"prmt\.b32\s+(\S+),\s*(\S+),\s*(\S+),\s*(0x[0-9a-fA-F]+);", ptx):
        regs[dst] = _prmt(regs[a], regs[b], int(sel, 16))
    return [regs[f"${i}"] for i in range(4)]


def test_byte_transpose_ptx_transposes_four_words():
    # V's A fragments take byte q of four key rows' words as word q (``_transposed_words``).
    assert fv.BYTE_TRANSPOSE_PTX.count("prmt.b32") == 8
    gen = random.Random(0)
    for _ in range(200):
        words = [gen.getrandbits(32) for _ in range(4)]
        out = _run_prmt_block(fv.BYTE_TRANSPOSE_PTX, words)
        expected = [int.from_bytes(bytes(w.to_bytes(4, "little")[q] for w in words), "little") for q in range(4)]
        assert out == expected, (words, out, expected)


@needs_gluon
def test_packed_transpose_takes_four_columns_of_a_key():
    # pack=4 hands the PTX four elements in a thread's register order; the transpose means "columns
    # 4 r .. 4 r + 3 of one key" only while the load layout's first two register bases are the
    # columns' two lowest bits. Keys +1 and +8 (one A register's keys) are split off in registers.
    bases = fv.V_LOAD_LAYOUT_SPREAD.value.reg_bases
    assert bases[:2] == [[0, 1], [0, 2]] and [1, 0] in bases and [8, 0] in bases


@needs_gluon
def test_value_loads_are_4_byte_runs_without_bank_conflicts_in_key_order_1():
    from test_shared_bank_layouts import _offsets, _triton_linear
    from triton.experimental.gluon import language as gl

    rows = _offsets(_triton_linear(gl.NVMMASharedLayout.get_default_for([64, 512], gl.float8e4nv), [64, 512]))
    found = []
    for lay in (fv.V_LOAD_LAYOUT.value, fv.V_LOAD_LAYOUT_SPREAD.value):
        found.append(_shared_wavefronts(lay.reg_bases, lay.lane_bases, lay.warp_bases, lambda kc: rows[kc], vector_dim=1))
    # In slot order a load's four key rows are 4 apart, and rows 8 apart share the 128-byte
    # swizzle's phase: twice the ideal. Spread, the rows are 2 apart: the ideal.
    assert found == [(128, 64), (64, 64)], found


@needs_gluon
@pytest.mark.parametrize("step_keys", [64, 128])
def test_compiles_for_hopper_without_transposes(step_keys):
    script = (
        "import json; from mla_compiler.kernels import gluon_fp8_mma_vregs as fv\n"
        f"c = fv.compile_for_hopper(dict(STEP_KEYS={step_keys}))\n"
        "ptx = c.asm['ptx']\n"
        "kinds = ('m64n32k32.f32.e4m3.e4m3', 'm64n64k32.f32.e4m3.e4m3', 'm64n32k16.f32.bf16.bf16', 'm64n64k16.f32.bf16.bf16')\n"
        "print(json.dumps(dict(shared=c.metadata.shared, setmaxnreg='setmaxnreg' in ptx,\n"
        "                      mma={k: ptx.count('wgmma.mma_async.sync.aligned.' + k) for k in kinds},\n"
        "                      stores=[ptx.count('st.global.' + w) for w in ('v4.b32', 'b32', 'b16')])))\n"
    )
    info = compiled_for_hopper(script)
    assert info["shared"] <= fm.SHARED_LIMIT and info["setmaxnreg"], info
    # O^T regrouped to [heads, columns] before it is stored: 16-byte stores (64 x 512 x 2 bytes
    # over 256 threads) besides the lse's two, none of 2 bytes.
    assert info["stores"] == [32, 2, 0], info
    # Each consumer: Q K^T as 16 e4m3 steps, the rope as 4 bf16 steps (over 32 keys a step of one
    # block, over 64 with STEP_KEYS=128), and V^T P'^T as four 64-row products (its 256 value
    # columns) for each 32 keys of the step, 64 heads wide.
    scores = "m64n32k32.f32.e4m3.e4m3" if step_keys == 64 else "m64n64k32.f32.e4m3.e4m3"
    rope = "m64n32k16.f32.bf16.bf16" if step_keys == 64 else "m64n64k16.f32.bf16.bf16"
    expected = {k: 0 for k in info["mma"]}
    expected[scores] += 32
    expected["m64n64k32.f32.e4m3.e4m3"] += 16 * step_keys // 64
    expected[rope] += 8
    assert info["mma"] == expected, info


def test_launch_settings_are_checked():
    fv.check_launch(dict(fv.LAUNCH))
    assert fv.launch_settings(ONE_BLOCK)["RELEASE_EARLY"] == 0  # 128-key step settings
    assert fv.launch_settings(ONE_BLOCK)["FUSED_SOFTMAX"] == fv.launch_settings(ONE_BLOCK)["LAZY_RESCALE"] == 0
    assert fv.launch_settings(dict(FUSED_SOFTMAX=0))["LAZY_RESCALE"] == 0
    for bad, words in ((dict(CONSUMER_REGS=236), "multiple of 8"), (dict(CONSUMER_REGS=240), "<= 504"),
                       (dict(AHEAD=4), "AHEAD=4"), (dict(AHEAD=0), "AHEAD=0"), (dict(VT_STAGES=2), "unknown"),
                       (dict(KEY_ORDER=2), "KEY_ORDER=2"), (dict(STEP_KEYS=96), "STEP_KEYS=96"),
                       (dict(STEP_KEYS=128, STAGES=3), "even number"), (dict(STEP_KEYS=64, RELEASE_EARLY=1), "RELEASE_EARLY"),
                       (dict(RELEASE_EARLY=2), "RELEASE_EARLY=2"),
                       (dict(STEP_KEYS=128, STAGES=4, AHEAD=2), "AHEAD=1"),
                       (dict(V_AFTER_WAIT=2), "V_AFTER_WAIT=2"), (dict(Q_IN_CONSUMERS=2), "Q_IN_CONSUMERS=2"),
                       (dict(FUSED_SOFTMAX=2), "FUSED_SOFTMAX=2"), (dict(ONE_BLOCK, RELEASE_EARLY=0, FUSED_SOFTMAX=1), "FUSED_SOFTMAX=1 takes STEP_KEYS=128"),
                       (dict(LAZY_RESCALE=2), "LAZY_RESCALE=2"), (dict(FUSED_SOFTMAX=0, LAZY_RESCALE=1), "takes FUSED_SOFTMAX=1")):
        with pytest.raises(ValueError, match=words):
            fv.check_launch(dict(fv.LAUNCH, **bad))


@needs_hopper
@pytest.mark.parametrize("launch", [ONE_BLOCK, dict(ONE_BLOCK, KEY_ORDER=0), dict(ONE_BLOCK, STAGES=3, AHEAD=2),
                                    dict(ONE_BLOCK, STAGES=2, AHEAD=1, CONSUMER_REGS=216, PRODUCER_REGS=72), dict(ONE_BLOCK, V_AFTER_WAIT=0),
                                    None, dict(PAIRS, V_AFTER_WAIT=0), dict(PAIRS, KEY_ORDER=0),
                                    dict(PAIRS, STAGES=2, CONSUMER_REGS=232, PRODUCER_REGS=40), dict(RELEASE_EARLY=0),
                                    dict(RELEASE_EARLY=0, KEY_ORDER=0), dict(Q_IN_CONSUMERS=0), dict(ONE_BLOCK, Q_IN_CONSUMERS=0),
                                    dict(FUSED_SOFTMAX=0), dict(LAZY_RESCALE=0)],
                         ids=["one-block", "one-block-slot-order", "one-block-s3-a2", "one-block-s2-a1", "one-block-v-during-scores",
                              "pairs", "pairs-v-after-softmax", "pairs-slot-order", "pairs-s2-232", "pairs-release-at-end",
                              "pairs-release-at-end-slot-order", "pairs-q-before-partitions", "one-block-q-before-partitions",
                              "pairs-unfused-softmax", "pairs-rescale-every-step"])
@pytest.mark.parametrize("heads, topk", [(80, 200), (128, 2048), (64, 64), (192, 63), (64, 1)])
def test_matches_its_reference_on_awkward_inputs(heads, topk, launch):
    q, latent, scale, rope, idx = _row_keys(heads, topk, "cuda")
    out, lse = fv.forward(q, latent, scale, rope, idx, SCALE, launch=launch)
    ref = fv.reference_settings(launch)
    _assert_matches_emulation(out, lse, *fm.reference_fp8_mma(q, latent, scale, rope, idx, SCALE, **ref))
    ref_out, _ = fr.sparse_attn_fp8kv_reference(q, latent, scale, rope, idx, SCALE, fr.LATENT, exact_keys=True)
    assert rel_err(out, ref_out) < 0.05
    if ref["block_n"] == 64:
        # The transposing kernel: the same arithmetic, summed in another order.
        twin, twin_lse = fm.forward(q, latent, scale, rope, idx, SCALE)
        assert rel_err(out, twin) < 1e-2


@needs_hopper
@pytest.mark.parametrize("launch", [ONE_BLOCK, PAIRS, dict(PAIRS, FUSED_SOFTMAX=0), dict(PAIRS, LAZY_RESCALE=0)],
                         ids=["one-block", "pairs", "pairs-unfused-softmax", "pairs-rescale-every-step"])
def test_keeps_extreme_scales(launch):
    q, latent, scale, rope, idx = _row_keys(80, 200, "cuda", extreme=True)
    out, lse = fv.forward(q, latent, scale, rope, idx, SCALE, launch=launch)
    assert out.isfinite().all()
    ref = fv.reference_settings(launch)
    emulated = fm.reference_fp8_mma(q, latent, scale, rope, idx, SCALE, **ref)
    if not ref["lazy"]:
        _assert_matches_emulation(out, lse, *emulated, lse_tol=0.5)
        return
    # Under the lazy reference k (an integer, not the row's running maximum) the tensor cores'
    # error on scores of hundreds shifts every P' of a row against the emulation's e4m3 grid, so
    # the roundings differ entry by entry (2.8e-2 from the emulation, measured on H200). The
    # kernel must still be as close to the exact FP8 arithmetic as the emulation is.
    _assert_matches_emulation(out, lse, *emulated, lse_tol=0.5, out_tol=4e-2)
    exact, _ = fr.sparse_attn_fp8kv_reference(q, latent, scale, rope, idx, SCALE, fr.LATENT, exact_keys=True)
    assert rel_err(out, exact) < 1.2 * rel_err(emulated[0], exact), (rel_err(out, exact), rel_err(emulated[0], exact))


@needs_hopper
@pytest.mark.parametrize("launch", [None, ONE_BLOCK, dict(LAZY_RESCALE=0), dict(FUSED_SOFTMAX=0)],
                         ids=["pairs", "one-block", "pairs-rescale-every-step", "pairs-unfused-softmax"])
def test_keeps_keys_whose_scale_is_zero(launch):
    # The fused and lazy softmax take the sums from P' / sigma: a selected key with scale 0 must
    # not drop out of them (the producer floors its scale at 2^-64 there).
    q, latent, scale, rope, idx = _zero_scale_keys("cuda")
    out, lse = fv.forward(q, latent, scale, rope, idx, SCALE, launch=launch)
    _assert_matches_emulation(out, lse, *fm.reference_fp8_mma(q, latent, scale, rope, idx, SCALE, **fv.reference_settings(launch)))
    assert out[4].abs().max() < 1e-12
