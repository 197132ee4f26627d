"""The few-head (Gluon) forward: it compiles for Hopper with the installed Triton (CPU, no GPU
needed), it declines what it does not take with a reason, and on a GPU it matches the references
on awkward inputs (invalid indices, a token with none valid, NaN in unselected rows, head counts
that are not a multiple of 16, top-k that is not a multiple of the block) for bf16 keys and both
FP8 layouts, with and without top-k splits, and the forward entry points dispatch to it."""

import re

import pytest
import torch
from conftest import compiled_for_hopper

from mla_compiler.kernels import fp8_reference as fr
from mla_compiler.kernels import gluon_fewhead as fh
from mla_compiler.kernels import reference
from mla_compiler.kernels import triton_sparse_mla as tk
from mla_compiler.kernels.awkward_inputs import (assert_fp8_forward_matches, assert_matches, awkward_inputs, poison_unselected,
                                                 zero_some_scales)

needs_gluon = pytest.mark.skipif(not fh.HAVE_GLUON, reason="this Triton has no Gluon dialect")
hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_gpu = pytest.mark.skipif(not hopper, reason="needs a Hopper GPU")
SCALE = 576**-0.5


@needs_gluon
def test_compiles_for_hopper_with_16_byte_copies():
    script = (
        "import json; from mla_compiler.kernels import gluon_fewhead as fh\n"
        "out = {}\n"
        "for name, fp8, tiles, launch in (('bf16', False, 1, None), ('fp8-tiles', True, 4, dict(WS=False)), ('fp8-rows', True, 1, dict(WS=False)),\n"
        "                                  ('fp8-rows-3-slots', True, 1, dict(STAGES=3, WS=False)), ('bf16-8-warps', False, 1, dict(NUM_WARPS=8)),\n"
        "                                  ('fp8-tiles-ws', True, 4, None), ('fp8-rows-ws-3-slots', True, 1, dict(WS=True, STAGES=3)),\n"
        "                                  ('fp8-tiles-ws-q-from-shared', True, 4, dict(Q_HELD=False)), ('fp8-tiles-ws-wgmma', True, 4, dict(WGMMA=True)),\n"
        "                                  ('fp8-rows-ws-wgmma-3-splits', True, 1, dict(WGMMA=True, SPLITS=3)),\n"
        "                                  ('fp8-tiles-ws-wgmma-1-tile', True, 4, dict(WGMMA=True, TILES=1, STAGES=5)),\n"
        "                                  ('fp8-tiles-ws-wgmma-l2-ahead', True, 4, dict(WGMMA=True, L2_AHEAD=4)),\n"
        "                                  ('fp8-tiles-ws-wgmma-unsplit', True, 4, dict(WGMMA=True, SPLITS=1)),\n"
        "                                  ('fp8-tiles-ws-wgmma-bf16-tiles', True, 4, dict(WGMMA=True, F16=False)),\n"
        "                                  ('fp8-rows-ws-wgmma-bf16-tiles-3-splits', True, 1, dict(WGMMA=True, F16=False, SPLITS=3)),\n"
        "                                  ('fp8-tiles-ws-wgmma-8-dequantizing-warps', True, 4, dict(WGMMA=True, DQ_WARPS=8)),\n"
        "                                  ('fp8-tiles-ws-rega', True, 4, dict(REG_A=True)), ('fp8-rows-ws-rega-unsplit', True, 1, dict(REG_A=True, SPLITS=1))):\n"
        "    c = fh.compile_for_hopper(fp8, tiles, launch)\n"
        "    ptx = c.asm['ptx']\n"
        "    cfg = fh.launch_settings(fp8, launch)\n"
        "    need = fh.shared_bytes(fp8, tiles, cfg['BLOCK_N'], cfg['STAGES'], 2048 // (cfg['BLOCK_N'] * cfg.get('SPLITS', 2)), cfg['WS'], cfg['WGMMA'], cfg.get('TILES', 2), cfg.get('F16', False), cfg.get('REG_A', False))\n"
        "    out[name] = dict(shared=c.metadata.shared, need=need, mma=ptx.count('mma.sync') + ptx.count('wgmma.mma_async'), wide=ptx.count(', 0x10,'),\n"
        "                     narrow=ptx.count(', 0x4,') + ptx.count(', 0x8,'), byte_loads=ptx.count('ld.shared.b8'),\n"
        "                     partitions=ptx.count('setmaxnreg.dec'))\n"
        "print(json.dumps(out))\n"
    )
    for name, info in compiled_for_hopper(script).items():
        assert info["shared"] <= info["need"] <= 227 * 1024, (name, info)  # the host's estimate covers what it allocates
        # No FP8 byte read one at a time (WS: one byte is the partition's state the warp-specialize runtime reads).
        assert info["mma"] > 0 and info["byte_loads"] == (1 if info["partitions"] else 0), (name, info)
        # The key rows move 16 bytes a copy; only the FP8 scales (4 bytes a row and tile) are narrower.
        assert info["wide"] > 0, (name, info)
        assert info["narrow"] == 0 or name.startswith("fp8"), (name, info)
        # WS: the dequantizing partition gives registers back (its own register budget).
        assert (info["partitions"] > 0) == ("-ws" in name), (name, info)


