"""The few-head FP8 forward, warp-specialized: one partition dequantizes, another runs the MMAs.

In gluon_fewhead's kernel the same 4 warps copy, dequantize and multiply one after the other.
Here two partitions of 4 warps run side by side:

- the dequantizing partition copies each key block's rows (e4m3 latent, scales, bf16 rope)
  asynchronously into a ring of STAGES slots, several blocks ahead, and turns the oldest landed
  block into one of two bf16 tiles (latent e4m3 x scale in fp32, then bf16; rope copied);
- the MMA partition (the kernel's own warps) runs gluon_fewhead's online-softmax step on the
  other tile.

Two mbarriers a tile hand it over: ``full`` (dequantized) and ``empty`` (read). The tiles take
2 x BLOCK_N x 1152 bytes, so a block is 32 keys (BLOCK_N 64 needs 258 KB with two ring slots).
Everything else (rows, Q, program coordinates, the step, the result's store) is gluon_fewhead's.
H200, V3.2 decode at 16 heads (RESULTS.md), FlashMLA layout / row scale: 0.099 / 0.093 ms with
Q's operands held in registers (Q_HELD), 0.110 / 0.107 with Q read from shared memory every
block, against 0.113 / 0.105 for gluon_fewhead's 64-key kernel.
"""

from __future__ import annotations

from .gluon_common import HAVE_GLUON

