"""Warp-specialized sparse MLA forward for Hopper, in Triton's Gluon dialect (explicit shared
memory, barriers and partitions). The reference beside it is reference.py / fp8_reference.py.

Why a second forward: in the Triton kernel, an FP8 latent is gathered into shared memory, read
back into registers, dequantized and written to shared memory again as bf16 before the MMA, all on
the MMA warps' critical path, and its ring is one stage deep (benchmarks/RESULTS.md). Here a
producer partition (4 warps) gathers the key rows of a block into a ring of two shared-memory slots
while two consumer warpgroups run the MMAs on the other slot. bf16 keys arrive by asynchronous
copies; an FP8 latent is copied the same way into the upper half of its slot and dequantized there,
in place, into the bf16 tile (``IN_SLOT``; through registers instead, the payload in flight takes
registers the consumers need). With one scale a row (``FOLD_SCALE``, the default there) the tile
holds the e4m3 values as f16, unscaled, and the consumers apply the scales to the scores and P.

One program per (query token, block of 64 heads). Each consumer warpgroup owns 256 of the 512
value columns and computes the scores of half of each key block (Q K^T over 576 columns, Q read
from shared memory); the two exchange their row maxima and their halves of P through shared
memory (two barrier hand-offs a block), then each adds P V over all the block's keys for its
columns. No product is computed twice, and a warpgroup holds a 64 x 32 score tile instead of
64 x 64. (``SPLIT_S=False``: each warpgroup computes all scores itself, nothing is exchanged,
the Q K^T product is computed twice: 1.53x the FLOPs; kept for comparison.)

The partitions live in gluon_producers.py and gluon_consumers.py; this module assembles them
into the kernel, holds its launch settings and checks, and decides which calls it takes.

Shapes are those of DeepSeek's MLA: latent 512 (the value) + rope 64, one key group; other shapes
and options (sink, topk_length) take the Triton kernel (``declines`` says why).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from .gluon_common import _BLOCK_H, _D_LAT, _D_ROPE, HAVE_GLUON, key_operands_problem, platform_problem, too_few_programs

if HAVE_GLUON:
    from .gluon_common import (
        BLOCK_H,
        D_LAT,
        D_ROPE,
        _four_buffers,
        _program_coords,
        async_copy,
        async_rows,
        fence_async_shared,
        gl,
        gluon,
        mbarrier,
        partition_barrier,
        smem_view,
    )
    from .gluon_consumers import _consumer, _consumer_split
    from .gluon_producers import _producer

LOG2E = 1.4426950408889634
ENV_OFF = "MLA_COMPILER_WS"  # =0: never take this kernel


def declines(q: torch.Tensor, kv_latent: torch.Tensor, kv_scale: Optional[torch.Tensor], kv_rope: Optional[torch.Tensor],
             d_v: int, attn_sink=None, topk_length=None, h_kv: int = 1) -> Optional[str]:
    """Why the warp-specialized kernel does not take this call (None when it does). ``kv_latent``:
    the first 512 columns of bf16 keys (``kv_scale`` None) or an FP8 latent with ``kv_scale``."""
    problem = platform_problem(q, ENV_OFF, "wgmma and setmaxnreg are sm_90 instructions", h_kv)
    if problem is not None:
        return problem
    if kv_latent.shape[1] != _D_LAT or kv_rope is None or kv_rope.shape[1] != _D_ROPE or d_v != _D_LAT:
        rope = None if kv_rope is None else kv_rope.shape[1]
        return f"latent {kv_latent.shape[1]} / rope {rope} / d_v {d_v} (512 / 64 / 512 only)"
    if q.shape[1] < _BLOCK_H:
        return f"{q.shape[1]} heads (64 or more: wgmma tiles 64 rows, fewer would idle the tensor cores)"
    if attn_sink is not None or topk_length is not None:
        return "attn_sink / topk_length (not implemented here)"
    if q.shape[2] != _D_LAT + _D_ROPE:
        return f"query width {q.shape[2]} (576 only)"
    problem = key_operands_problem(kv_latent, kv_scale, kv_rope)
    if problem is not None:
        return problem
    return too_few_programs(q) or _misaligned(kv_latent, kv_rope)


def _misaligned(kv_latent: torch.Tensor, kv_rope: torch.Tensor) -> Optional[str]:
    """Which operand breaks the producer's 16-byte vectors (rows contiguous, row strides a
    multiple of 16 latent / 8 rope elements, 16-byte aligned base), or None."""
    for name, tensor, step in (("kv_latent", kv_latent, 16), ("kv_rope", kv_rope, 8)):
        if tensor.stride(1) != 1 or tensor.stride(0) % step or tensor.data_ptr() % 16:
            return (f"{name}: rows not contiguous or not 16-byte aligned (stride {tuple(tensor.stride())}, "
                    f"address mod 16 = {tensor.data_ptr() % 16})")
    return None


if HAVE_GLUON:

    @gluon.jit
    def _q_latent_to_f16(q_a_smem, q_unscale, layout: gl.constexpr):
        """Q's latent (bf16 in ``q_a_smem``) rewritten in place as f16 times 2^(14 - e) per head,
        where 2^e <= the head's largest |q| < 2^(e+1): the largest lands in [2^14, 2^15), below
        f16's 65504, and every bf16 value within 2^-28 of it keeps all its bits. ``q_unscale``
        gets 2^(e - 14), which the consumers apply to the scores. A head of zeros (a padded one)
        gets e = -112; a non-finite one stays non-finite, as in the reference."""
        amax = gl.zeros([BLOCK_H], gl.float32, gl.SliceLayout(1, layout))
        for c in gl.static_range(D_LAT // 128):
            x = q_a_smem.slice(c * 128, 128, dim=1).load(layout).to(gl.float32)
            amax = gl.maximum(amax, gl.max(gl.abs(x), 1))
        e = gl.maximum(((amax.to(gl.int32, bitcast=True) >> 23) & 0xFF) - 127, -112)
        scale = ((141 - e) << 23).to(gl.float32, bitcast=True)  # 2^(14 - e), e <= 128
        q_unscale.store(((113 + e) << 23).to(gl.float32, bitcast=True))  # 2^(e - 14)
        f16_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_LAT], gl.float16)
        q_f16 = smem_view(q_a_smem, gl.float16, [BLOCK_H, D_LAT], f16_layout)
        for c in gl.static_range(D_LAT // 128):
            x = q_a_smem.slice(c * 128, 128, dim=1).load(layout).to(gl.float32)
            q_f16.slice(c * 128, 128, dim=1).store((x * scale[:, None]).to(gl.float16))

    @gluon.jit
    def _ws_fwd_kernel(
        Q, KV, KV_SCALE, KV_ROPE, IDX, OUT, LSE,
        stride_qt, stride_qh, stride_kvs, stride_ss, stride_rs, stride_it, stride_ot, stride_oh, stride_lt,
        S_KV, TOPK, H, sm_scale_log2,
        FP8: gl.constexpr, N_TILES: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, IN_SLOT: gl.constexpr, SPLIT_S: gl.constexpr = True,
        PRODUCER_DEFAULT: gl.constexpr = False, CHUNKED: gl.constexpr = False, CHUNK_BUFFERS: gl.constexpr = False,
        Q_IN_LOOP: gl.constexpr = False, FOLD_SCALE: gl.constexpr = False,
    ):
        t, hb = _program_coords(H)
        # FOLD_SCALE (an FP8 latent with one scale a row): the slots hold the e4m3 latent widened to
        # f16 (exact), Q's latent is f16 under a power-of-two scale per head, and the keys' scales
        # are applied to the scores and to P (gluon_consumers._fold_scales).
        KEY_DTYPE: gl.constexpr = gl.float16 if FOLD_SCALE else gl.bfloat16
        q_a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_LAT], gl.bfloat16)
        q_b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_ROPE], gl.bfloat16)
        r_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D_ROPE], gl.bfloat16)
        # Q as rings of one: Q_IN_LOOP consumers index them with a value the compiler cannot prove
        # constant (gluon_common._unhoisted).
        q_a_ring = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_H, D_LAT], q_a_layout)
        q_b_ring = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_H, D_ROPE], q_b_layout)
        q_a_smem = q_a_ring.index(0)
        q_b_smem = q_b_ring.index(0)
        # The key ring: one [STAGES, BLOCK_N, 512] buffer (k0 four times), or with CHUNK_BUFFERS four
        # rings of 128 columns, the same bytes (a chunk's store then needs no barrier before the next's).
        K_COLS: gl.constexpr = 128 if CHUNK_BUFFERS else D_LAT
        k_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, K_COLS], KEY_DTYPE)
        k0, k1, k2, k3 = _four_buffers(CHUNK_BUFFERS, KEY_DTYPE, [STAGES, BLOCK_N, K_COLS], k_layout)
        r_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D_ROPE], r_layout)
        vec_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        ok_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N], vec_layout)
        if FOLD_SCALE:
            # Each slot's row scales (0 for invalid rows), and 1 / (Q's scale) of each head.
            sc_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_N], vec_layout)
            q_unscale = gl.allocate_shared_memory(gl.float32, [BLOCK_H], vec_layout)
        else:
            sc_ring = ok_ring
            q_unscale = ok_ring
        # full: one barrier a slot, or one a 128-column chunk of a slot (CHUNKED).
        N_FULL: gl.constexpr = STAGES * 4 if CHUNKED else STAGES
        full = gl.allocate_shared_memory(gl.int64, [N_FULL, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(N_FULL):
            mbarrier.init(full.index(s), count=1)
        for s in gl.static_range(STAGES):
            mbarrier.init(empty.index(s), count=2)

        # Q of this block of heads into shared memory by asynchronous copies, all in flight at once
        # (padded heads are 0). As loads and stores 128 columns at a time, each chunk's loads were
        # issued after the previous chunk's stores: five trips to memory before the partitions start.
        q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        heads = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, q_layout))
        h_ok = (heads < H)[:, None]
        q_row = Q + t * stride_qt + heads[:, None] * stride_qh
        cols = gl.arange(0, 128, layout=gl.SliceLayout(0, q_layout))
        for c in gl.static_range(D_LAT // 128):
            async_rows(q_a_smem.slice(c * 128, 128, dim=1), q_row + c * 128 + cols[None, :], mask=h_ok)
        rope_cols = gl.arange(0, D_ROPE, layout=gl.SliceLayout(0, q_layout))
        async_rows(q_b_smem, q_row + D_LAT + rope_cols[None, :], mask=h_ok)
        async_copy.commit_group()
        async_copy.wait_group(0)
        if FOLD_SCALE:
            partition_barrier()  # every thread's copies have landed
            _q_latent_to_f16(q_a_smem, q_unscale, q_layout)
            q_a_ring = smem_view(q_a_ring, gl.float16, [1, BLOCK_H, D_LAT],
                                 gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_LAT], gl.float16))
        fence_async_shared()
        partition_barrier()

        if SPLIT_S:
            p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_N // 2], KEY_DTYPE)
            xmax = gl.allocate_shared_memory(gl.float32, [2, BLOCK_H], vec_layout)
            lsum = gl.allocate_shared_memory(gl.float32, [2, BLOCK_H], vec_layout)
            p_half = gl.allocate_shared_memory(KEY_DTYPE, [2, BLOCK_H, BLOCK_N // 2], p_layout)
            bar_x = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            bar_p = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            bar_l = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            for w in gl.static_range(2):
                mbarrier.init(bar_x.index(w), count=1)
                mbarrier.init(bar_p.index(w), count=1)
                mbarrier.init(bar_l.index(w), count=1)
            fence_async_shared()
            partition_barrier()
            if PRODUCER_DEFAULT:
                # The producer runs in the kernel's own warps (the default partition): it gets what
                # two CONSUMER_REGS workers leave, 504 - 2 * CONSUMER_REGS (check_launch).
                # (The argument lists are spelled out twice: packed into tuples, constexprs lose
                # their constness.)
                gl.warp_specialize(
                    [
                        (_producer, (k0, k1, k2, k3, r_ring, ok_ring, sc_ring, full, empty, KV, KV_SCALE, KV_ROPE, IDX, stride_kvs, stride_ss,
                                     stride_rs, stride_it, S_KV, TOPK, H, FP8, N_TILES, BLOCK_N, STAGES, IN_SLOT, CHUNKED, CHUNK_BUFFERS,
                                     FOLD_SCALE)),
                        (_consumer_split, (q_a_ring, q_b_ring, k0, k1, k2, k3, r_ring, ok_ring, sc_ring, q_unscale, full, empty, xmax, p_half,
                                           lsum, bar_x, bar_p, bar_l, OUT, LSE, stride_ot, stride_oh, stride_lt, TOPK, H, sm_scale_log2, 0,
                                           BLOCK_N, STAGES, CHUNKED, CHUNK_BUFFERS, Q_IN_LOOP, FOLD_SCALE)),
                        (_consumer_split, (q_a_ring, q_b_ring, k0, k1, k2, k3, r_ring, ok_ring, sc_ring, q_unscale, full, empty, xmax, p_half,
                                           lsum, bar_x, bar_p, bar_l, OUT, LSE, stride_ot, stride_oh, stride_lt, TOPK, H, sm_scale_log2, 1,
                                           BLOCK_N, STAGES, CHUNKED, CHUNK_BUFFERS, Q_IN_LOOP, FOLD_SCALE)),
                    ],
                    [4, 4],
                    [CONSUMER_REGS, CONSUMER_REGS],
                )
            else:
                gl.warp_specialize(
                    [
                        (_consumer_split, (q_a_ring, q_b_ring, k0, k1, k2, k3, r_ring, ok_ring, sc_ring, q_unscale, full, empty, xmax, p_half,
                                           lsum, bar_x, bar_p, bar_l, OUT, LSE, stride_ot, stride_oh, stride_lt, TOPK, H, sm_scale_log2, 0,
                                           BLOCK_N, STAGES, CHUNKED, CHUNK_BUFFERS, Q_IN_LOOP, FOLD_SCALE)),
                        (_consumer_split, (q_a_ring, q_b_ring, k0, k1, k2, k3, r_ring, ok_ring, sc_ring, q_unscale, full, empty, xmax, p_half,
                                           lsum, bar_x, bar_p, bar_l, OUT, LSE, stride_ot, stride_oh, stride_lt, TOPK, H, sm_scale_log2, 1,
                                           BLOCK_N, STAGES, CHUNKED, CHUNK_BUFFERS, Q_IN_LOOP, FOLD_SCALE)),
                        (_producer, (k0, k1, k2, k3, r_ring, ok_ring, sc_ring, full, empty, KV, KV_SCALE, KV_ROPE, IDX, stride_kvs, stride_ss,
                                     stride_rs, stride_it, S_KV, TOPK, H, FP8, N_TILES, BLOCK_N, STAGES, IN_SLOT, CHUNKED, CHUNK_BUFFERS,
                                     FOLD_SCALE)),
                    ],
                    [4, 4],
                    [CONSUMER_REGS, PRODUCER_REGS],
                )
        else:
            gl.warp_specialize(
                [
                    (_consumer, (q_a_smem, q_b_smem, k0, r_ring, ok_ring, full, empty, OUT, LSE, stride_ot, stride_oh, stride_lt,
                                 TOPK, H, sm_scale_log2, 0, BLOCK_N, STAGES)),
                    (_consumer, (q_a_smem, q_b_smem, k0, r_ring, ok_ring, full, empty, OUT, LSE, stride_ot, stride_oh, stride_lt,
                                 TOPK, H, sm_scale_log2, 1, BLOCK_N, STAGES)),
                    (_producer, (k0, k1, k2, k3, r_ring, ok_ring, sc_ring, full, empty, KV, KV_SCALE, KV_ROPE, IDX, stride_kvs, stride_ss,
                                 stride_rs, stride_it, S_KV, TOPK, H, FP8, N_TILES, BLOCK_N, STAGES, IN_SLOT, CHUNKED, CHUNK_BUFFERS,
                                 FOLD_SCALE)),
                ],
                [4, 4],
                [CONSUMER_REGS, PRODUCER_REGS],
            )


# Register split between the two consumer warpgroups and the producer ("200/112" below ran
# consumer warpgroup 0 at 192: see check_launch). Measured on H200 at the
# V3.2 decode shape (benchmarks/bench_ws_decode.py, RESULTS.md), split scores: bf16 keys 224/56
# 0.217-0.225 ms (216/72 0.219-0.220, prefill 5.66 ms against 5.72-5.91; 200/112 0.245-0.252, 184/136 0.259; without
# the split 0.265-0.271).
# FP8 latent staged in the slot (IN_SLOT, 2026-11-28), producer a worker: 216/72 FlashMLA layout
# 0.274 ms / row scale 0.240, 224/56 0.330 / 0.251, the producer in the default partition with
# 192/120 0.295 / 0.256. FP8 through registers (IN_SLOT False: 64 registers of payload in flight,
# so the consumers get fewer): 192/120 in the default partition 0.289-0.292 / 0.266-0.268, as a
# worker with 112: 0.309 / 0.271, consumers at 224 spill that producer: 1.24-1.33 ms. A rolling
# FP8 producer (the next block's payload loaded while this one is converted; commit f10912f):
# 192/120 0.431 / 0.351, 184/136 0.334 / 0.266. FlashMLA's "seesaw" consumer schedule (blocks two at
# a time, staggered warpgroups; commit 733e8ec): bf16 0.262, FP8 216/72 0.328 / 0.283 ms, prefill
# bf16 5.92-6.07 ms: with two slots a pair holds both, so no gather overlaps the MMAs.
# CHUNKED (a barrier per 128-column chunk, the scores over a chunk start as it lands; FlashMLA's
# fine-grained copy-GEMM pipelining), 216/72, 2026-11-28: bf16 0.217 ms (0.221 without, within the
# spread), FP8 FlashMLA 0.295 / row 0.266 (0.273 / 0.242 without): off by default then. With
# Q_IN_LOOP and the later producers (probe_fp8_mma.py --ws, H200, 2026-11-29, decode 9 rounds,
# prefill 3, spreads under 1 %): bf16 keys 0.1798 ms against 0.1846, prefill 5.370 against 5.565 ms, so on for bf16
# keys; the folded FP8 rows 0.2206 against 0.1971 (same bits), so off there.
# Head blocks fastest in the grid (2026-11-28, later), 216/72: bf16 0.199-0.200 ms, FP8 FlashMLA
# 0.265-0.266 / row 0.236-0.237. f16 staging of the FP8 latent (commit f2b4ce2): 0.355 / 0.273.
# Two producer warpgroups (512 threads) do not compile: ptxas then caps every thread at 128
# registers, and the 64 x 256 accumulator's wgmma needs 154.
# IN_SLOT picks the FP8 producer; bf16 keys are always copied straight into the slot and ignore it.
# CHUNK_BUFFERS (2026-11-28): each 128-column chunk of the key ring its own buffer, so the FP8
# producer's chunk stores and raw copies are not ordered by compiler-inserted barriers (sm_90 PTX:
# 5 barriers a block instead of 14; bf16 keys have 4). Decode FP8 FlashMLA 0.262 ms / row 0.231
# against 0.271 / 0.237, prefill 7.20 / 6.44 ms against 7.51 / 6.42; bf16 keys 0.206 against 0.199
# (the consumers' two 128-column value products and four chunk score products): on for FP8 only.
# With the producer's conflict-free dequantization layout (gluon_producers, eleventh call set):
# FP8 FlashMLA 0.250 ms / row 0.221.
# Q_IN_LOOP (split schedule; Q's shared-memory descriptors computed in the consumers' loop,
# gluon_common._unhoisted): hoisted out of it, the second consumer spills and reloads them every block. bf16 keys 0.1931 ms
# against 0.2005; FP8 rows (dequantized, CHUNK_BUFFERS) 0.2367 against 0.2204, so off for FP8 (H200,
# probe_fp8_mma.py --ws, 2026-11-29). Nsight's stall samples with it on for FP8: the consumers wait
# for the producer's blocks (4074 samples at their `full` waits against 1314), and the producer
# waits on a global load at its valid-row compare (1837 samples, under 10 there with it off); the
# producer's source is the same, its SASS is scheduled differently.
# FOLD_SCALE (an FP8 latent with one scale a row): the slots hold the e4m3 values widened to f16,
# one conversion per two values, in place of e4m3 x scale in fp32 rounded to bf16 (three an
# element); Q's latent goes f16 under a power-of-two scale per head, and the row scales multiply
# the scores and P. It rounds less than the dequantized form: e4m3 values are exact in f16, the
# scale multiplies fp32 scores, Q's bf16 values are kept exactly, and P' has 11 significant bits
# against bf16's 8 down to 2^-14 of its row's largest (1.7e-3 from the exact FP8 reference against
# 5.2e-3 dequantized, bench_fp8_mma.py). H200, V3.2 decode (probe_fp8_mma.py, 2026-11-29):
# 0.196 ms against 0.214 dequantized in the same run (bf16 keys 0.183). It needs Q_IN_LOOP: with
# Q's descriptors hoisted the second consumer spills in its loop (0.250 ms).
LAUNCH_BF16 = dict(BLOCK_N=64, STAGES=2, CONSUMER_REGS=216, PRODUCER_REGS=72, IN_SLOT=False, SPLIT_S=True, PRODUCER_DEFAULT=False,
                   CHUNKED=True, CHUNK_BUFFERS=False, Q_IN_LOOP=True, FOLD_SCALE=False)
LAUNCH_FP8 = dict(BLOCK_N=64, STAGES=2, CONSUMER_REGS=216, PRODUCER_REGS=72, IN_SLOT=True, SPLIT_S=True, PRODUCER_DEFAULT=False,
                  CHUNKED=False, CHUNK_BUFFERS=True, Q_IN_LOOP=False, FOLD_SCALE=False)  # tile scales (FlashMLA's layout)
LAUNCH_FP8_ROWS = dict(LAUNCH_FP8, Q_IN_LOOP=True, FOLD_SCALE=True)  # one scale a row


def default_launch(fp8: bool, n_tiles: int = 1) -> dict:
    """The launch settings a call takes by default: bf16 keys, an FP8 latent with one scale a row
    (``n_tiles`` 1, the scale folded into the scores and P) or one per 128 columns (dequantized)."""
    if not fp8:
        return dict(LAUNCH_BF16)
    return dict(LAUNCH_FP8_ROWS if n_tiles == 1 else LAUNCH_FP8)


def launch_settings(fp8: bool, n_tiles: int, launch: Optional[dict] = None) -> dict:
    """``launch`` over the call's default (``default_launch``), checked (``check_launch``,
    ``check_fold``): what a launch and a compile for these keys run with."""
    cfg = dict(default_launch(fp8, n_tiles), **(launch or {}))
    check_launch(cfg)
    check_fold(cfg, fp8, n_tiles)
    return cfg


def check_fold(cfg: dict, fp8: bool, n_tiles: int) -> None:
    """Raises ValueError where FOLD_SCALE is asked of keys without one scale a row."""
    if cfg["FOLD_SCALE"] and not (fp8 and n_tiles == 1):
        keys = "bf16 keys (no scale)" if not fp8 else f"an FP8 latent with {n_tiles} scales a row"
        raise ValueError(f"launch FOLD_SCALE=True with {keys}: only one scale a row folds into the scores; pass FOLD_SCALE=False")


def compile_for_hopper(fp8: bool, n_tiles: int = 1, launch: Optional[dict] = None):
    """The kernel compiled for sm_90 on any machine (no GPU needed), with the alignment facts a
    launch would give: for checking shared memory, registers and the PTX (``.asm``) off the GPU."""
    cfg = launch_settings(fp8, n_tiles, launch)
    return compile_ws_arguments(_ws_fwd_kernel, fp8, dict(FP8=fp8, N_TILES=n_tiles, **cfg))


def compile_ws_arguments(kernel, fp8: bool, constexprs: dict):
    """``kernel`` (this kernel's argument list: Q, KV, .. sm_scale_log2, then ``constexprs``)
    compiled for sm_90 with the alignment facts a launch gives; KV e4m3 (``fp8``) or bf16."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = {"Q": "*bf16", "KV": "*fp8e4nv" if fp8 else "*bf16", "KV_SCALE": "*fp32", "KV_ROPE": "*bf16", "IDX": "*i32",
           "OUT": "*bf16", "LSE": "*fp32"}
    for name in ("stride_qt", "stride_qh", "stride_kvs", "stride_ss", "stride_rs", "stride_it", "stride_ot", "stride_oh",
                 "stride_lt", "S_KV", "TOPK", "H"):
        sig[name] = "i32"
    sig["sm_scale_log2"] = "fp32"
    sig.update({k: "constexpr" for k in constexprs})
    names = list(sig)
    aligned = ("Q", "KV", "KV_SCALE", "KV_ROPE", "IDX", "OUT", "LSE", "stride_qt", "stride_qh", "stride_kvs", "stride_it", "stride_ot", "stride_oh")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return triton.compile(GluonASTSource(kernel, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def check_register_settings(cfg: dict, keys: tuple = ("CONSUMER_REGS", "PRODUCER_REGS")) -> None:
    """Raises ValueError where a partition's registers (``cfg[key]`` for each of ``keys``) are not a
    setmaxnreg value."""
    for key in keys:
        if cfg[key] % 8 or not 24 <= cfg[key] <= 256:
            raise ValueError(f"launch {key}={cfg[key]}: setmaxnreg takes a multiple of 8 in 24..256")


def check_row_counts(kv_latent: torch.Tensor, kv_rope: torch.Tensor, kv_scale: Optional[torch.Tensor]) -> None:
    """Raises ValueError where the rope or the scales have fewer rows than the latent."""
    rows = kv_latent.shape[0]
    for name, part in (("kv_rope", kv_rope), ("kv_scale", kv_scale)):
        if part is not None and part.shape[0] < rows:
            raise ValueError(f"{name} has {part.shape[0]} rows for a latent of {rows}: one per latent row")


REG_BUDGET = 504  # registers a thread-slot for the three 128-thread partitions (168 x 384 / 128)


def check_launch(cfg: dict) -> None:
    """Raises ValueError naming the launch setting this kernel cannot run with."""
    unknown = set(cfg) - set(LAUNCH_BF16)
    if unknown:
        raise ValueError(f"launch: unknown setting(s) {sorted(unknown)}; the settings are {sorted(LAUNCH_BF16)}")
    if cfg["BLOCK_N"] != 64 or cfg["STAGES"] != 2:
        raise ValueError(f"launch BLOCK_N={cfg['BLOCK_N']} STAGES={cfg['STAGES']}: only 64 and 2 (Q and two 64-key slots fill "
                         "shared memory; the FP8 staging and the pair schedule assume them)")
    check_register_settings(cfg)
    if cfg["FOLD_SCALE"] and not (cfg["CHUNK_BUFFERS"] and cfg["SPLIT_S"]):
        raise ValueError("launch FOLD_SCALE=True needs CHUNK_BUFFERS=True and SPLIT_S=True (the scores' latent and rope products "
                         "kept apart); pass FOLD_SCALE=False with CHUNK_BUFFERS=False or SPLIT_S=False (LAUNCH_FP8_ROWS has FOLD_SCALE=True)")
    needs_split = [key for key in ("CHUNKED", "PRODUCER_DEFAULT", "CHUNK_BUFFERS") if cfg[key]]
    if not cfg["SPLIT_S"] and needs_split:
        raise ValueError(f"launch SPLIT_S=False with {', '.join(f'{key}=True' for key in needs_split)}: those need SPLIT_S=True "
                         "(the unsplit schedule waits for whole slots, reads the ring as one buffer and always runs the producer "
                         f"as a worker); pass {', '.join(f'{key}=False' for key in needs_split)} with SPLIT_S=False "
                         "(LAUNCH_BF16 has CHUNKED=True, LAUNCH_FP8 CHUNK_BUFFERS=True)")
    # The launch gets 168 registers a thread for 384 threads: 504 per 128-thread partition, of
    # which the default partition keeps what the two workers do not take.
    c, p = cfg["CONSUMER_REGS"], cfg["PRODUCER_REGS"]
    if cfg["PRODUCER_DEFAULT"] and p != REG_BUDGET - 2 * c:
        raise ValueError(f"launch PRODUCER_DEFAULT with CONSUMER_REGS={c}: the producer gets {REG_BUDGET} - 2 * {c} = "
                         f"{REG_BUDGET - 2 * c} registers, not PRODUCER_REGS={p}; pass PRODUCER_REGS={REG_BUDGET - 2 * c}")
    if not cfg["PRODUCER_DEFAULT"] and 2 * c + p > REG_BUDGET:
        raise ValueError(f"launch CONSUMER_REGS={c} PRODUCER_REGS={p}: consumer warpgroup 0 (the default partition) would get "
                         f"{REG_BUDGET - c - p}, not {c}; keep 2 * consumer + producer <= {REG_BUDGET}")


def forward(q, kv_latent, kv_scale, kv_rope, indices, sm_scale: float, launch: Optional[dict] = None):
    """out [T, H, 512] and lse [T, H] of sparse MLA over a latent in FP8 (``kv_scale`` one scale
    per row or per 128-column tile) or bf16 (``kv_scale`` None), rope bf16; indices [T, 1, topk]."""
    fp8 = kv_scale is not None
    n_tiles = kv_scale.shape[1] if fp8 else 1
    cfg = launch_settings(fp8, n_tiles, launch)
    t, heads, _ = q.shape
    q, indices = q.contiguous(), indices.contiguous()
    topk = indices.shape[-1]
    out = torch.empty((t, heads, _D_LAT), dtype=q.dtype, device=q.device)
    lse = torch.empty((t, heads), dtype=torch.float32, device=q.device)
    if t == 0:
        return out, lse
    if n_tiles not in (1, 4):
        raise ValueError(f"kv_scale has {n_tiles} scales a row; the warp-specialized kernel takes 1 or 4")
    bad = _misaligned(kv_latent, kv_rope)
    if bad is not None:
        raise ValueError(f"{bad}; pass a contiguous copy")
    check_row_counts(kv_latent, kv_rope, kv_scale)
    if fp8 and kv_scale.stride(1) != 1:
        raise ValueError(f"kv_scale stride {tuple(kv_scale.stride())}: a row's scales must be contiguous; pass kv_scale.contiguous()")
    scale = kv_scale if fp8 else lse
    _ws_fwd_kernel[(t * triton.cdiv(heads, _BLOCK_H),)](
        q, kv_latent, scale, kv_rope, indices, out, lse,
        q.stride(0), q.stride(1), kv_latent.stride(0), scale.stride(0) if fp8 else 0, kv_rope.stride(0),
        indices.stride(0), out.stride(0), out.stride(1), lse.stride(0),
        kv_latent.shape[0], topk, heads, float(sm_scale) * LOG2E,
        FP8=fp8, N_TILES=n_tiles, num_warps=4, **cfg,
    )
    return out, lse