def test_declines_with_reasons(monkeypatch):
    q = torch.randn(4, 16, 576, dtype=torch.bfloat16)
    kv = torch.randn(64, 576, dtype=torch.bfloat16)
    assert fh.declines(q, kv[:, :512], None, kv[:, 512:], 512) in ("not a CUDA tensor", "this Triton has no Gluon dialect")
    monkeypatch.setenv(fh.ENV_OFF, "0")
    assert fh.declines(q, kv[:, :512], None, kv[:, 512:], 512) == f"{fh.ENV_OFF}=0"
    with pytest.raises(ValueError, match="indices: dtype torch.int64"):
        fh.forward(q, kv[:, :512], None, kv[:, 512:], torch.zeros(4, 1, 8, dtype=torch.int64), SCALE)
    odd = torch.empty(64, 584, dtype=torch.bfloat16)[:, 4:580]  # rows 8 bytes off 16-byte alignment
    with pytest.raises(ValueError, match="kv_latent: rows not contiguous or not 16-byte aligned"):
        fh.forward(q, odd[:, :512], None, odd[:, 512:], torch.zeros(4, 1, 8, dtype=torch.int32), SCALE)


def test_launch_settings_name_the_bad_setting():
    # Pure host logic (no GPU): defaults per key type, and each bad setting named in the error.
    assert fh.launch_settings(False, None) == fh.LAUNCH_BF16
    assert fh.launch_settings(True, None) == fh.LAUNCH_WGMMA
    assert fh.launch_settings(True, dict(WS=True)) == fh.LAUNCH_WS
    assert fh.launch_settings(True, dict(SPLITS=2)) == dict(fh.LAUNCH_WGMMA, SPLITS=2)
    # Settings only the mma.sync kernels have (32-key blocks too) choose them; WS=0 is WS=False.
    assert fh.launch_settings(True, dict(BLOCK_N=32)) == dict(fh.LAUNCH_WS, BLOCK_N=32)
    assert fh.launch_settings(True, dict(WS=0)) == dict(fh.LAUNCH_FP8, WS=False)
    assert fh.launch_settings(True, dict(WS=False)) == dict(fh.LAUNCH_FP8, WS=False)
    assert fh.launch_settings(True, dict(Q_HELD=False))["WS"] is True
    assert fh.launch_settings(True, dict(F16=0)) == dict(fh.LAUNCH_WGMMA, F16=False)
    # The register-operand kernel's slots are whole blocks: 4 unless given.
    assert fh.launch_settings(True, dict(REG_A=1)) == dict(fh.LAUNCH_WGMMA, REG_A=True, STAGES=fh.REG_A_STAGES, DEQUANT_REGS=fh.REG_A_COPY_REGS)
    assert fh.launch_settings(True, dict(REG_A=True, STAGES=2))["STAGES"] == 2
    # Without a launch the layout picks: one scale a row, the register-operand kernel.
    assert fh.default_launch(True, 1) == dict(fh.LAUNCH_WGMMA, REG_A=True, STAGES=3, DEQUANT_REGS=fh.REG_A_COPY_REGS)
    assert fh.default_launch(True, 4) == fh.LAUNCH_WGMMA and fh.default_launch(False) == fh.LAUNCH_BF16
    for fp8, bad, word in ((False, dict(WS=True), "bf16 keys"), (False, dict(Q_HELD=True), "Q_HELD=True"), (True, dict(STAGE=2), "unknown"),
                           (True, dict(WS=False, Q_HELD=True), "Q_HELD=True"), (True, dict(WS=False, DEQUANT_REGS=96), "DEQUANT_REGS=96"),
                           (True, dict(QK_CHAINS=3), "QK_CHAINS=3"), (True, dict(WGMMA=True, WS=0), "WS=0"),
                           (True, dict(WGMMA=True, QK_CHAINS=2), "QK_CHAINS=2 with WGMMA"), (False, dict(WGMMA=True), "bf16 keys"),
                           (True, dict(DEQUANT_REGS=100), "DEQUANT_REGS=100"), (True, dict(NUM_WARPS=8, BLOCK_N=64), "NUM_WARPS=8"),
                           (False, dict(BLOCK_N=16), "BLOCK_N=16"), (True, dict(WS=True, F16=True), "F16=True without WGMMA"),
                           (True, dict(WGMMA=True, DQ_WARPS=6), "DQ_WARPS=6"), (True, dict(WS=True, DQ_WARPS=8), "DQ_WARPS=8 without WGMMA"),
                           (True, dict(WGMMA=True, DQ_WARPS=8, DEQUANT_REGS=136), "use DEQUANT_REGS <= 128"),
                           (True, dict(REG_A=True, F16=False), "F16=False"), (True, dict(REG_A=True, TILES=1), "TILES=1 with REG_A"),
                           (True, dict(WS=True, REG_A=True), "REG_A=True without WGMMA")):
        with pytest.raises(ValueError, match=re.escape(word)):
            fh.launch_settings(fp8, bad)