if HAVE_GLUON:
    from .gluon_common import async_copy, fence_async_shared, gl, gluon, mbarrier, partition_barrier
    from .gluon_fewhead import (
        BLOCK_H,
        D_LAT,
        D_ROPE,
        _attend_block,
        _held_q,
        _dequantize_chunk,
        _issue_block,
        _q_and_rows_smem,
        _split_coords,
        _stage_rows_and_q,
        _store_result,
    )

    _NW = gl.constexpr(4)  # warps in each partition

    @gluon.jit
    def _dequantizing_partition(lat_ring, rope_ring, scale_ring, tiles, rope_tiles, rows_smem, full, empty,
                                KV, KV_SCALE, KV_ROPE, stride_kvs, stride_ss, stride_rs, TOPK, H,
                                N_TILES: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SPLITS: gl.constexpr):
        """Copies blocks STAGES - 1 ahead, and hands block i over in tile i % 2 once the MMA
        partition has released that tile (block i - 2)."""
        t, hb, sp, n_lo, n_hi = _split_coords(H, TOPK, SPLITS, BLOCK_N)
        n_blocks = gl.cdiv(n_hi - n_lo, BLOCK_N)
        for j in gl.static_range(STAGES - 1):
            _issue_block(j, n_blocks, rows_smem, lat_ring, rope_ring, scale_ring, KV, KV_SCALE, KV_ROPE,
                         stride_kvs, stride_ss, stride_rs, True, N_TILES, BLOCK_N, STAGES, _NW)
        rope_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [_NW, 1], [1, 0])
        for i in range(n_blocks):
            # Slot (i - 1) % STAGES was dequantized last step (and a barrier passed): refill it.
            _issue_block(i + STAGES - 1, n_blocks, rows_smem, lat_ring, rope_ring, scale_ring, KV, KV_SCALE, KV_ROPE,
                         stride_kvs, stride_ss, stride_rs, True, N_TILES, BLOCK_N, STAGES, _NW)
            slot = i % STAGES
            tile = i % 2
            async_copy.wait_group(STAGES - 1)  # this thread's copies of block i have landed
            partition_barrier()  # ... and every thread's
            mbarrier.wait(empty.index(tile), ((i // 2) & 1) ^ 1)
            for c in gl.static_range(4):
                _dequantize_chunk(lat_ring, scale_ring, tiles.index(tile), slot, c, N_TILES, _NW)
            rope_tiles.index(tile).store(rope_ring.index(slot).load(rope_layout))
            partition_barrier()  # every thread's stores are done: one arrive for the partition
            mbarrier.arrive(full.index(tile))
        async_copy.wait_group(0)

    @gluon.jit
    def _mma_partition(q_lat, q_rope, tiles, rope_tiles, rows_smem, full, empty, OUT, LSE, PARTIAL,
                       stride_ot, stride_oh, stride_lt, TOPK, H, T, sm_scale_log2,
                       BLOCK_N: gl.constexpr, SPLITS: gl.constexpr, QK_CHAINS: gl.constexpr, Q_HELD: gl.constexpr):
        """The online softmax over the split's blocks, each read from its bf16 tile, which is then
        released to the dequantizing partition; the result stored as gluon_fewhead's kernel does."""
        t, hb, sp, n_lo, n_hi = _split_coords(H, TOPK, SPLITS, BLOCK_N)
        n_blocks = gl.cdiv(n_hi - n_lo, BLOCK_N)
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, _NW], instr_shape=[16, 8])
        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, gl.SliceLayout(1, mma))
        l_i = gl.zeros([BLOCK_H], gl.float32, gl.SliceLayout(1, mma))
        acc0 = gl.zeros([BLOCK_H, 128], gl.float32, mma)
        acc1 = gl.zeros([BLOCK_H, 128], gl.float32, mma)
        acc2 = gl.zeros([BLOCK_H, 128], gl.float32, mma)
        acc3 = gl.zeros([BLOCK_H, 128], gl.float32, mma)
        if Q_HELD:
            q_held = _held_q(q_lat, _NW)  # 128 registers a thread; this partition may use 256
        else:
            q_held = None
        for i in range(n_blocks):
            tile = i % 2
            valid = rows_smem.index(i).load(gl.SliceLayout(0, mma)) >= 0
            mbarrier.wait(full.index(tile), (i // 2) & 1)
            m_i, l_i, acc0, acc1, acc2, acc3 = _attend_block(q_lat, q_rope, q_held, tiles.index(tile), rope_tiles.index(tile), valid,
                                                             m_i, l_i, acc0, acc1, acc2, acc3, sm_scale_log2, BLOCK_N, _NW, QK_CHAINS,
                                                             Q_HELD)
            partition_barrier()  # every warp is past its reads of the tile
            mbarrier.arrive(empty.index(tile))
        _store_result(OUT, LSE, PARTIAL, acc0, acc1, acc2, acc3, m_i, l_i, t, hb, sp, T, H, stride_ot, stride_oh, stride_lt, SPLITS, _NW)

    @gluon.jit
    def _fewhead_ws_fwd_kernel(
        Q, KV, KV_SCALE, KV_ROPE, IDX, OUT, LSE, PARTIAL,
        stride_qt, stride_qh, stride_kvs, stride_ss, stride_rs, stride_it, stride_ot, stride_oh, stride_lt,
        S_KV, TOPK, H, T, sm_scale_log2,
        N_TILES: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SPLITS: gl.constexpr, NB_P: gl.constexpr,
        DEQUANT_REGS: gl.constexpr, QK_CHAINS: gl.constexpr, Q_HELD: gl.constexpr,
    ):
        operand_smem: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, [1, 0])
        plain_smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        vec_smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        q_lat, q_rope, rows_2d, rows_smem = _q_and_rows_smem(NB_P, BLOCK_N)
        lat_ring = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, D_LAT], plain_smem)
        rope_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D_ROPE], operand_smem)
        scale_ring = gl.allocate_shared_memory(gl.float32, [STAGES * N_TILES, BLOCK_N], vec_smem)
        tiles = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_N, D_LAT], operand_smem)
        rope_tiles = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_N, D_ROPE], operand_smem)
        full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for b in gl.static_range(2):
            mbarrier.init(full.index(b), count=1)
            mbarrier.init(empty.index(b), count=1)

        t, hb, sp, n_lo, n_hi = _split_coords(H, TOPK, SPLITS, BLOCK_N)
        _stage_rows_and_q(Q, IDX, q_lat, q_rope, rows_2d, t, hb, n_lo, n_hi, stride_qt, stride_qh, stride_it, S_KV, H, BLOCK_N, NB_P, _NW)
        fence_async_shared()
        partition_barrier()
        gl.warp_specialize(
            [
                (_mma_partition, (q_lat, q_rope, tiles, rope_tiles, rows_smem, full, empty, OUT, LSE, PARTIAL,
                                  stride_ot, stride_oh, stride_lt, TOPK, H, T, sm_scale_log2, BLOCK_N, SPLITS, QK_CHAINS, Q_HELD)),
                (_dequantizing_partition, (lat_ring, rope_ring, scale_ring, tiles, rope_tiles, rows_smem, full, empty,
                                           KV, KV_SCALE, KV_ROPE, stride_kvs, stride_ss, stride_rs, TOPK, H,
                                           N_TILES, BLOCK_N, STAGES, SPLITS)),
            ],
            [4],
            [DEQUANT_REGS],
        )
