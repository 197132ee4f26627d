"""Sparse MLA forward for few heads a GPU (16: DeepSeek-V3.2 at TP 8), in Triton's Gluon dialect.
The reference beside it is reference.py / fp8_reference.py.

Why a third forward: with 16 heads a token the work is bound by the gathered bytes, not by the
MMAs, so what counts is how many key rows are in flight. The Triton kernel keeps Q (all 576
columns, for every warp: mma.sync splits the 16 x n scores by keys) and the next FP8 block in
registers, reaches 255 registers and two 4-warp programs an SM, and its FP8 keys ran slower than
bf16 keys (benchmarks/RESULTS.md). Here:

- the key rows (latent, rope, scales) are copied asynchronously into a ring of STAGES
  shared-memory slots, several blocks ahead, without registers;
- an FP8 latent is read from its slot 8 bytes a thread, dequantized (e4m3 x scale in fp32, then
  bf16) and written to one bf16 tile that both products read; bf16 keys are read in their slot;
- Q stays in shared memory and is read 64 columns at a time for each product (mma.sync, 16 x 8
  tiles: 16 heads fill the rows, no padding; the WS form holds Q's operands in registers);
- the top-k is split over programs (flash-decoding) as in the Triton kernel, whose combine kernel
  merges the partial softmax states.

One program per (query token, block of 16 heads, top-k split), 4 warps, no warp specialization:
the same warps dequantize and run the MMAs, one after the other. For FP8 latents three
warp-specialized kernels share this module's steps: ``WGMMA`` (gluon_fewhead_wgmma, the default
for FlashMLA's four scales a row: keys as the rows of warpgroup MMAs, converted into an f16 tile
beside the MMAs), ``REG_A`` (gluon_fewhead_rega, the default for one scale a row: the same
products with the keys read from the gathered bytes straight into the MMAs' registers) and ``WS``
(gluon_fewhead_ws: this module's mma.sync step).
Shapes are DeepSeek's MLA latent 512 (the value) + rope 64, one key group; ``declines`` says which
calls go to the Triton kernel instead.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from .gluon_common import HAVE_GLUON, key_operands_problem, platform_problem

if HAVE_GLUON:
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    from .gluon_common import async_copy, async_rows, gl, gluon, partition_barrier, smem_view

LOG2E = 1.4426950408889634
ENV_OFF = "MLA_COMPILER_FEWHEAD"  # =0: never take this kernel
_D_LAT, _D_ROPE, _BLOCK_H = 512, 64, 16
LAST_LAUNCH: dict = {}  # the settings of the last launch, with the SPLITS chosen
MAX_ROWS = 2048  # key rows a program (held in shared memory: 8 KB)
MAX_HEADS = 32  # heads a key group up to which this kernel is chosen (above, the MMAs bound the work)

# Launch: keys a block, ring slots, warps, score accumulators, and WS: the warp-specialized kernel
# of gluon_fewhead_ws (FP8 only; two bf16 tiles, so 32-key blocks; DEQUANT_REGS registers a thread
# for its dequantizing partition; Q_HELD: Q's latent operands held in the MMA partition's
# registers). SPLITS, the top-k splits, is chosen per call unless given. Measured on H200 at the
# V3.2 decode shape with 16 heads, unsplit (benchmarks/bench_decode_launch.py, RESULTS.md,
# 2026-11-28, fifth call set), FlashMLA layout / row scale: WS with Q held 0.099 / 0.093 ms, WS
# with Q read from shared memory 0.110 / 0.107, this kernel (64 x 2) 0.113 / 0.105; bf16 keys
# 64 x 2 0.086-0.088 (32 keys 0.101). WS with one score accumulator 0.117 / 0.112, two 0.116 /
# 0.109 (Q read from shared memory). Earlier: 3 slots 0.124-0.129 (FP8, split); 8 warps
# 0.108-0.146 (split).
LAUNCH_BF16 = dict(BLOCK_N=64, STAGES=2, NUM_WARPS=4, QK_CHAINS=1, WS=False, WGMMA=False)
LAUNCH_FP8 = dict(BLOCK_N=64, STAGES=2, NUM_WARPS=4, QK_CHAINS=1, WS=False, WGMMA=False)  # FP8 without warp specialization
LAUNCH_WS = dict(BLOCK_N=32, STAGES=4, NUM_WARPS=4, DEQUANT_REGS=128, QK_CHAINS=4, WS=True, Q_HELD=True, WGMMA=False)
# WGMMA: gluon_fewhead_wgmma's kernel (FP8 only, warp-specialized): keys as the rows of warpgroup
# MMAs, so 64-key blocks; STAGES counts its ring's 32-key half slots; TILES its tiles (2:
# dequantization beside the MMAs, 1: room for a deeper ring); L2_AHEAD: half blocks past the
# ring whose rows are prefetched into L2 (0: none); F16: the latent staged as f16, with the scales
# on the scores and P (else dequantized into bf16 tiles); DQ_WARPS: warps of its dequantizing
# partition (4 or 8; the MMA partition has 4). H200, same shape, FlashMLA layout / row scale
# (RESULTS.md): sixth call set, bf16 tiles 0.093 / 0.089 ms, TILES=1 with 5 half slots 0.103 /
# 0.098, L2_AHEAD 2-8 within 1 % of none (on a disturbed device); seventh, F16 0.086 / 0.078,
# bf16 tiles 0.095 / 0.089, F16 with L2_AHEAD=4 0.091 / 0.083 (bf16 keys 0.088); eighth (CUDA
# graphs), DQ_WARPS=8 0.0872 / 0.0786 against 0.0848 / 0.0787 with 4.
LAUNCH_WGMMA = dict(BLOCK_N=64, STAGES=2, NUM_WARPS=4, DEQUANT_REGS=128, QK_CHAINS=1, WS=True, WGMMA=True, TILES=2, L2_AHEAD=0,
                    F16=True, DQ_WARPS=4, REG_A=False)
# REG_A: gluon_fewhead_rega's kernel instead (the WGMMA form with the keys read from the ring
# slot into the MMAs' registers, no converted tile; F16's scales): STAGES counts its slots of
# whole 64-key blocks (default 4), DEQUANT_REGS its copy partition's registers (default 56).
REG_A_STAGES, REG_A_COPY_REGS = 4, 56
SETTINGS = ("BLOCK_N", "STAGES", "SPLITS", "NUM_WARPS", "WS", "DEQUANT_REGS", "QK_CHAINS", "Q_HELD", "WGMMA", "TILES", "L2_AHEAD",
            "F16", "DQ_WARPS", "REG_A")
SHARED_LIMIT = 227 * 1024  # bytes of shared memory a Hopper block may use
SCRATCH_BYTES = 4096  # the compiler's own shared memory (reductions, layout conversions): 1-2 KB measured


def shared_bytes(fp8: bool, n_tiles: int, block_n: int, stages: int, blocks_per_split: int, ws: bool = False,
                 wgmma: bool = False, tiles: int = 2, f16: bool = False, reg_a: bool = False) -> int:
    """Shared memory the kernel needs, at most: Q, the split's rows, the ring (latent, rope,
    scales; WGMMA: slots of half a block), for an FP8 latent the bf16 tile it is dequantized into
    (WS: ``tiles``, each with the rope, and its barriers (WGMMA: five); WGMMA: and P, 64 x 16 bf16;
    F16: one P per scale of a row, the tiles' scales and Q's powers of two), and the compiler's scratch."""
    rows = 4 * triton.next_power_of_2(blocks_per_split) * block_n
    if reg_a:  # Q (f16 latent), the rows, the ring of whole blocks, a P per scale of a row, barriers
        return (2 * _BLOCK_H * (_D_LAT + _D_ROPE) + rows + stages * block_n * (_D_LAT + 2 * _D_ROPE + 4 * n_tiles)
                + n_tiles * 2 * block_n * _BLOCK_H + 4 * _BLOCK_H + 16 * stages + SCRATCH_BYTES)
    slot = (block_n // 2 if wgmma else block_n) * (_D_LAT * (1 if fp8 else 2) + 2 * _D_ROPE + (4 * n_tiles if fp8 else 0))
    return (2 * _BLOCK_H * (_D_LAT + _D_ROPE) + rows + stages * slot
            + ((tiles * (2 * block_n * (_D_LAT + _D_ROPE) + 40) if ws else 2 * block_n * _D_LAT) if fp8 else 0)
            + (2 * block_n * _BLOCK_H if wgmma else 0) + SCRATCH_BYTES
            + ((n_tiles - 1) * 2 * block_n * _BLOCK_H + tiles * n_tiles * 4 * block_n + 4 * _BLOCK_H if f16 else 0))


def declines(q: torch.Tensor, kv_latent: torch.Tensor, kv_scale: Optional[torch.Tensor], kv_rope: Optional[torch.Tensor],
             d_v: int, attn_sink=None, topk_length=None, h_kv: int = 1) -> Optional[str]:
    """Why this kernel does not take the call (None when it does). ``kv_latent``: the first 512
    columns of bf16 keys (``kv_scale`` None) or an e4m3 latent with ``kv_scale``."""
    # It would compile for sm_89+ (mma.sync, e4m3 conversion), but its launches are sized for
    # Hopper's shared memory (170-190 KB) and it has been run on Hopper only.
    problem = platform_problem(q, ENV_OFF, "sized for and run on sm_90 only", h_kv)
    if problem is not None:
        return problem
    if q.shape[1] == 0:
        return "no heads"
    if q.shape[1] > MAX_HEADS:
        return f"{q.shape[1]} heads (this kernel is for {MAX_HEADS} or fewer; more heads make the MMAs the bound)"
    if kv_latent.shape[1] != _D_LAT or kv_rope is None or kv_rope.shape[1] != _D_ROPE or d_v != _D_LAT or q.shape[2] != _D_LAT + _D_ROPE:
        rope = None if kv_rope is None else kv_rope.shape[1]
        return f"latent {kv_latent.shape[1]} / rope {rope} / d_v {d_v} / query {q.shape[2]} (512 / 64 / 512 / 576 only)"
    if attn_sink is not None or topk_length is not None:
        return "attn_sink / topk_length (not implemented here)"
    return key_operands_problem(kv_latent, kv_scale, kv_rope) or _misaligned(kv_latent, kv_rope)


def _misaligned(kv_latent: torch.Tensor, kv_rope: torch.Tensor) -> Optional[str]:
    """Which operand breaks the 16-byte copies (rows contiguous and 16 bytes apart, 16-byte
    aligned start), or None."""
    for name, tensor in (("kv_latent", kv_latent), ("kv_rope", kv_rope)):
        if tensor.stride(1) != 1 or tensor.stride(0) * tensor.element_size() % 16 or tensor.data_ptr() % 16:
            return (f"{name}: rows not contiguous or not 16-byte aligned (stride {tuple(tensor.stride())}, "
                    f"address mod 16 = {tensor.data_ptr() % 16})")
    return None


if HAVE_GLUON:
    D_LAT, D_ROPE, BLOCK_H = gl.constexpr(_D_LAT), gl.constexpr(_D_ROPE), gl.constexpr(_BLOCK_H)

    @gluon.jit
    def _rows_at_pitch(base, rows, stride_bytes, dtype: gl.constexpr):
        """Pointers to rows ``rows`` of a table whose row pitch is in bytes (FlashMLA's 656-byte
        rows: not a whole number of 16-element rows for the rope or the scales)."""
        return (base.to(gl.pointer_type(gl.uint8), bitcast=True) + rows * stride_bytes).to(gl.pointer_type(dtype), bitcast=True)

    @gluon.jit
    def _issue_rope_and_scales(rows, slot, rope_ring, scale_ring, KV_SCALE, KV_ROPE, stride_ss, stride_rs,
                               FP8: gl.constexpr, N_TILES: gl.constexpr, NW: gl.constexpr, scale_slots=None):
        """Starts the asynchronous copies of the rope and (FP8) the scales of the key rows
        ``rows`` (a shared-memory vector, -1 invalid) into ring slot ``slot``; ``scale_slots`` as in
        _issue_block."""
        rope_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NW, 1], [1, 0])
        r_rows = rows.load(gl.SliceLayout(1, rope_layout)).to(gl.int64)
        r_cols = gl.arange(0, D_ROPE, layout=gl.SliceLayout(0, rope_layout))
        # The host checked 16-byte rows; pitches are in bytes (FlashMLA's 656-byte rows).
        rope_rows = _rows_at_pitch(KV_ROPE, r_rows, stride_rs, gl.bfloat16)
        rope_ptr = gl.max_contiguous(gl.multiple_of(rope_rows[:, None] + r_cols[None, :], [16, 16]), [1, D_ROPE])
        async_rows(rope_ring.index(slot), rope_ptr, mask=(r_rows >= 0)[:, None])
        if FP8:
            if scale_slots is not None and N_TILES == 4:
                # [4 tiles, rows]: 4 tiles x 8 rows a warp, the row's 16 bytes from 4 adjacent lanes.
                tiles_layout: gl.constexpr = gl.BlockedLayout([1, 1], [4, 8], [1, NW], [0, 1])
                t_rows = rows.load(gl.SliceLayout(0, tiles_layout)).to(gl.int64)
                t_ptr = _rows_at_pitch(KV_SCALE, t_rows, stride_ss, gl.float32)[None, :] \
                    + gl.arange(0, 4, layout=gl.SliceLayout(1, tiles_layout))[:, None]
                async_rows(scale_slots.index(slot), t_ptr, mask=(t_rows >= 0)[None, :])
            else:
                sc_layout: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
                s_rows = rows.load(sc_layout).to(gl.int64)
                sc_rows = _rows_at_pitch(KV_SCALE, s_rows, stride_ss, gl.float32)
                for tile in gl.static_range(N_TILES):
                    async_rows(scale_ring.index(slot * N_TILES + tile), sc_rows + tile, mask=s_rows >= 0)

    @gluon.jit
    def _issue_block(j, n_blocks, rows_smem, lat_ring, rope_ring, scale_ring, KV, KV_SCALE, KV_ROPE,
                     stride_kvs, stride_ss, stride_rs,
                     FP8: gl.constexpr, N_TILES: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, NW: gl.constexpr,
                     scale_slots=None):
        """Starts the asynchronous copies of block j's rows into slot j % STAGES (nothing past the
        last block; rows -1 copy nothing and are zero-filled), then closes the copy group: one
        group a block, empty or not, so that waiting on 'all but the newest STAGES - 1 groups'
        always means block j - STAGES + 1 has landed. ``scale_slots``: the scale ring's bytes as
        [STAGES, N_TILES, BLOCK_N]; with it, the four scales of the rows go in one copy, a scale a
        thread (a copy per tile over the rows is repeated by every warp, and each is ordered after
        the last by a barrier)."""
        if j < n_blocks:
            slot = j % STAGES
            lat_layout: gl.constexpr = gl.BlockedLayout([1, 16], [1, 32], [NW, 1], [1, 0]) if FP8 else gl.BlockedLayout([1, 8], [1, 32], [NW, 1], [1, 0])
            rows = rows_smem.index(j).load(gl.SliceLayout(1, lat_layout)).to(gl.int64)
            cols = gl.arange(0, D_LAT, layout=gl.SliceLayout(0, lat_layout))
            lat_ptr = KV + rows[:, None] * stride_kvs + cols[None, :]
            lat_ptr = gl.max_contiguous(gl.multiple_of(lat_ptr, [16, 16]), [1, D_LAT])
            async_rows(lat_ring.index(slot), lat_ptr, mask=(rows >= 0)[:, None])
            _issue_rope_and_scales(rows_smem.index(j), slot, rope_ring, scale_ring, KV_SCALE, KV_ROPE, stride_ss, stride_rs, FP8, N_TILES,
                                   NW, scale_slots)
        async_copy.commit_group()

    @gluon.jit
    def _dequantize_chunk(lat_ring, scale_ring, k_tile, slot, c: gl.constexpr, N_TILES: gl.constexpr, NW: gl.constexpr):
        """Columns c*128 .. c*128+127 of the FP8 latent in ring slot ``slot``, e4m3 x scale in fp32,
        into the bf16 tile. (The row scale applied to the scores and P instead, the e4m3 values
        converted as they are, measured slower here: 0.147 vs 0.119 ms; gluon_fewhead_wgmma's F16.)"""
        _dequantize_into(lat_ring, scale_ring, k_tile.slice(c * 128, 128, dim=1), slot, c, N_TILES, NW)

    @gluon.jit
    def _dequantize_into(lat_ring, scale_ring, dst, slot, c: gl.constexpr, N_TILES: gl.constexpr, NW: gl.constexpr):
        """_dequantize_chunk into ``dst``, the chunk's own [rows, 128] bf16 buffer."""
        # 8 values a thread, 16 threads a row: each 8-thread phase reads 64 contiguous FP8 bytes
        # and writes 8 distinct 16-byte bank groups of the swizzled tile. (16 values a thread,
        # 8 threads a row, stored with 6.6-7.7-way bank conflicts: Nsight Compute, H200.)
        cvt_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [NW, 1], [1, 0])
        raw = lat_ring.index(slot).slice(c * 128, 128, dim=1).load(cvt_layout)
        sc = scale_ring.index(slot * N_TILES + c % N_TILES).load(gl.SliceLayout(1, cvt_layout))
        dst.store((raw.to(gl.float32) * sc[:, None]).to(gl.bfloat16))

    @gluon.jit
    def _split_coords(H, TOPK, SPLITS: gl.constexpr, BLOCK_N: gl.constexpr):
        """(query token as int64, head block, split, first and end key of the split) of this
        program. The split, then the head block vary fastest: a token's programs run side by side
        and share its rows in L2."""
        pid = gl.program_id(0)
        n_hb = gl.cdiv(H, BLOCK_H)
        sp = pid % SPLITS
        hb = (pid // SPLITS) % n_hb
        t = (pid // (SPLITS * n_hb)).to(gl.int64)
        chunk = gl.cdiv(gl.cdiv(TOPK, SPLITS), BLOCK_N) * BLOCK_N
        n_lo = sp * chunk
        return t, hb, sp, n_lo, gl.minimum(n_lo + chunk, TOPK)

    @gluon.jit
    def _q_and_rows_smem(NB_P: gl.constexpr, BLOCK_N: gl.constexpr, Q_FOR_WGMMA: gl.constexpr = False,
                         Q_LAT_DTYPE: gl.constexpr = gl.bfloat16):
        """Shared memory for Q of the program's heads (latent and rope, in the layout mma.sync's
        operand loads read, or with Q_FOR_WGMMA a warpgroup MMA's; the latent as Q_LAT_DTYPE) and
        for the split's key rows: one [NB_P, BLOCK_N] tile, and the same bytes as one block a row."""
        if Q_FOR_WGMMA:
            lat_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_LAT], Q_LAT_DTYPE)
            rope_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_ROPE], gl.bfloat16)
        else:
            lat_smem: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, [1, 0])
            rope_smem: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, [1, 0])
        q_lat = gl.allocate_shared_memory(Q_LAT_DTYPE, [BLOCK_H, D_LAT], lat_smem)
        q_rope = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, D_ROPE], rope_smem)
        rows_2d = gl.allocate_shared_memory(gl.int32, [NB_P, BLOCK_N], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        rows_smem = smem_view(rows_2d, gl.int32, [NB_P, BLOCK_N], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        return q_lat, q_rope, rows_2d, rows_smem

    @gluon.jit
    def _stage_rows_and_q(Q, IDX, q_lat, q_rope, rows_2d, t, hb, n_lo, n_hi, stride_qt, stride_qh, stride_it, S_KV, H,
                          BLOCK_N: gl.constexpr, NB_P: gl.constexpr, NW: gl.constexpr, WITH_Q: gl.constexpr = True):
        """The split's key rows into shared memory (-1 where the index is invalid: -1, >= S_KV, past
        the top-k), and (WITH_Q) Q of the program's heads as it is (padded heads 0)."""
        idx_layout: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [NW, 1], [1, 0])
        offs = n_lo + gl.arange(0, NB_P, layout=gl.SliceLayout(1, idx_layout))[:, None] * BLOCK_N \
            + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, idx_layout))[None, :]
        idx = gl.load(IDX + t * stride_it + offs, mask=offs < n_hi, other=-1)
        rows_2d.store(gl.where((idx >= 0) & (idx < S_KV), idx, -1))
        if WITH_Q:
            q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [NW, 1], [1, 0])
            heads = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, q_layout))
            q_row = Q + t * stride_qt + heads[:, None] * stride_qh
            cols = gl.arange(0, D_LAT, layout=gl.SliceLayout(0, q_layout))
            q_lat.store(gl.load(q_row + cols[None, :], mask=(heads < H)[:, None], other=0.0))
            r_cols = gl.arange(0, D_ROPE, layout=gl.SliceLayout(0, q_layout))
            q_rope.store(gl.load(q_row + D_LAT + r_cols[None, :], mask=(heads < H)[:, None], other=0.0))

    @gluon.jit
    def _held_q(q_lat, NW: gl.constexpr):
        """Q's latent as the eight 64-column MMA operands, loaded once and held in registers."""
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NW], instr_shape=[16, 8])
        a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        return (q_lat.slice(0, 64, dim=1).load(a_op), q_lat.slice(64, 64, dim=1).load(a_op), q_lat.slice(128, 64, dim=1).load(a_op),
                q_lat.slice(192, 64, dim=1).load(a_op), q_lat.slice(256, 64, dim=1).load(a_op), q_lat.slice(320, 64, dim=1).load(a_op),
                q_lat.slice(384, 64, dim=1).load(a_op), q_lat.slice(448, 64, dim=1).load(a_op))

    @gluon.jit
    def _attend_block(q_lat, q_rope, q_held, keys, rope, valid, m_i, l_i, acc0, acc1, acc2, acc3, sm_scale_log2,
                      BLOCK_N: gl.constexpr, NW: gl.constexpr, QK_CHAINS: gl.constexpr, Q_HELD: gl.constexpr):
        """One key block of the online softmax: scores against the bf16 latent tile ``keys`` and
        ``rope`` (keys not ``valid`` masked), then P V into the four 128-column accumulators.
        QK_CHAINS (1, 2, 4) independent score accumulators: with 32-key blocks a warp has one
        8-key MMA tile, so one accumulator is a chain of 36 dependent MMAs. Q_HELD: Q's latent
        operands are ``q_held`` (``_held_q``), not read from shared memory again."""
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NW], instr_shape=[16, 8])
        a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        b_op: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        # Q K^T over 576 columns, 64 at a time (64-key blocks: two accumulators measured the same as one).
        zeros = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, mma)
        s0 = mma_v2(q_rope.load(a_op), rope.permute((1, 0)).load(b_op), zeros)
        s1 = zeros
        s2 = zeros
        s3 = zeros
        for c in gl.static_range(D_LAT // 64):
            if Q_HELD:
                q_c = q_held[c]
            else:
                q_c = q_lat.slice(c * 64, 64, dim=1).load(a_op)
            k_c = keys.slice(c * 64, 64, dim=1).permute((1, 0)).load(b_op)
            if c % QK_CHAINS == 0:
                s0 = mma_v2(q_c, k_c, s0)
            elif c % QK_CHAINS == 1:
                s1 = mma_v2(q_c, k_c, s1)
            elif c % QK_CHAINS == 2:
                s2 = mma_v2(q_c, k_c, s2)
            else:
                s3 = mma_v2(q_c, k_c, s3)
        if QK_CHAINS == 1:
            s = s0
        elif QK_CHAINS == 2:
            s = s0 + s1
        else:
            s = (s0 + s1) + (s2 + s3)
        s = gl.where(valid[None, :], s * sm_scale_log2, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_use)
        p = gl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        p_op = gl.convert_layout(p.to(gl.bfloat16), a_op)
        acc0 = mma_v2(p_op, keys.slice(0, 128, dim=1).load(b_op), acc0 * alpha[:, None])
        acc1 = mma_v2(p_op, keys.slice(128, 128, dim=1).load(b_op), acc1 * alpha[:, None])
        acc2 = mma_v2(p_op, keys.slice(256, 128, dim=1).load(b_op), acc2 * alpha[:, None])
        acc3 = mma_v2(p_op, keys.slice(384, 128, dim=1).load(b_op), acc3 * alpha[:, None])
        return m_new, l_i, acc0, acc1, acc2, acc3

    @gluon.jit
    def _store_result(OUT, LSE, PARTIAL, acc0, acc1, acc2, acc3, m_i, l_i, t, hb, sp, T, H, stride_ot, stride_oh, stride_lt,
                      SPLITS: gl.constexpr, NW: gl.constexpr):
        """Unsplit: out (normalized, bf16) and lse (natural log; +inf for a row with no valid key).
        Split: the unnormalized partial state per (split, token, head), acc [512], m (base 2), l,
        in the layout triton_sparse_mla._combine_kernel merges."""
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NW], instr_shape=[16, 8])
        heads_o = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, mma))
        h_ok = heads_o < H
        cols_o = gl.arange(0, 128, layout=gl.SliceLayout(0, mma))
        if SPLITS == 1:
            empty_row = l_i == 0.0
            l_safe = gl.where(empty_row, 1.0, l_i)
            o_row = OUT + t * stride_ot + heads_o[:, None] * stride_oh + cols_o[None, :]
            gl.store(o_row, (acc0 / l_safe[:, None]).to(gl.bfloat16), mask=h_ok[:, None])
            gl.store(o_row + 128, (acc1 / l_safe[:, None]).to(gl.bfloat16), mask=h_ok[:, None])
            gl.store(o_row + 256, (acc2 / l_safe[:, None]).to(gl.bfloat16), mask=h_ok[:, None])
            gl.store(o_row + 384, (acc3 / l_safe[:, None]).to(gl.bfloat16), mask=h_ok[:, None])
            lse = gl.where(empty_row, float("inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
            gl.store(LSE + t * stride_lt + heads_o, lse, mask=h_ok)
        else:
            part = ((sp * T + t) * H + heads_o).to(gl.int64) * (D_LAT + 2)
            p_row = PARTIAL + part[:, None] + cols_o[None, :]
            gl.store(p_row, acc0, mask=h_ok[:, None])
            gl.store(p_row + 128, acc1, mask=h_ok[:, None])
            gl.store(p_row + 256, acc2, mask=h_ok[:, None])
            gl.store(p_row + 384, acc3, mask=h_ok[:, None])
            gl.store(PARTIAL + part + D_LAT, m_i, mask=h_ok)
            gl.store(PARTIAL + part + D_LAT + 1, l_i, mask=h_ok)

    @gluon.jit
    def _fewhead_fwd_kernel(
        Q, KV, KV_SCALE, KV_ROPE, IDX, OUT, LSE, PARTIAL,
        stride_qt, stride_qh, stride_kvs, stride_ss, stride_rs, stride_it, stride_ot, stride_oh, stride_lt,
        S_KV, TOPK, H, T, sm_scale_log2,
        FP8: gl.constexpr, N_TILES: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SPLITS: gl.constexpr,
        NB_P: gl.constexpr, NW: gl.constexpr, QK_CHAINS: gl.constexpr,
    ):
        t, hb, sp, n_lo, n_hi = _split_coords(H, TOPK, SPLITS, BLOCK_N)
        n_blocks = gl.cdiv(n_hi - n_lo, BLOCK_N)
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NW], instr_shape=[16, 8])
        row_l: gl.constexpr = gl.SliceLayout(1, mma)
        col_l: gl.constexpr = gl.SliceLayout(0, mma)
        operand_smem: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, [1, 0])
        plain_smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        vec_smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])

        q_lat, q_rope, rows_2d, rows_smem = _q_and_rows_smem(NB_P, BLOCK_N)
        rope_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D_ROPE], operand_smem)
        if FP8:
            lat_ring = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, D_LAT], plain_smem)
            scale_ring = gl.allocate_shared_memory(gl.float32, [STAGES * N_TILES, BLOCK_N], vec_smem)
            k_tile = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_N, D_LAT], operand_smem)
        else:
            lat_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D_LAT], operand_smem)
            scale_ring = rope_ring  # not used
        _stage_rows_and_q(Q, IDX, q_lat, q_rope, rows_2d, t, hb, n_lo, n_hi, stride_qt, stride_qh, stride_it, S_KV, H, BLOCK_N, NB_P, NW)
        partition_barrier()

        for j in gl.static_range(STAGES - 1):
            _issue_block(j, n_blocks, rows_smem, lat_ring, rope_ring, scale_ring, KV, KV_SCALE, KV_ROPE,
                         stride_kvs, stride_ss, stride_rs, FP8, N_TILES, BLOCK_N, STAGES, NW)

        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, row_l)
        l_i = gl.zeros([BLOCK_H], gl.float32, row_l)
        acc0 = gl.zeros([BLOCK_H, 128], gl.float32, mma)
        acc1 = gl.zeros([BLOCK_H, 128], gl.float32, mma)
        acc2 = gl.zeros([BLOCK_H, 128], gl.float32, mma)
        acc3 = gl.zeros([BLOCK_H, 128], gl.float32, mma)
        for i in range(n_blocks):
            _issue_block(i + STAGES - 1, n_blocks, rows_smem, lat_ring, rope_ring, scale_ring, KV, KV_SCALE, KV_ROPE,
                         stride_kvs, stride_ss, stride_rs, FP8, N_TILES, BLOCK_N, STAGES, NW)
            slot = i % STAGES
            async_copy.wait_group(STAGES - 1)  # this thread's copies of block i have landed
            partition_barrier()  # ... and every thread's
            if FP8:
                for c in gl.static_range(4):
                    _dequantize_chunk(lat_ring, scale_ring, k_tile, slot, c, N_TILES, NW)
                partition_barrier()
                keys = k_tile
            else:
                keys = lat_ring.index(slot)
            valid = rows_smem.index(i).load(col_l) >= 0
            m_i, l_i, acc0, acc1, acc2, acc3 = _attend_block(q_lat, q_rope, None, keys, rope_ring.index(slot), valid, m_i, l_i,
                                                             acc0, acc1, acc2, acc3, sm_scale_log2, BLOCK_N, NW, QK_CHAINS, False)
            # Every warp is past this block's reads (slot, tile) before they are overwritten.
            partition_barrier()
        async_copy.wait_group(0)
        _store_result(OUT, LSE, PARTIAL, acc0, acc1, acc2, acc3, m_i, l_i, t, hb, sp, T, H, stride_ot, stride_oh, stride_lt, SPLITS, NW)