@needs_gpu
def test_declines_what_it_does_not_take():
    q, kv, _ = awkward_inputs(heads=48, topk=64)
    assert "48 heads" in fh.declines(q, kv[:, 0, :512], None, kv[:, 0, 512:], 512)
    q16 = q[:, :16].contiguous()
    assert "attn_sink" in fh.declines(q16, kv[:, 0, :512], None, kv[:, 0, 512:], 512, attn_sink=torch.zeros(16, device="cuda"))
    odd = torch.empty(kv.shape[0], 1, 584, device="cuda", dtype=kv.dtype)[:, 0, 4:580]  # rows 8 bytes off 16
    odd.copy_(kv[:, 0])
    assert "not 16-byte aligned" in fh.declines(q16, odd[:, :512], None, odd[:, 512:], 512)


# The default launch (FP8 latents: the WS kernel), then the kernel without warp specialization.
LAUNCHES = [None, dict(BLOCK_N=32, STAGES=2, SPLITS=1, WS=False), dict(BLOCK_N=64, STAGES=2, SPLITS=3, WS=False),
            dict(BLOCK_N=32, STAGES=4, SPLITS=2, WS=False, QK_CHAINS=4), dict(BLOCK_N=64, STAGES=2, NUM_WARPS=8, WS=False)]
LAUNCH_IDS = ["default", "32-keys-unsplit", "64-keys-3-splits", "32-keys-4-stages-4-chains", "8-warps"]


@needs_gpu
@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("heads, topk", [(16, 2048), (13, 200), (20, 63)])
def test_bf16_keys_match_the_reference(heads, topk, launch):
    q, kv, idx = awkward_inputs(heads=heads, topk=topk)
    poison_unselected(kv)
    out, lse = fh.forward(q, kv[:, 0, :512], None, kv[:, 0, 512:], idx, SCALE, launch=launch)
    assert_matches(out, lse, *reference.sparse_attn_reference(q, kv, idx, SCALE, 512))


