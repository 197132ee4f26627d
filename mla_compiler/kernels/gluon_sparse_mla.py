"""Warp-specialized sparse MLA forward for Hopper, in Triton's Gluon dialect (explicit shared
memory, barriers and partitions). The reference beside it is reference.py / fp8_reference.py.

Why a second forward: in the Triton kernel, an FP8 latent is gathered into shared memory, read
back into registers, dequantized and written to shared memory again as bf16 before the MMA, all on
the MMA warps' critical path, and its ring is one stage deep (benchmarks/RESULTS.md). Here a
producer partition (4 warps) gathers the key rows of a block into a ring of two shared-memory slots
while two consumer warpgroups run the MMAs on the other slot. bf16 keys arrive by asynchronous
copies; an FP8 latent is copied the same way into the upper half of its slot and dequantized there,
in place, into the bf16 tile (``IN_SLOT``; through registers instead, the payload in flight takes
registers the consumers need).

One program per (query token, block of 64 heads). Each consumer warpgroup owns 256 of the 512
value columns and computes the scores of half of each key block (Q K^T over 576 columns, Q read
from shared memory); the two exchange their row maxima and their halves of P through shared
memory (two barrier hand-offs a block), then each adds P V over all the block's keys for its
columns. No product is computed twice, and a warpgroup holds a 64 x 32 score tile instead of
64 x 64. (``SPLIT_S=False``: each warpgroup computes all scores itself, nothing is exchanged,
the Q K^T product is computed twice: 1.53x the FLOPs; kept for comparison.)

Shapes are those of DeepSeek's MLA: latent 512 (the value) + rope 64, one key group; other shapes
and options (sink, topk_length) take the Triton kernel (``declines`` says why).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton

try:  # Gluon: Triton >= 3.5; its Hopper API is what this module is written against (3.6).
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        async_copy,
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from triton.experimental.gluon.language._core import builtin

    # Renamed after Triton 3.6: one barrier over a partition's warps; cp.async into shared memory;
    # a shared-memory view as another dtype.
    partition_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    async_rows = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared

    @builtin
    def smem_view(desc, dtype, shape, layout, _semantic=None):
        """``desc`` reinterpreted as ``dtype`` / ``shape`` / ``layout`` (the same bytes)."""
        view = getattr(desc, "reinterpret", None) or desc._reinterpret
        return view(dtype, shape, layout, _semantic=_semantic)

    HAVE_GLUON = True
except (ImportError, AttributeError):  # pragma: no cover - older Triton
    HAVE_GLUON = False

LOG2E = 1.4426950408889634
ENV_OFF = "MLA_COMPILER_WS"  # =0: never take this kernel
_D_LAT, _D_ROPE, _BLOCK_H = 512, 64, 64
if HAVE_GLUON:  # kernels read module globals only as constexpr
    D_LAT, D_ROPE, BLOCK_H, V_HALF = gl.constexpr(_D_LAT), gl.constexpr(_D_ROPE), gl.constexpr(_BLOCK_H), gl.constexpr(_D_LAT // 2)


def declines(q: torch.Tensor, kv_latent: torch.Tensor, kv_scale: Optional[torch.Tensor], kv_rope: Optional[torch.Tensor],
             d_v: int, attn_sink=None, topk_length=None, h_kv: int = 1) -> Optional[str]:
    """Why the warp-specialized kernel does not take this call (None when it does). ``kv_latent``:
    the first 512 columns of bf16 keys (``kv_scale`` None) or an FP8 latent with ``kv_scale``."""
    if os.environ.get(ENV_OFF, "1") in ("0", ""):
        return f"{ENV_OFF}=0"
    if not HAVE_GLUON:
        return "this Triton has no Gluon dialect"
    if q.device.type != "cuda":
        return "not a CUDA tensor"
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return "not a Hopper GPU (wgmma and setmaxnreg are sm_90 instructions)"
    if q.dtype != torch.bfloat16:
        return f"query dtype {q.dtype} (bf16 only)"
    if h_kv != 1:
        return f"{h_kv} key groups (one only)"
    if kv_latent.shape[1] != _D_LAT or kv_rope is None or kv_rope.shape[1] != _D_ROPE or d_v != _D_LAT:
        rope = None if kv_rope is None else kv_rope.shape[1]
        return f"latent {kv_latent.shape[1]} / rope {rope} / d_v {d_v} (512 / 64 / 512 only)"
    if q.shape[1] < _BLOCK_H:
        return f"{q.shape[1]} heads (64 or more: wgmma tiles 64 rows, fewer would idle the tensor cores)"
    if attn_sink is not None or topk_length is not None:
        return "attn_sink / topk_length (not implemented here)"
    if q.shape[2] != _D_LAT + _D_ROPE:
        return f"query width {q.shape[2]} (576 only)"
    if kv_rope.dtype != torch.bfloat16:
        return f"rope dtype {kv_rope.dtype} (bf16 only)"
    if kv_scale is None and kv_latent.dtype != torch.bfloat16:
        return f"key dtype {kv_latent.dtype} without scales (bf16 keys or an e4m3 latent with scales)"
    if kv_scale is not None:
        if kv_latent.dtype != torch.float8_e4m3fn:
            return f"latent dtype {kv_latent.dtype} (float8_e4m3fn)"
        if kv_scale.dim() != 2 or kv_scale.dtype != torch.float32 or kv_scale.stride(1) != 1:
            return "kv_scale not a float32 [rows, scales] tensor with contiguous scales"
        if kv_scale.shape[1] not in (1, 4):
            return f"{kv_scale.shape[1]} scales a row (one, or one per 128 columns)"
    programs = q.shape[0] * triton.cdiv(q.shape[1], _BLOCK_H)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    if programs < sms:
        return f"{programs} programs for {sms} SMs (the Triton kernel splits the top-k there)"
    return _misaligned(kv_latent, kv_rope)


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
    def _program_coords(H):
        """(query token as int64, block of heads) of this program. Head blocks vary fastest: the
        programs that gather the same token's key rows run side by side, so one of them reads the
        rows from L2 instead of HBM (token-major order re-read them from HBM a wave later)."""
        pid = gl.program_id(0)
        n_hb = gl.cdiv(H, BLOCK_H)
        return (pid // n_hb).to(gl.int64), pid % n_hb

    @gluon.jit
    def _store_output(acc, m_i, l_i, OUT, LSE, t, hb, stride_ot, stride_oh, stride_lt, H,
                      WG: gl.constexpr, row_s: gl.constexpr, o_layout: gl.constexpr):
        """Normalize this warpgroup's 256 output columns and store them; warpgroup 0 stores the lse
        (natural log; +inf and a zero row where no key was valid, as the reference)."""
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        empty_row = l_i == 0.0
        l_safe = gl.where(empty_row, 1.0, l_i)
        out = acc / gl.convert_layout(l_safe, row_o)[:, None]
        heads = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=row_o)
        cols = WG * V_HALF + gl.arange(0, V_HALF, layout=gl.SliceLayout(0, o_layout))
        o_ptr = OUT + t * stride_ot + heads[:, None] * stride_oh + cols[None, :]
        gl.store(o_ptr, out.to(gl.bfloat16), mask=(heads < H)[:, None])
        if WG == 0:
            lse = gl.where(empty_row, float("inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
            heads_s = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=row_s)
            gl.store(LSE + t * stride_lt + heads_s, lse, mask=heads_s < H)

    @gluon.jit
    def _consumer(
        q_a_smem, q_b_smem, k_ring, r_ring, ok_ring, full, empty,
        OUT, LSE, stride_ot, stride_oh, stride_lt, TOPK, H, sm_scale_log2,
        WG: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    ):
        t, hb = _program_coords(H)
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, V_HALF, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)

        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([BLOCK_H], gl.float32, row_s)
        acc = gl.zeros([BLOCK_H, V_HALF], gl.float32, o_layout)
        s_zero = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, s_layout)
        n_blocks = gl.cdiv(TOPK, BLOCK_N)
        for i in range(n_blocks):
            slot = i % STAGES
            mbarrier.wait(full.index(slot), (i // STAGES) & 1)
            # Which keys of the block are valid: written by the producer beside the rows (no
            # per-thread index pointers held here).
            valid = ok_ring.index(slot).load(col_s) != 0
            k_tile = k_ring.index(slot)
            s = warpgroup_mma(q_a_smem, k_tile.permute((1, 0)), s_zero, use_acc=False)
            s = warpgroup_mma(q_b_smem, r_ring.index(slot).permute((1, 0)), s)
            s = gl.where(valid[None, :], s * sm_scale_log2, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 1))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_use)
            p = gl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + gl.sum(p, 1)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
            acc = warpgroup_mma(p_op, k_tile.slice(WG * V_HALF, V_HALF, dim=1), acc)
            m_i = m_new
            # Every warp of this warpgroup is past its MMAs on the slot: hand it back.
            partition_barrier()
            mbarrier.arrive(empty.index(slot))

        _store_output(acc, m_i, l_i, OUT, LSE, t, hb, stride_ot, stride_oh, stride_lt, H, WG, row_s, o_layout)

    @gluon.jit
    def _consumer_split(
        q_a_smem, q_b_smem, k_ring, r_ring, ok_ring, full, empty, xmax, p_half, lsum, bar_x, bar_p, bar_l,
        OUT, LSE, stride_ot, stride_oh, stride_lt, TOPK, H, sm_scale_log2,
        WG: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CHUNKED: gl.constexpr,
    ):
        """Scores split by keys: this warpgroup computes Q K^T for its half of the block's keys only,
        the two exchange their row maxima and their P halves through shared memory, then each adds
        P V (all keys) for its 256 value columns. No product is computed twice."""
        t, hb = _program_coords(H)
        HALF: gl.constexpr = BLOCK_N // 2
        OTHER: gl.constexpr = 1 - WG
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, V_HALF, 16])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)

        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([BLOCK_H], gl.float32, row_s)  # over this warpgroup's keys; summed at the end
        acc = gl.zeros([BLOCK_H, V_HALF], gl.float32, o_layout)
        s_zero = gl.zeros([BLOCK_H, HALF], gl.float32, s_layout)
        n_blocks = gl.cdiv(TOPK, BLOCK_N)
        for i in range(n_blocks):
            slot = i % STAGES
            k_tile = k_ring.index(slot)
            if CHUNKED:
                # FlashMLA's fine-grained copy-GEMM pipelining: the scores over each 128-column
                # chunk start as soon as that chunk is in the slot.
                k_half = k_tile.slice(WG * HALF, HALF, dim=0)
                mbarrier.wait(full.index(slot * 4), (i // STAGES) & 1)
                s = warpgroup_mma(q_b_smem, r_ring.index(slot).slice(WG * HALF, HALF, dim=0).permute((1, 0)), s_zero,
                                  use_acc=False, is_async=True)
                s = warpgroup_mma(q_a_smem.slice(0, 128, dim=1), k_half.slice(0, 128, dim=1).permute((1, 0)), s, is_async=True)
                for c in gl.static_range(1, 4):
                    mbarrier.wait(full.index(slot * 4 + c), (i // STAGES) & 1)
                    s = warpgroup_mma(q_a_smem.slice(c * 128, 128, dim=1), k_half.slice(c * 128, 128, dim=1).permute((1, 0)), s,
                                      is_async=True)
                s = warpgroup_mma_wait(0, deps=[s])
            else:
                mbarrier.wait(full.index(slot), (i // STAGES) & 1)
                s = warpgroup_mma(q_a_smem, k_tile.slice(WG * HALF, HALF, dim=0).permute((1, 0)), s_zero, use_acc=False)
                s = warpgroup_mma(q_b_smem, r_ring.index(slot).slice(WG * HALF, HALF, dim=0).permute((1, 0)), s)
            valid = ok_ring.index(slot).slice(WG * HALF, HALF).load(col_s) != 0
            s = gl.where(valid[None, :], s * sm_scale_log2, float("-inf"))
            m_mine = gl.max(s, 1)
            # Single buffers suffice: a warpgroup writes block i+1's maximum only after waiting for
            # the other's P hand-off of block i, which the other makes after reading block i's
            # maximum (keep that read before the bar_p arrive); P halves likewise after bar_x.
            xmax.index(WG).store(m_mine)
            partition_barrier()
            mbarrier.arrive(bar_x.index(WG))
            mbarrier.wait(bar_x.index(OTHER), i & 1)
            m_new = gl.maximum(m_i, gl.maximum(m_mine, xmax.index(OTHER).load(row_s)))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_use)
            p = gl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + gl.sum(p, 1)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p_half.index(WG).store(p.to(gl.bfloat16))
            fence_async_shared()
            partition_barrier()
            mbarrier.arrive(bar_p.index(WG))
            mbarrier.wait(bar_p.index(OTHER), i & 1)
            v = k_tile.slice(WG * V_HALF, V_HALF, dim=1)
            acc = warpgroup_mma(p_half.index(0), v.slice(0, HALF, dim=0), acc)
            acc = warpgroup_mma(p_half.index(1), v.slice(HALF, HALF, dim=0), acc)
            m_i = m_new
            partition_barrier()
            mbarrier.arrive(empty.index(slot))

        lsum.index(WG).store(l_i)
        partition_barrier()
        mbarrier.arrive(bar_l.index(WG))
        mbarrier.wait(bar_l.index(OTHER), 0)
        l_i = l_i + lsum.index(OTHER).load(row_s)
        _store_output(acc, m_i, l_i, OUT, LSE, t, hb, stride_ot, stride_oh, stride_lt, H, WG, row_s, o_layout)

    @gluon.jit
    def _dequant_store(k_slot, raw, sc, c: gl.constexpr, CHUNK: gl.constexpr):
        """Chunk c (CHUNK columns) of the FP8 rows, times its scales (per row) in fp32, into the slot
        as bf16. (The product in bf16, exact for power-of-two scales, measured slower: 0.47 vs 0.31 ms.)"""
        k_slot.slice(c * CHUNK, CHUNK, dim=1).store((raw.to(gl.float32) * sc[:, None]).to(gl.bfloat16))

    @gluon.jit
    def _producer(
        k_ring, r_ring, ok_ring, full, empty,
        KV, KV_SCALE, KV_ROPE, IDX,
        stride_kvs, stride_ss, stride_rs, stride_it,
        S_KV, TOPK, H,
        FP8: gl.constexpr, N_TILES: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, IN_SLOT: gl.constexpr,
        CHUNKED: gl.constexpr,
    ):
        """Gathers each key block's rows into a ring slot as bf16 (bf16 keys by asynchronous copies;
        an FP8 latent staged in the slot or through registers, then dequantized)."""
        n_blocks = gl.cdiv(TOPK, BLOCK_N)
        t, _ = _program_coords(H)
        # The host checks these (FlashMLA's 656-byte rows put the rope at stride 328 elements).
        stride_rs = gl.multiple_of(stride_rs, 8)
        stride_kvs = gl.multiple_of(stride_kvs, 16)
        idx_row = IDX + t * stride_it
        if FP8:
            if IN_SLOT:
                _producer_fp8_in_slot(k_ring, r_ring, ok_ring, full, empty, KV, KV_SCALE, KV_ROPE, idx_row,
                                      stride_kvs, stride_ss, stride_rs, S_KV, TOPK, n_blocks, N_TILES, BLOCK_N, STAGES, CHUNKED)
            else:
                _producer_fp8(k_ring, r_ring, ok_ring, full, empty, KV, KV_SCALE, KV_ROPE, idx_row,
                              stride_kvs, stride_ss, stride_rs, S_KV, TOPK, n_blocks, N_TILES, BLOCK_N, STAGES, CHUNKED)
        else:
            _producer_bf16(k_ring, r_ring, ok_ring, full, empty, KV, KV_ROPE, idx_row, stride_kvs, stride_rs, S_KV, TOPK,
                           n_blocks, BLOCK_N, STAGES, CHUNKED)

    @gluon.jit
    def _row_ptrs(BASE, rows, cols, stride, WIDTH: gl.constexpr):
        """Pointers to columns ``cols`` of rows ``rows`` (widened to int64) of a row-major operand.
        Pointers passed into a partition lose the launch's alignment facts: restate them (16-byte
        aligned rows; the host checks) so loads and copies move 16 bytes at a time."""
        ptr = BASE + rows.to(gl.int64)[:, None] * stride + cols[None, :]
        return gl.max_contiguous(gl.multiple_of(ptr, [16, 16]), [1, WIDTH])

    @gluon.jit
    def _rope_rows(r_slot, KV_ROPE, rows, stride_rs, rope_layout: gl.constexpr):
        """Starts the asynchronous copy of the block's rope rows (bf16 in every layout; rows -1 copy
        nothing and are zero-filled; the consumers mask those keys)."""
        rows = gl.convert_layout(rows, gl.SliceLayout(1, rope_layout))
        rope_ptr = _row_ptrs(KV_ROPE, rows, gl.arange(0, D_ROPE, layout=gl.SliceLayout(0, rope_layout)), stride_rs, D_ROPE)
        async_rows(r_slot, rope_ptr, mask=(rows >= 0)[:, None])

    @gluon.jit
    def _chunk_ready(full, slot, c: gl.constexpr, CHUNKED: gl.constexpr):
        """With CHUNKED: 128-column chunk c of the slot is in place (its generic-proxy writes made
        visible to the MMAs' async proxy), so the consumers' scores over it may start."""
        if CHUNKED:
            fence_async_shared()
            partition_barrier()
            mbarrier.arrive(full.index(slot * 4 + c))

    @gluon.jit
    def _hand_over(full, slot):
        """Waits for this block's copies, makes the generic-proxy writes visible to the MMAs' async
        proxy, and marks the slot full (one arrive after every producer warp is done)."""
        async_copy.wait_group(0)
        fence_async_shared()
        partition_barrier()
        mbarrier.arrive(full.index(slot))

    @gluon.jit
    def _slot_done(full, slot, CHUNKED: gl.constexpr):
        """The slot's last chunk is in place: its hand-over (CHUNKED: the last chunk's barrier)."""
        if CHUNKED:
            _chunk_ready(full, slot, 3, CHUNKED)
        else:
            _hand_over(full, slot)

    @gluon.jit
    def _block_rows(idx_row, i, S_KV, TOPK, BLOCK_N: gl.constexpr, row_layout: gl.constexpr):
        """Block i's key rows, -1 where the index is invalid (-1, >= S_KV, past top-k), in the
        indices' dtype (int32 from the model's top-k: half the registers of int64 where rows are
        held across blocks); widened to int64 before any stride multiply."""
        offs = i * BLOCK_N + gl.arange(0, BLOCK_N, layout=row_layout)
        idx = gl.load(idx_row + offs, mask=offs < TOPK, other=-1)
        return gl.where((idx >= 0) & (idx < S_KV), idx, -1)

    @gluon.jit
    def _producer_bf16(k_ring, r_ring, ok_ring, full, empty, KV, KV_ROPE, idx_row, stride_kvs, stride_rs, S_KV, TOPK,
                       n_blocks, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CHUNKED: gl.constexpr):
        """bf16 keys: every part of a block by asynchronous copies, issued once its slot is free
        (CHUNKED: one copy group per 128 columns, each handed over as it lands)."""
        b16_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        rope_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        cols = gl.arange(0, 256, layout=gl.SliceLayout(0, b16_layout))
        cols128 = gl.arange(0, 128, layout=gl.SliceLayout(0, b16_layout))
        for i in range(n_blocks):
            slot = i % STAGES
            k_slot = k_ring.index(slot)
            rows = _block_rows(idx_row, i, S_KV, TOPK, BLOCK_N, gl.SliceLayout(1, b16_layout))
            valid = rows >= 0
            base = _row_ptrs(KV, rows, cols, stride_kvs, 256)
            mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
            ok_ring.index(slot).store(valid.to(gl.int32))
            _rope_rows(r_ring.index(slot), KV_ROPE, rows, stride_rs, rope_layout)
            if CHUNKED:
                base128 = _row_ptrs(KV, rows, cols128, stride_kvs, 128)
                for c in gl.static_range(4):
                    async_rows(k_slot.slice(c * 128, 128, dim=1), base128 + c * 128, mask=valid[:, None])
                    async_copy.commit_group()
                # Groups complete in order: chunk c (the rope with the first) once 3 - c remain.
                async_copy.wait_group(3)
                _chunk_ready(full, slot, 0, CHUNKED)
                async_copy.wait_group(2)
                _chunk_ready(full, slot, 1, CHUNKED)
                async_copy.wait_group(1)
                _chunk_ready(full, slot, 2, CHUNKED)
                async_copy.wait_group(0)
                _chunk_ready(full, slot, 3, CHUNKED)
            else:
                async_rows(k_slot.slice(0, 256, dim=1), base, mask=valid[:, None])
                async_rows(k_slot.slice(256, 256, dim=1), base + 256, mask=valid[:, None])
                async_copy.commit_group()
                _hand_over(full, slot)

    @gluon.jit
    def _producer_fp8(k_ring, r_ring, ok_ring, full, empty, KV, KV_SCALE, KV_ROPE, idx_row, stride_kvs, stride_ss, stride_rs,
                      S_KV, TOPK, n_blocks, N_TILES: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      CHUNKED: gl.constexpr):
        """FP8 latent, one block at a time: its four 128-column chunks are loaded into registers
        (issued before the slot is free), then dequantized into the slot as bf16. The next block's
        loads start only after this block is stored."""
        CHUNK: gl.constexpr = 128
        # 16-byte vectors: 16 e4m3 values per thread and access.
        fp8_layout: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
        rope_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        cols = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, fp8_layout))
        for i in range(n_blocks):
            slot = i % STAGES
            k_slot = k_ring.index(slot)
            rows = _block_rows(idx_row, i, S_KV, TOPK, BLOCK_N, gl.SliceLayout(1, fp8_layout))
            valid = rows >= 0
            base = _row_ptrs(KV, rows, cols, stride_kvs, CHUNK)
            sc_ptr = KV_SCALE + rows.to(gl.int64) * stride_ss
            sc0, sc1, sc2, sc3 = _scale_loads(sc_ptr, valid, N_TILES)
            raw0 = gl.load(base, mask=valid[:, None], other=0.0)
            raw1 = gl.load(base + CHUNK, mask=valid[:, None], other=0.0)
            raw2 = gl.load(base + 2 * CHUNK, mask=valid[:, None], other=0.0)
            raw3 = gl.load(base + 3 * CHUNK, mask=valid[:, None], other=0.0)
            mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
            _rope_rows(r_ring.index(slot), KV_ROPE, rows, stride_rs, rope_layout)
            async_copy.commit_group()
            ok_ring.index(slot).store(valid.to(gl.int32))
            if CHUNKED:
                async_copy.wait_group(0)  # the rope goes with the first chunk
            _dequant_store(k_slot, raw0, sc0, 0, CHUNK)
            _chunk_ready(full, slot, 0, CHUNKED)
            _dequant_store(k_slot, raw1, sc1, 1, CHUNK)
            _chunk_ready(full, slot, 1, CHUNKED)
            _dequant_store(k_slot, raw2, sc2, 2, CHUNK)
            _chunk_ready(full, slot, 2, CHUNKED)
            _dequant_store(k_slot, raw3, sc3, 3, CHUNK)
            _slot_done(full, slot, CHUNKED)

    @gluon.jit
    def _scale_loads(sc_ptr, valid, N_TILES: gl.constexpr):
        """The four chunks' scales of a block's rows (one per 128 columns, or the row's one four times)."""
        sc0 = gl.load(sc_ptr, mask=valid, other=0.0)
        if N_TILES == 4:
            sc1 = gl.load(sc_ptr + 1, mask=valid, other=0.0)
            sc2 = gl.load(sc_ptr + 2, mask=valid, other=0.0)
            sc3 = gl.load(sc_ptr + 3, mask=valid, other=0.0)
        else:
            sc1 = sc0
            sc2 = sc0
            sc3 = sc0
        return sc0, sc1, sc2, sc3

    @gluon.jit
    def _producer_fp8_in_slot(k_ring, r_ring, ok_ring, full, empty, KV, KV_SCALE, KV_ROPE, idx_row, stride_kvs, stride_ss,
                              stride_rs, S_KV, TOPK, n_blocks, N_TILES: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                              CHUNKED: gl.constexpr):
        """FP8 latent staged in the slot itself: the raw bytes are copied asynchronously (no
        registers held while in flight) into the upper half of the slot's latent bytes, then
        dequantized in place, chunk by chunk, into the bf16 tile. A 128-column chunk g of bf16 is
        bytes [16K g, 16K (g+1)) of the slot (128-byte swizzle slabs, 64 rows each); raw chunk g
        is bytes [32K + 8K g, 32K + 8K (g+1)). Chunks 0 and 1 write below the raw bytes; chunk 2
        overwrites raw chunks 0 and 1 (read by then: a barrier); chunk 3 overwrites raw chunks 2 and
        3 (chunk 3 read into registers first, then a barrier)."""
        CHUNK: gl.constexpr = 128
        fp8_layout: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
        rope_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        raw_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, fp8_layout)
        cols = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, fp8_layout))
        rows_next = _block_rows(idx_row, 0, S_KV, TOPK, BLOCK_N, row_layout)
        for i in range(n_blocks):
            slot = i % STAGES
            k_slot = k_ring.index(slot)
            # The slot's 64 KiB of latent as 1024 byte columns; the upper 512 hold the raw rows.
            raw = smem_view(k_slot, gl.float8e4nv, [BLOCK_N, 2 * D_LAT], raw_layout).slice(D_LAT, D_LAT, dim=1)
            rows = rows_next
            rows_next = _block_rows(idx_row, i + 1, S_KV, TOPK, BLOCK_N, row_layout)  # read one block ahead
            valid = rows >= 0
            sc0, sc1, sc2, sc3 = _scale_loads(KV_SCALE + rows.to(gl.int64) * stride_ss, valid, N_TILES)
            base = _row_ptrs(KV, rows, cols, stride_kvs, CHUNK)
            mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
            ok_ring.index(slot).store(valid.to(gl.int32))
            _rope_rows(r_ring.index(slot), KV_ROPE, rows, stride_rs, rope_layout)
            # Invalid rows copy nothing and are zero-filled (no stale byte can read as NaN).
            for g in gl.static_range(4):
                async_rows(raw.slice(g * CHUNK, CHUNK, dim=1), base + g * CHUNK, mask=valid[:, None])
            async_copy.commit_group()
            async_copy.wait_group(0)
            partition_barrier()  # every producer thread's copies have landed
            _dequant_store(k_slot, raw.slice(0, CHUNK, dim=1).load(fp8_layout), sc0, 0, CHUNK)
            _chunk_ready(full, slot, 0, CHUNKED)
            _dequant_store(k_slot, raw.slice(CHUNK, CHUNK, dim=1).load(fp8_layout), sc1, 1, CHUNK)
            # Raw chunks 0 and 1 are read: chunk 2 may overwrite them (CHUNKED: its hand-over's barrier).
            if CHUNKED:
                _chunk_ready(full, slot, 1, CHUNKED)
            else:
                partition_barrier()
            _dequant_store(k_slot, raw.slice(2 * CHUNK, CHUNK, dim=1).load(fp8_layout), sc2, 2, CHUNK)
            last = raw.slice(3 * CHUNK, CHUNK, dim=1).load(fp8_layout)
            # Raw chunks 2 and 3 are read: chunk 3 may overwrite them.
            if CHUNKED:
                _chunk_ready(full, slot, 2, CHUNKED)
            else:
                partition_barrier()
            _dequant_store(k_slot, last, sc3, 3, CHUNK)
            _slot_done(full, slot, CHUNKED)

    @gluon.jit
    def _ws_fwd_kernel(
        Q, KV, KV_SCALE, KV_ROPE, IDX, OUT, LSE,
        stride_qt, stride_qh, stride_kvs, stride_ss, stride_rs, stride_it, stride_ot, stride_oh, stride_lt,
        S_KV, TOPK, H, sm_scale_log2,
        FP8: gl.constexpr, N_TILES: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, IN_SLOT: gl.constexpr, SPLIT_S: gl.constexpr = True,
        PRODUCER_DEFAULT: gl.constexpr = False, CHUNKED: gl.constexpr = False,
    ):
        t, hb = _program_coords(H)
        q_a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_LAT], gl.bfloat16)
        q_b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_ROPE], gl.bfloat16)
        k_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D_LAT], gl.bfloat16)
        r_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D_ROPE], gl.bfloat16)
        q_a_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, D_LAT], q_a_layout)
        q_b_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, D_ROPE], q_b_layout)
        k_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D_LAT], k_layout)
        r_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D_ROPE], r_layout)
        ok_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        # full: one barrier a slot, or one a 128-column chunk of a slot (CHUNKED).
        N_FULL: gl.constexpr = STAGES * 4 if CHUNKED else STAGES
        full = gl.allocate_shared_memory(gl.int64, [N_FULL, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(N_FULL):
            mbarrier.init(full.index(s), count=1)
        for s in gl.static_range(STAGES):
            mbarrier.init(empty.index(s), count=2)

        # Q of this block of heads into shared memory, 128 columns at a time (padded heads are 0).
        q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        heads = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, q_layout))
        h_ok = (heads < H)[:, None]
        q_row = Q + t * stride_qt + heads[:, None] * stride_qh
        cols = gl.arange(0, 128, layout=gl.SliceLayout(0, q_layout))
        for c in gl.static_range(D_LAT // 128):
            q_a_smem.slice(c * 128, 128, dim=1).store(gl.load(q_row + c * 128 + cols[None, :], mask=h_ok, other=0.0))
        rope_cols = gl.arange(0, D_ROPE, layout=gl.SliceLayout(0, q_layout))
        q_b_smem.store(gl.load(q_row + D_LAT + rope_cols[None, :], mask=h_ok, other=0.0))
        fence_async_shared()
        partition_barrier()

        if SPLIT_S:
            vec_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
            p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_N // 2], gl.bfloat16)
            xmax = gl.allocate_shared_memory(gl.float32, [2, BLOCK_H], vec_layout)
            lsum = gl.allocate_shared_memory(gl.float32, [2, BLOCK_H], vec_layout)
            p_half = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_H, BLOCK_N // 2], p_layout)
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
                gl.warp_specialize(
                    [
                        (_producer, (k_ring, r_ring, ok_ring, full, empty, KV, KV_SCALE, KV_ROPE, IDX, stride_kvs, stride_ss, stride_rs,
                                     stride_it, S_KV, TOPK, H, FP8, N_TILES, BLOCK_N, STAGES, IN_SLOT, CHUNKED)),
                        (_consumer_split, (q_a_smem, q_b_smem, k_ring, r_ring, ok_ring, full, empty, xmax, p_half, lsum, bar_x, bar_p,
                                           bar_l, OUT, LSE, stride_ot, stride_oh, stride_lt, TOPK, H, sm_scale_log2, 0, BLOCK_N, STAGES, CHUNKED)),
                        (_consumer_split, (q_a_smem, q_b_smem, k_ring, r_ring, ok_ring, full, empty, xmax, p_half, lsum, bar_x, bar_p,
                                           bar_l, OUT, LSE, stride_ot, stride_oh, stride_lt, TOPK, H, sm_scale_log2, 1, BLOCK_N, STAGES, CHUNKED)),
                    ],
                    [4, 4],
                    [CONSUMER_REGS, CONSUMER_REGS],
                )
            else:
                gl.warp_specialize(
                    [
                        (_consumer_split, (q_a_smem, q_b_smem, k_ring, r_ring, ok_ring, full, empty, xmax, p_half, lsum, bar_x, bar_p,
                                           bar_l, OUT, LSE, stride_ot, stride_oh, stride_lt, TOPK, H, sm_scale_log2, 0, BLOCK_N, STAGES, CHUNKED)),
                        (_consumer_split, (q_a_smem, q_b_smem, k_ring, r_ring, ok_ring, full, empty, xmax, p_half, lsum, bar_x, bar_p,
                                           bar_l, OUT, LSE, stride_ot, stride_oh, stride_lt, TOPK, H, sm_scale_log2, 1, BLOCK_N, STAGES, CHUNKED)),
                        (_producer, (k_ring, r_ring, ok_ring, full, empty, KV, KV_SCALE, KV_ROPE, IDX, stride_kvs, stride_ss, stride_rs,
                                      stride_it, S_KV, TOPK, H, FP8, N_TILES, BLOCK_N, STAGES, IN_SLOT, CHUNKED)),
                    ],
                    [4, 4],
                    [CONSUMER_REGS, PRODUCER_REGS],
                )
        else:
            gl.warp_specialize(
                [
                    (_consumer, (q_a_smem, q_b_smem, k_ring, r_ring, ok_ring, full, empty, OUT, LSE, stride_ot, stride_oh, stride_lt,
                                 TOPK, H, sm_scale_log2, 0, BLOCK_N, STAGES)),
                    (_consumer, (q_a_smem, q_b_smem, k_ring, r_ring, ok_ring, full, empty, OUT, LSE, stride_ot, stride_oh, stride_lt,
                                 TOPK, H, sm_scale_log2, 1, BLOCK_N, STAGES)),
                    (_producer, (k_ring, r_ring, ok_ring, full, empty, KV, KV_SCALE, KV_ROPE, IDX, stride_kvs, stride_ss, stride_rs,
                                  stride_it, S_KV, TOPK, H, FP8, N_TILES, BLOCK_N, STAGES, IN_SLOT, CHUNKED)),
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
# spread), FP8 FlashMLA 0.295 / row 0.266 (0.273 / 0.242 without): off by default.
# Head blocks fastest in the grid (2026-11-28, later), 216/72: bf16 0.199-0.200 ms, FP8 FlashMLA
# 0.265-0.266 / row 0.236-0.237. f16 staging of the FP8 latent (commit f2b4ce2): 0.355 / 0.273.
# Two producer warpgroups (512 threads) do not compile: ptxas then caps every thread at 128
# registers, and the 64 x 256 accumulator's wgmma needs 154.
# IN_SLOT picks the FP8 producer; bf16 keys are always copied straight into the slot and ignore it.
LAUNCH_BF16 = dict(BLOCK_N=64, STAGES=2, CONSUMER_REGS=216, PRODUCER_REGS=72, IN_SLOT=False, SPLIT_S=True, PRODUCER_DEFAULT=False,
                   CHUNKED=False)
LAUNCH_FP8 = dict(BLOCK_N=64, STAGES=2, CONSUMER_REGS=216, PRODUCER_REGS=72, IN_SLOT=True, SPLIT_S=True, PRODUCER_DEFAULT=False,
                  CHUNKED=False)


def compile_for_hopper(fp8: bool, n_tiles: int = 1, launch: Optional[dict] = None):
    """The kernel compiled for sm_90 on any machine (no GPU needed), with the alignment facts a
    launch would give: for checking shared memory, registers and the PTX (``.asm``) off the GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = {"Q": "*bf16", "KV": "*fp8e4nv" if fp8 else "*bf16", "KV_SCALE": "*fp32", "KV_ROPE": "*bf16", "IDX": "*i32",
           "OUT": "*bf16", "LSE": "*fp32"}
    for name in ("stride_qt", "stride_qh", "stride_kvs", "stride_ss", "stride_rs", "stride_it", "stride_ot", "stride_oh",
                 "stride_lt", "S_KV", "TOPK", "H"):
        sig[name] = "i32"
    sig["sm_scale_log2"] = "fp32"
    cfg = dict(LAUNCH_FP8 if fp8 else LAUNCH_BF16, **(launch or {}))
    check_launch(cfg)
    constexprs = dict(FP8=fp8, N_TILES=n_tiles, **cfg)
    sig.update({k: "constexpr" for k in constexprs})
    names = list(sig)
    aligned = ("Q", "KV", "KV_SCALE", "KV_ROPE", "IDX", "OUT", "LSE", "stride_qt", "stride_qh", "stride_kvs", "stride_it", "stride_ot", "stride_oh")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return triton.compile(GluonASTSource(_ws_fwd_kernel, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


REG_BUDGET = 504  # registers a thread-slot for the three 128-thread partitions (168 x 384 / 128)


def check_launch(cfg: dict) -> None:
    """Raises ValueError naming the launch setting this kernel cannot run with."""
    unknown = set(cfg) - set(LAUNCH_BF16)
    if unknown:
        raise ValueError(f"launch: unknown setting(s) {sorted(unknown)}; the settings are {sorted(LAUNCH_BF16)}")
    if cfg["BLOCK_N"] != 64 or cfg["STAGES"] != 2:
        raise ValueError(f"launch BLOCK_N={cfg['BLOCK_N']} STAGES={cfg['STAGES']}: only 64 and 2 (Q and two 64-key slots fill "
                         "shared memory; the FP8 staging and the pair schedule assume them)")
    for key in ("CONSUMER_REGS", "PRODUCER_REGS"):
        if cfg[key] % 8 or not 24 <= cfg[key] <= 256:
            raise ValueError(f"launch {key}={cfg[key]}: setmaxnreg takes a multiple of 8 in 24..256")
    if not cfg["SPLIT_S"] and (cfg["CHUNKED"] or cfg["PRODUCER_DEFAULT"]):
        raise ValueError("launch CHUNKED / PRODUCER_DEFAULT need SPLIT_S=True (the unsplit schedule waits for whole slots "
                         "and always runs the producer as a worker)")
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
    cfg = dict(LAUNCH_FP8 if fp8 else LAUNCH_BF16, **(launch or {}))
    check_launch(cfg)
    t, heads, _ = q.shape
    q, indices = q.contiguous(), indices.contiguous()
    topk = indices.shape[-1]
    out = torch.empty((t, heads, _D_LAT), dtype=q.dtype, device=q.device)
    lse = torch.empty((t, heads), dtype=torch.float32, device=q.device)
    if t == 0:
        return out, lse
    n_tiles = kv_scale.shape[1] if fp8 else 1
    if n_tiles not in (1, 4):
        raise ValueError(f"kv_scale has {n_tiles} scales a row; the warp-specialized kernel takes 1 or 4")
    bad = _misaligned(kv_latent, kv_rope)
    if bad is not None:
        raise ValueError(f"{bad}; pass a contiguous copy")
    rows = kv_latent.shape[0]
    for name, part in (("kv_rope", kv_rope), ("kv_scale", kv_scale)):
        if part is not None and part.shape[0] < rows:
            raise ValueError(f"{name} has {part.shape[0]} rows for a latent of {rows}: one per latent row")
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