def splits_for(tokens: int, heads: int, topk: int, block_n: int, sms: int) -> int:
    """Top-k splits: none where the tokens give about every SM a program (one fits an SM: its
    ring and bf16 tiles take 170-190 KB), else enough to give each SM one, each with 4 blocks or
    more, none empty. H200, b64 h16 (128 programs, 132 SMs), 64-key launches (fourth call set):
    unsplit 0.087 ms bf16 / 0.109 FP8 row,
    2 splits 0.099 / 0.118, 3 splits 0.107 / 0.126. Smaller batches are not measured."""
    programs = tokens * triton.cdiv(heads, _BLOCK_H)
    blocks = triton.cdiv(topk, block_n)
    wanted = 1 if 4 * programs >= 3 * sms else max(1, min(triton.cdiv(sms, programs), blocks // 4, 16))
    return triton.cdiv(blocks, triton.cdiv(blocks, wanted))


# One scale a row, no launch given: the register-operand kernel with 3 slots. H200, b64 h16, CUDA
# graphs (RESULTS.md, eleventh call set): 0.0680 ms against 0.0786 for LAUNCH_WGMMA. Four scales a
# row keep LAUNCH_WGMMA (the register-operand kernel spills there: 0.116 against 0.085 ms).
LAUNCH_ROW_SCALE = dict(REG_A=True, STAGES=3)


def default_launch(fp8: bool, n_tiles: int = 4) -> dict:
    """The measured-fastest launch for the key type: bf16 keys, or an FP8 latent with ``n_tiles``
    scales a row (4: the warp-specialized kernel with keys as warpgroup MMA rows and an f16 tile;
    1: the same with the keys read straight into the MMAs' registers, LAUNCH_ROW_SCALE)."""
    if fp8 and n_tiles == 1:
        return launch_settings(True, LAUNCH_ROW_SCALE)
    return dict(LAUNCH_WGMMA if fp8 else LAUNCH_BF16)


def launch_settings(fp8: bool, launch: Optional[dict]) -> dict:
    """The launch's settings: ``launch`` over the key type's default (``default_launch``; with
    ``WGMMA`` or ``WS`` given, or a setting only the mma.sync kernels have, that kernel's
    defaults), each checked (ValueError naming the setting)."""
    launch = dict(launch or {})
    unknown = set(launch) - set(SETTINGS)
    if unknown:
        raise ValueError(f"launch: unknown setting(s) {sorted(unknown)}; the settings are {', '.join(SETTINGS)}")
    # Settings only the mma.sync kernels have (32-key blocks included) choose them unless WGMMA is given.
    mma_sync_only = bool({"WS", "Q_HELD", "QK_CHAINS", "NUM_WARPS"} & set(launch)) or launch.get("BLOCK_N", 64) != 64
    wgmma = bool(launch["WGMMA"]) if "WGMMA" in launch else default_launch(fp8)["WGMMA"] and not mma_sync_only
    if wgmma and "WS" in launch and not launch["WS"]:
        raise ValueError(f"launch WGMMA=True with WS={launch['WS']}: the WGMMA kernel is warp-specialized; drop WS")
    ws = wgmma or bool(launch.get("WS", default_launch(fp8)["WS"]))
    if ws and not fp8:
        raise ValueError(f"launch {'WGMMA' if wgmma else 'WS'}=True with bf16 keys: its partitions split dequantization from the MMAs, "
                         "so it takes an FP8 latent only")
    cfg = dict(LAUNCH_WGMMA if wgmma else LAUNCH_WS if ws else LAUNCH_FP8 if fp8 else LAUNCH_BF16, **launch)
    cfg.update(WS=ws, WGMMA=wgmma)  # as booleans: WS=0 is WS=False
    if wgmma:
        if cfg["BLOCK_N"] != 64:
            raise ValueError(f"launch WGMMA=True BLOCK_N={cfg['BLOCK_N']}: 64 (the keys are a warpgroup MMA's 64 rows)")
        for key in ("Q_HELD", "QK_CHAINS"):
            if key in launch:
                raise ValueError(f"launch {key}={launch[key]} with WGMMA=True: a setting of the mma.sync kernels only")
        if cfg["TILES"] not in (1, 2):
            raise ValueError(f"launch TILES={cfg['TILES']}: 1 or 2 bf16 tiles")
        if cfg["L2_AHEAD"] not in range(0, 17):
            raise ValueError(f"launch L2_AHEAD={cfg['L2_AHEAD']}: 0..16 half blocks")
        if cfg["DQ_WARPS"] not in (4, 8):
            raise ValueError(f"launch DQ_WARPS={cfg['DQ_WARPS']}: 4 or 8 warps in the dequantizing partition")
        # 65536 registers an SM; this keeps 256 a thread for the MMA partition's 128 threads (a
        # conservative rule: the compiler gave it 248 with 8 warps at 128).
        if cfg["DQ_WARPS"] * 32 * cfg["DEQUANT_REGS"] > 65536 - 128 * 256:
            raise ValueError(f"launch DQ_WARPS={cfg['DQ_WARPS']} DEQUANT_REGS={cfg['DEQUANT_REGS']}: the dequantizing partition would take "
                             f"{cfg['DQ_WARPS'] * 32 * cfg['DEQUANT_REGS']} of the 32768 registers the MMA partition leaves; "
                             f"use DEQUANT_REGS <= {32768 // (cfg['DQ_WARPS'] * 32)}")
        cfg["F16"] = bool(cfg["F16"])
        cfg["REG_A"] = bool(cfg["REG_A"])
        if cfg["REG_A"]:
            if not cfg["F16"]:
                raise ValueError("launch REG_A=True with F16=False: the register-operand kernel takes the scales as F16 does; drop F16")
            for key in ("TILES", "L2_AHEAD", "DQ_WARPS"):
                if key in launch:
                    raise ValueError(f"launch {key}={launch[key]} with REG_A=True: a setting of the converting WGMMA kernel only")
            if "STAGES" not in launch:
                cfg["STAGES"] = REG_A_STAGES
            if "DEQUANT_REGS" not in launch:
                cfg["DEQUANT_REGS"] = REG_A_COPY_REGS
    else:
        for key in ("TILES", "L2_AHEAD", "F16", "DQ_WARPS", "REG_A"):
            if key in launch:
                raise ValueError(f"launch {key}={launch[key]} without WGMMA=True: a setting of the WGMMA kernel only")
    if cfg["BLOCK_N"] not in (32, 64) or not 2 <= cfg["STAGES"] <= 8:
        raise ValueError(f"launch BLOCK_N={cfg['BLOCK_N']} STAGES={cfg['STAGES']}: BLOCK_N 32 or 64, STAGES 2..8")
    if cfg["NUM_WARPS"] not in (4, 8) or cfg["NUM_WARPS"] * 8 > cfg["BLOCK_N"] or (ws and cfg["NUM_WARPS"] != 4):
        raise ValueError(f"launch NUM_WARPS={cfg['NUM_WARPS']} BLOCK_N={cfg['BLOCK_N']}: 4 or 8 warps, each with 8 or more of the "
                         "block's keys (WS: 4, a partition)")
    if cfg["QK_CHAINS"] not in (1, 2, 4):
        raise ValueError(f"launch QK_CHAINS={cfg['QK_CHAINS']}: 1, 2 or 4 score accumulators")
    for key in ("Q_HELD", "DEQUANT_REGS"):
        if key in cfg and not ws:
            raise ValueError(f"launch {key}={cfg[key]} without WS=True: a setting of the warp-specialized kernel's partitions only")
    if ws and (cfg["DEQUANT_REGS"] % 8 or not 24 <= cfg["DEQUANT_REGS"] <= 256):
        raise ValueError(f"launch DEQUANT_REGS={cfg['DEQUANT_REGS']}: a multiple of 8 in 24..256")
    return cfg


def forward(q: torch.Tensor, kv_latent: torch.Tensor, kv_scale: Optional[torch.Tensor], kv_rope: torch.Tensor,
            indices: torch.Tensor, sm_scale: float, launch: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [T, H, 512], lse [T, H]) for q [T, H, 576] against bf16 keys (``kv_latent`` [S, 512]
    bf16, ``kv_scale`` None) or an e4m3 latent with float32 scales [S, 1 or 4]; ``kv_rope`` [S, 64]
    bf16; ``indices`` [T, 1, topk] int32 (-1 or >= S invalid). Call ``declines`` first."""
    from . import triton_sparse_mla as tk

    fp8 = kv_scale is not None
    n_tiles = kv_scale.shape[1] if fp8 else 1
    # No launch: the layout's default (default_launch); a launch is read over LAUNCH_WGMMA's settings.
    cfg = default_launch(fp8, n_tiles) if launch is None else launch_settings(fp8, launch)
    if indices.dtype != torch.int32:
        raise ValueError(f"indices: dtype {indices.dtype}; expected int32 (indices.to(torch.int32))")
    LAST_LAUNCH.clear()
    misaligned = _misaligned(kv_latent, kv_rope)
    if misaligned is not None:  # the copies assume 16-byte rows: never run on others
        raise ValueError(f"{misaligned}; pass contiguous rows (.contiguous()) or use triton_sparse_mla.forward")
    q, indices = q.contiguous(), indices.contiguous()
    t, h, _ = q.shape
    topk = indices.shape[-1]
    out = torch.empty((t, h, _D_LAT), dtype=q.dtype, device=q.device)
    lse = torch.empty((t, h), dtype=torch.float32, device=q.device)
    if t == 0 or h == 0 or topk == 0:
        # Nothing to attend: every row is empty (out 0, lse +inf, as the reference).
        return out.zero_(), lse.fill_(float("inf"))
    block_n = cfg["BLOCK_N"]
    splits = cfg.get("SPLITS") or splits_for(t, h, topk, block_n, torch.cuda.get_device_properties(q.device).multi_processor_count)
    # A program holds its split's rows in shared memory: at most MAX_ROWS of them.
    splits = max(splits, triton.cdiv(topk, MAX_ROWS))
    blocks_per_split = triton.cdiv(triton.cdiv(topk, splits), block_n)
    need = shared_bytes(fp8, n_tiles, block_n, cfg["STAGES"], blocks_per_split, cfg["WS"], cfg["WGMMA"], cfg.get("TILES", 2),
                        cfg.get("F16", False), cfg.get("REG_A", False))
    if need > SHARED_LIMIT:
        fix = "fewer STAGES or TILES=1" if cfg["WGMMA"] else "fewer STAGES or BLOCK_N=32"
        raise ValueError(f"launch BLOCK_N={block_n} STAGES={cfg['STAGES']}: needs {need} bytes of shared memory, "
                         f"{SHARED_LIMIT} fit; use {fix}")
    partial = torch.empty((splits, t, h, _D_LAT + 2), dtype=torch.float32, device=q.device) if splits > 1 else lse
    scale = kv_scale if fp8 else kv_rope
    grid = (t * triton.cdiv(h, _BLOCK_H) * splits,)
    args = (q, kv_latent, scale, kv_rope, indices, out, lse, partial,
            q.stride(0), q.stride(1), kv_latent.stride(0), scale.stride(0) * scale.element_size(), kv_rope.stride(0) * kv_rope.element_size(),
            indices.stride(0), out.stride(0), out.stride(1), lse.stride(0), kv_latent.shape[0], topk, h, t, float(sm_scale) * LOG2E)
    shape = dict(N_TILES=n_tiles, BLOCK_N=block_n, STAGES=cfg["STAGES"], SPLITS=splits, NB_P=triton.next_power_of_2(blocks_per_split),
                 QK_CHAINS=cfg["QK_CHAINS"])
    if cfg.get("REG_A"):
        from .gluon_fewhead_rega import _fewhead_rega_fwd_kernel

        shape.pop("QK_CHAINS")
        _fewhead_rega_fwd_kernel[grid](*args, **shape, DEQUANT_REGS=cfg["DEQUANT_REGS"], num_warps=4)
    elif cfg["WGMMA"]:
        from .gluon_fewhead_wgmma import _fewhead_wgmma_fwd_kernel

        shape.pop("QK_CHAINS")
        _fewhead_wgmma_fwd_kernel[grid](*args, **shape, DEQUANT_REGS=cfg["DEQUANT_REGS"], TILES=cfg["TILES"], L2_AHEAD=cfg["L2_AHEAD"],
                                        F16=cfg["F16"], DQ_WARPS=cfg["DQ_WARPS"], num_warps=4)
    elif cfg["WS"]:
        from .gluon_fewhead_ws import _fewhead_ws_fwd_kernel

        _fewhead_ws_fwd_kernel[grid](*args, **shape, DEQUANT_REGS=cfg["DEQUANT_REGS"], Q_HELD=cfg["Q_HELD"], num_warps=4)
    else:
        _fewhead_fwd_kernel[grid](*args, FP8=fp8, **shape, NW=cfg["NUM_WARPS"], num_warps=cfg["NUM_WARPS"])
    if splits > 1:
        tk.combine_partials(partial, out, lse, None, splits, _D_LAT, _D_LAT)
    LAST_LAUNCH.update(cfg, SPLITS=splits)
    return out, lse


def compile_for_hopper(fp8: bool, n_tiles: int = 1, launch: Optional[dict] = None):
    """The kernel compiled for sm_90 on any machine (no GPU needed), with the alignment facts a
    launch would give: for checking shared memory, registers and the PTX (``.asm``) off the GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    cfg = launch_settings(fp8, launch)
    if cfg.get("REG_A"):
        from .gluon_fewhead_rega import _fewhead_rega_fwd_kernel as kernel
    elif cfg["WGMMA"]:
        from .gluon_fewhead_wgmma import _fewhead_wgmma_fwd_kernel as kernel
    elif cfg["WS"]:
        from .gluon_fewhead_ws import _fewhead_ws_fwd_kernel as kernel
    else:
        kernel = _fewhead_fwd_kernel
    sig = {name: "i32" for name in kernel.arg_names}
    sig.update({"Q": "*bf16", "KV": "*fp8e4nv" if fp8 else "*bf16", "KV_SCALE": "*fp32" if fp8 else "*bf16", "KV_ROPE": "*bf16",
                "IDX": "*i32", "OUT": "*bf16", "LSE": "*fp32", "PARTIAL": "*fp32", "sm_scale_log2": "fp32"})
    splits = cfg.get("SPLITS", 2)
    constexprs = dict(N_TILES=n_tiles, BLOCK_N=cfg["BLOCK_N"], STAGES=cfg["STAGES"], SPLITS=splits,
                      NB_P=triton.next_power_of_2(triton.cdiv(2048, cfg["BLOCK_N"] * splits)), QK_CHAINS=cfg["QK_CHAINS"])
    if cfg.get("REG_A"):
        constexprs.pop("QK_CHAINS")
        constexprs.update(DEQUANT_REGS=cfg["DEQUANT_REGS"])
    elif cfg["WGMMA"]:
        constexprs.pop("QK_CHAINS")
        constexprs.update(DEQUANT_REGS=cfg["DEQUANT_REGS"], TILES=cfg["TILES"], L2_AHEAD=cfg["L2_AHEAD"], F16=cfg["F16"],
                          DQ_WARPS=cfg["DQ_WARPS"])
    elif cfg["WS"]:
        constexprs.update(DEQUANT_REGS=cfg["DEQUANT_REGS"], Q_HELD=cfg["Q_HELD"])
    else:
        constexprs.update(FP8=fp8, NW=cfg["NUM_WARPS"])
    sig.update({name: "constexpr" for name in constexprs})
    names = list(kernel.arg_names)
    aligned = ("Q", "KV", "KV_SCALE", "KV_ROPE", "IDX", "OUT", "LSE", "PARTIAL", "stride_qt", "stride_qh", "stride_kvs", "stride_ss",
               "stride_rs", "stride_it", "stride_ot", "stride_oh")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return triton.compile(GluonASTSource(kernel, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4 if cfg["WS"] else cfg["NUM_WARPS"]})