# FP8 only: the warp-specialized kernel (dequantization and MMAs in two partitions).
FP8_LAUNCHES = LAUNCHES + [dict(WS=True, Q_HELD=False, STAGES=3), dict(WS=True, STAGES=2, SPLITS=3, QK_CHAINS=2), dict(WS=True, STAGES=6, SPLITS=1, QK_CHAINS=1),
                           dict(WS=True, Q_HELD=False), dict(WS=True, Q_HELD=True, SPLITS=2, QK_CHAINS=1)]
FP8_LAUNCH_IDS = LAUNCH_IDS + ["ws-q-from-shared-3-slots", "ws-2-slots-3-splits-2-chains", "ws-6-slots-unsplit-1-chain", "ws-q-from-shared", "ws-q-held-2-splits-1-chain"]
# Keys as the rows of warpgroup MMAs (gluon_fewhead_wgmma): default, unsplit, split.
FP8_LAUNCHES += [dict(WGMMA=True), dict(WGMMA=True, SPLITS=1), dict(WGMMA=True, SPLITS=3), dict(WGMMA=True, TILES=1, STAGES=5),
                 dict(WGMMA=True, TILES=1, STAGES=3, SPLITS=3), dict(WGMMA=True, L2_AHEAD=4), dict(WGMMA=True, L2_AHEAD=3, SPLITS=3)]
FP8_LAUNCH_IDS += ["wgmma", "wgmma-unsplit", "wgmma-3-splits", "wgmma-1-tile-5-slots", "wgmma-1-tile-3-slots-3-splits", "wgmma-l2-4-ahead",
                   "wgmma-l2-3-ahead-3-splits"]
# ... with bf16 tiles (the latent dequantized, not staged as f16 with the scales on the scores and P).
FP8_LAUNCHES += [dict(WGMMA=True, F16=False), dict(WGMMA=True, F16=False, SPLITS=1), dict(WGMMA=True, F16=False, SPLITS=3),
                 dict(WGMMA=True, F16=False, TILES=1, STAGES=5, SPLITS=3)]
FP8_LAUNCH_IDS += ["wgmma-bf16-tiles", "wgmma-bf16-tiles-unsplit", "wgmma-bf16-tiles-3-splits", "wgmma-bf16-1-tile-5-slots-3-splits"]
# ... with 8 dequantizing warps.
FP8_LAUNCHES += [dict(WGMMA=True, DQ_WARPS=8), dict(WGMMA=True, DQ_WARPS=8, SPLITS=1), dict(WGMMA=True, DQ_WARPS=8, F16=False, SPLITS=3),
                 dict(WGMMA=True, DQ_WARPS=8, TILES=1, STAGES=5), dict(WGMMA=True, DQ_WARPS=8, L2_AHEAD=2)]
FP8_LAUNCH_IDS += ["wgmma-8-warps", "wgmma-8-warps-unsplit", "wgmma-8-warps-bf16-tiles-3-splits", "wgmma-8-warps-1-tile-5-slots",
                   "wgmma-8-warps-l2-2-ahead"]
# ... with the keys read from the ring slot into the MMAs' registers (gluon_fewhead_rega).
FP8_LAUNCHES += [dict(REG_A=True), dict(REG_A=True, SPLITS=1), dict(REG_A=True, SPLITS=3), dict(REG_A=True, STAGES=2, SPLITS=1),
                 dict(REG_A=True, STAGES=3, SPLITS=3), dict(REG_A=True, DEQUANT_REGS=128)]
FP8_LAUNCH_IDS += ["rega", "rega-unsplit", "rega-3-splits", "rega-2-slots-unsplit", "rega-3-slots-3-splits", "rega-128-copy-registers"]


def _exact_keys(launch) -> bool:
    """The launch stages the latent as f16 with the scales on the scores: its keys are exact, not
    rounded to bf16 as the FP8 reference's are."""
    return bool(fh.launch_settings(True, launch).get("F16"))


@needs_gpu
@pytest.mark.parametrize("launch", FP8_LAUNCHES, ids=FP8_LAUNCH_IDS)
@pytest.mark.parametrize("layout", ["flashmla", "row"])
@pytest.mark.parametrize("heads, topk", [(16, 2048), (13, 200), (20, 63)])
def test_fp8_latents_match_the_reference(layout, heads, topk, launch):
    assert_fp8_forward_matches(lambda *args: fh.forward(*args, launch=launch), layout, heads, topk, exact_keys=_exact_keys(launch))


@needs_gpu
@pytest.mark.parametrize("layout, launch", [("flashmla", None), ("row", None), ("row", dict(SPLITS=4)), ("flashmla", dict(WS=False)), ("row", dict(WS=False)),
                                            ("flashmla", dict(WGMMA=True)), ("row", dict(WGMMA=True, SPLITS=4)),
                                            ("flashmla", dict(WGMMA=True, F16=False)), ("row", dict(WGMMA=True, F16=False, SPLITS=4)),
                                            ("flashmla", dict(WGMMA=True, DQ_WARPS=8)), ("row", dict(WGMMA=True, DQ_WARPS=8)),
                                            ("flashmla", dict(REG_A=True)), ("row", dict(REG_A=True, SPLITS=4))],
                         ids=["flashmla", "row", "row-4-splits", "flashmla-plain", "row-plain", "flashmla-wgmma", "row-wgmma-4-splits",
                              "flashmla-wgmma-bf16-tiles", "row-wgmma-bf16-tiles-4-splits", "flashmla-wgmma-8-warps", "row-wgmma-8-warps",
                              "flashmla-rega", "row-rega-4-splits"])
def test_fp8_latents_keep_extreme_scales(layout, launch):
    # Key rows scaled from 2^-20 to 2^4 and heads from 1e-2 to 10 (one all zero).
    assert_fp8_forward_matches(lambda *args: fh.forward(*args, launch=launch), layout, 16, 200, extreme=True,
                               exact_keys=_exact_keys(launch))


@needs_gpu
@pytest.mark.parametrize("layout", ["flashmla", "row"])
@pytest.mark.parametrize("launch", [None, dict(WGMMA=True), dict(WGMMA=True, F16=False), dict(REG_A=True), dict(WS=False)],
                         ids=["default", "wgmma", "wgmma-bf16-tiles", "rega", "plain"])
def test_fp8_keys_with_scale_zero_still_count(layout, launch):
    # A selected key whose scales are all 0 has a zero latent, but its rope score still counts in
    # the softmax (the f16 forms divide P by a block's largest scale: a block of zero scales must
    # not give 0 / 0). Token 4: every key's scales 0; token 3: a third of them (zero_some_scales).
    q, kv, idx = awkward_inputs(heads=16, topk=200)
    latent, scale, rope = fr.quantize_keys(kv, layout)
    zero_some_scales(scale, rope, idx)
    out, lse = fh.forward(q, latent, scale, rope, idx, SCALE, launch=launch)
    assert_matches(out, lse, *fr.sparse_attn_fp8kv_reference(q, latent, scale, rope, idx, SCALE, fr.LATENT, exact_keys=_exact_keys(launch)))


@needs_gpu
def test_empty_top_k_gives_empty_rows():
    q, kv, idx = awkward_inputs(heads=16, topk=8)
    out, lse = fh.forward(q, kv[:, 0, :512], None, kv[:, 0, 512:], idx[:, :, :0], SCALE)
    assert (out == 0).all() and (lse == float("inf")).all()


@needs_gpu
def test_launch_settings_are_checked():
    q, kv, idx = awkward_inputs(heads=16, topk=64)
    for bad, word in ((dict(BLOCK_N=16), "BLOCK_N=16"), (dict(STAGES=1), "STAGES=1"), (dict(STAGE=2), "unknown"),
                      (dict(BLOCK_N=32, NUM_WARPS=8), "NUM_WARPS=8"), (dict(QK_CHAINS=3), "QK_CHAINS=3"), (dict(Q_HELD=True), "Q_HELD=True"), (dict(NUM_WARPS=2), "NUM_WARPS=2"),
                      (dict(BLOCK_N=64, STAGES=4), "shared memory"), (dict(WS=True), "bf16 keys")):
        with pytest.raises(ValueError, match=re.escape(word)):
            fh.forward(q, kv[:, 0, :512], None, kv[:, 0, 512:], idx, SCALE, launch=bad)
    latent, scale, rope = fr.quantize_keys(kv, "flashmla")
    for bad, word in ((dict(WS=True, NUM_WARPS=8, BLOCK_N=64), "NUM_WARPS=8"), (dict(WS=True, DEQUANT_REGS=100), "DEQUANT_REGS=100"),
                      (dict(WS=False, Q_HELD=True), "Q_HELD=True"),
                      (dict(WS=True, BLOCK_N=64, STAGES=3), "shared memory"), (dict(WGMMA=True, BLOCK_N=32), "BLOCK_N=32"),
                      (dict(WGMMA=True, Q_HELD=True), "Q_HELD=True"), (dict(WGMMA=True, WS=False), "WS=False"),
                      (dict(WGMMA=True, STAGES=3), "shared memory"), (dict(WGMMA=True, TILES=1, STAGES=7), "shared memory"),
                      (dict(WGMMA=True, TILES=3), "TILES=3"), (dict(WS=True, TILES=1), "TILES=1 without WGMMA"),
                      (dict(WGMMA=True, L2_AHEAD=17), "L2_AHEAD=17"), (dict(WS=True, L2_AHEAD=2), "L2_AHEAD=2 without WGMMA"),
                      (dict(WS=True, F16=True), "F16=True without WGMMA"), (dict(REG_A=True, STAGES=5), "shared memory")):
        with pytest.raises(ValueError, match=re.escape(word)):
            fh.forward(q, latent, scale, rope, idx, SCALE, launch=bad)


@needs_gpu
def test_forward_entry_points_dispatch_to_it_where_it_applies():
    q, kv, idx = awkward_inputs(t=40, heads=16, topk=256)
    out, lse = tk.forward(q, kv, idx, SCALE, 512)
    assert tk.LAST_LAUNCH["forward"]["kernel"] == "gluon few-head"
    assert_matches(out, lse, *reference.sparse_attn_reference(q, kv, idx, SCALE, 512))
    latent, scale, rope = fr.quantize_keys(kv, "flashmla")
    out, lse = tk.forward_fp8(q, latent, scale, rope, idx, SCALE, 512)
    assert tk.LAST_LAUNCH["forward_fp8"]["kernel"] == "gluon few-head" and tk.LAST_LAUNCH["forward_fp8"]["WGMMA"]
    assert_matches(out, lse, *fr.sparse_attn_fp8kv_reference(q, latent, scale, rope, idx, SCALE, 512))
    # One scale a row: the register-operand launch (LAUNCH_ROW_SCALE), checked against the exact keys.
    latent, scale, rope = fr.quantize_keys(kv, "row")
    out, lse = tk.forward_fp8(q, latent, scale, rope, idx, SCALE, 512)
    assert tk.LAST_LAUNCH["forward_fp8"]["kernel"] == "gluon few-head" and tk.LAST_LAUNCH["forward_fp8"]["REG_A"]
    assert_matches(out, lse, *fr.sparse_attn_fp8kv_reference(q, latent, scale, rope, idx, SCALE, 512, exact_keys=True))
    # Where it does not apply (a sink, int64 indices), the Triton kernel runs and the reason is kept.
    tk.forward(q, kv, idx, SCALE, 512, attn_sink=torch.zeros(16, device="cuda"))
    assert "attn_sink" in tk.FEWHEAD_DECLINED["forward"]
    out64, lse64 = tk.forward(q, kv, idx.long(), SCALE, 512)
    assert "int32 only" in tk.FEWHEAD_DECLINED["forward"] and tk.LAST_LAUNCH["forward"].get("kernel") != "gluon few-head"
    assert_matches(out64, lse64, *reference.sparse_attn_reference(q, kv, idx, SCALE, 512))
