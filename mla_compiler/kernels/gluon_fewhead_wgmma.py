"""The few-head FP8 forward with keys as the MMA rows: scores as K Q^T, values as V^T P^T, on
Hopper's warpgroup MMAs.

With 16 heads a token, Q K^T has 16 rows. gluon_fewhead's kernels give them to mma.sync (16 x 8
tiles), so each of 4 warps holds 8 keys of a block, one dependent MMA after another, and reduces
its softmax across warps; H200 measured that step, not the bytes, as the bound of its FP8 form.
A warpgroup MMA needs 64 rows, which 16 heads would fill a quarter of. Here the keys are the rows
instead, and no product is padded:

- scores, transposed: S^T [64 keys, 16 heads] = K [64, 576] Q^T [576, 16] (the key tile as the
  A operand, Q as the B operand, both in shared memory);
- the online softmax runs down the columns: each head's maximum over the block's keys (reduced
  across the 4 warps through shared memory); the sum is kept per key row and reduced once, at
  the end;
- values, transposed: O^T [512, 16] += V^T [512, 64] P^T [64, 16] (the same tile, read
  transposed, and P^T through 2 KB of shared memory); 64 accumulator registers a thread.

Partitions as in gluon_fewhead_ws: a dequantizing partition (4 warps) copies the rows of each
32-key half block into a ring of STAGES half slots and turns two landed halves into one 64-key
bf16 tile (latent e4m3 x scale in fp32, then bf16; rope copied); the MMA partition (the
kernel's 4 warps, one warpgroup) runs the products on the other tile. The MMA partition gives a
tile back a 128-column chunk at a time, as each chunk's value product is done, so the next
block's dequantization starts before the block's last product. Two bf16 tiles of 64 keys take
144 KB, which leaves room for 2 ring half slots (42 KB); launch TILES=1 has one tile (the
partitions overlap only by chunks) and room for 5 half slots.
Program coordinates, rows, Q staging, copies and the dequantization are gluon_fewhead's.
H200, V3.2 decode at 16 heads (RESULTS.md, sixth call set), FlashMLA layout / row scale: 0.093 /
0.089 ms, against 0.100 / 0.093 for gluon_fewhead_ws's mma.sync form and 0.088 for bf16 keys.
"""

from __future__ import annotations

from .gluon_common import HAVE_GLUON

if HAVE_GLUON:
    from .gluon_common import (
        async_copy,
        fence_async_shared,
        gl,
        gluon,
        mbarrier,
        partition_barrier,
        smem_view,
        warpgroup_mma,
    )
    from .gluon_fewhead import (
        BLOCK_H,
        D_LAT,
        D_ROPE,
        _dequantize_chunk,
        _issue_block,
        _q_and_rows_smem,
        _split_coords,
        _stage_rows_and_q,
    )

    _NW = gl.constexpr(4)  # warps in each partition
    _HALF = gl.constexpr(32)  # keys a ring slot holds: half a block

    @gluon.jit
    def _prefetch_half(j, n_halves, half_rows, KV, KV_SCALE, KV_ROPE, stride_kvs, stride_ss, stride_rs):
        """Asks L2 for half block j's rows (latent, scales, rope: every 128-byte line a row
        touches, FlashMLA's unaligned 656-byte rows included), without registers or shared memory
        to hold them: the ring's copies of it, later, then wait on L2 instead of HBM."""
        if j < n_halves:
            # [32 rows, 8 lines] over the partition's 128 threads, each address once.
            layout: gl.constexpr = gl.BlockedLayout([1, 2], [8, 4], [_NW, 1], [1, 0])
            rows = half_rows.index(j).load(gl.SliceLayout(1, layout))[:, None] + gl.zeros([_HALF, 8], gl.int32, layout)
            at = gl.maximum(rows, 0).to(gl.int64)
            k = gl.arange(0, 8, layout=gl.SliceLayout(0, layout))[None, :]
            lat = KV.to(gl.pointer_type(gl.uint8), bitcast=True) + at * stride_kvs + gl.minimum(k * 128, 511)
            rope = KV_ROPE.to(gl.pointer_type(gl.uint8), bitcast=True) + at * stride_rs + (k - 5) * 127
            scale = KV_SCALE.to(gl.pointer_type(gl.uint8), bitcast=True) + at * stride_ss
            ptrs = gl.where(k < 5, lat, gl.where(k < 7, rope, scale))
            # Rows -1 (invalid, past the split) are not prefetched.
            gl.inline_asm_elementwise("{ .reg .pred p; setp.ge.s32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                                      "=r,l,r", [ptrs, rows], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _dequantizing_partition(lat_ring, rope_ring, scale_ring, tiles, rope_tiles, half_rows, full, empty,
                                KV, KV_SCALE, KV_ROPE, stride_kvs, stride_ss, stride_rs, TOPK, H,
                                N_TILES: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SPLITS: gl.constexpr,
                                TILES: gl.constexpr, L2_AHEAD: gl.constexpr):
        """Copies half blocks STAGES - 1 ahead; block b's two halves go into tile b % TILES once
        the MMA partition has released it (block b - TILES), then one arrive hands it over."""
        t, hb, sp, n_lo, n_hi = _split_coords(H, TOPK, SPLITS, BLOCK_N)
        n_halves = 2 * gl.cdiv(n_hi - n_lo, BLOCK_N)
        for j in gl.static_range(STAGES - 1 + L2_AHEAD):
            if j >= STAGES - 1:
                _prefetch_half(j, n_halves, half_rows, KV, KV_SCALE, KV_ROPE, stride_kvs, stride_ss, stride_rs)
            else:
                _issue_block(j, n_halves, half_rows, lat_ring, rope_ring, scale_ring, KV, KV_SCALE, KV_ROPE,
                             stride_kvs, stride_ss, stride_rs, True, N_TILES, _HALF, STAGES, _NW)
        rope_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [_NW, 1], [1, 0])
        for b in range(n_halves // 2):
            tile = b % TILES
            for part in gl.static_range(2):
                i = 2 * b + part
                # Slot (i - 1) % STAGES was dequantized last step: refill it before anything waits,
                # so the copies never wait for the MMAs, once every thread is past its reads of it
                # (after half 1 the tile's hand-over barrier is that point).
                if part == 1:
                    partition_barrier()
                _issue_block(i + STAGES - 1, n_halves, half_rows, lat_ring, rope_ring, scale_ring, KV, KV_SCALE, KV_ROPE,
                             stride_kvs, stride_ss, stride_rs, True, N_TILES, _HALF, STAGES, _NW)
                if L2_AHEAD > 0:
                    _prefetch_half(i + STAGES - 1 + L2_AHEAD, n_halves, half_rows, KV, KV_SCALE, KV_ROPE, stride_kvs, stride_ss, stride_rs)
                slot = i % STAGES
                async_copy.wait_group(STAGES - 1)  # this thread's copies of half block i have landed
                partition_barrier()  # ... and every thread's
                half_tile = tiles.index(tile).slice(part * _HALF, _HALF, dim=0)
                for c in gl.static_range(4):
                    if part == 0:
                        # The MMAs release the tile a 128-column chunk at a time (chunk 0 with the
                        # rope): each chunk is refilled as soon as its product is done.
                        mbarrier.wait(empty.index(tile * 4 + c), ((b // TILES) & 1) ^ 1)
                    _dequantize_chunk(lat_ring, scale_ring, half_tile, slot, c, N_TILES, _NW)
                    if c == 0:
                        rope_tiles.index(tile).slice(part * _HALF, _HALF, dim=0).store(rope_ring.index(slot).load(rope_layout))
            # The MMAs read the tile through the async proxy: order these stores before them.
            fence_async_shared()
            partition_barrier()  # every thread's stores are done: one arrive for the partition
            mbarrier.arrive(full.index(tile))
        async_copy.wait_group(0)

    @gluon.jit
    def _store_result_t(OUT, LSE, PARTIAL, o_t, col0, m_i, l_i, t, hb, sp, T, H, stride_ot, stride_oh, stride_lt,
                        SPLITS: gl.constexpr, WITH_STATE: gl.constexpr, acc_l: gl.constexpr):
        """gluon_fewhead._store_result for a transposed accumulator O^T [columns, heads] holding
        output columns col0 ...: unsplit, out (normalized, bf16) and, WITH_STATE, lse (natural
        log; +inf for a head with no valid key); split, the unnormalized partial state per (split,
        token, head) that triton_sparse_mla's combine kernel merges (acc [512], m in base 2, l)."""
        heads = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, acc_l))
        h_ok = heads < H
        cols = col0 + gl.arange(0, o_t.shape[0], layout=gl.SliceLayout(1, acc_l))
        if SPLITS == 1:
            empty_head = l_i == 0.0
            l_safe = gl.where(empty_head, 1.0, l_i)
            o_ptr = OUT + t * stride_ot + heads[None, :] * stride_oh + cols[:, None]
            gl.store(o_ptr, (o_t / l_safe[None, :]).to(gl.bfloat16), mask=h_ok[None, :])
            if WITH_STATE:
                lse = gl.where(empty_head, float("inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
                gl.store(LSE + t * stride_lt + heads, lse, mask=h_ok)
        else:
            part = ((sp * T + t) * H + heads).to(gl.int64) * (D_LAT + 2)
            gl.store(PARTIAL + part[None, :] + cols[:, None], o_t, mask=h_ok[None, :])
            if WITH_STATE:
                gl.store(PARTIAL + part + D_LAT, m_i, mask=h_ok)
                gl.store(PARTIAL + part + D_LAT + 1, l_i, mask=h_ok)

    @gluon.jit
    def _value_chunk(keys, p_smem, o_c, empty, tile, c: gl.constexpr):
        """O^T rows c*128 ... += V^T of that value chunk x P^T; then chunk c of the tile (chunk 0
        with the rope, read by the scores before) goes back to the dequantizing partition."""
        o_c = warpgroup_mma(keys.slice(c * 128, 128, dim=1).permute((1, 0)), p_smem, o_c)
        partition_barrier()  # every warp is past its reads of the chunk
        mbarrier.arrive(empty.index(tile * 4 + c))
        return o_c

    @gluon.jit
    def _mma_partition(q_lat, q_rope, tiles, rope_tiles, p_smem, block_rows, full, empty, OUT, LSE, PARTIAL,
                       stride_ot, stride_oh, stride_lt, TOPK, H, T, sm_scale_log2,
                       BLOCK_N: gl.constexpr, SPLITS: gl.constexpr, TILES: gl.constexpr):
        """The online softmax over the split's blocks, transposed (keys are rows, heads columns),
        each block read from its bf16 tile, which is then released to the dequantizing partition."""
        t, hb, sp, n_lo, n_hi = _split_coords(H, TOPK, SPLITS, BLOCK_N)
        n_blocks = gl.cdiv(n_hi - n_lo, BLOCK_N)
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_H, 16])
        head_l: gl.constexpr = gl.SliceLayout(0, acc_l)
        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, head_l)
        # Each key row's share of the softmax sum, rescaled with the accumulator: summed over the
        # rows once at the end instead of across warps every block.
        l_rows = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, acc_l)
        # O^T by 128-column chunks of the value, one product each, so the tile is released by chunk.
        o0 = gl.zeros([128, BLOCK_H], gl.float32, acc_l)
        o1 = gl.zeros([128, BLOCK_H], gl.float32, acc_l)
        o2 = gl.zeros([128, BLOCK_H], gl.float32, acc_l)
        o3 = gl.zeros([128, BLOCK_H], gl.float32, acc_l)
        s_zero = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, acc_l)
        for b in range(n_blocks):
            tile = b % TILES
            valid = block_rows.index(b).load(gl.SliceLayout(1, acc_l)) >= 0
            mbarrier.wait(full.index(tile), (b // TILES) & 1)
            keys = tiles.index(tile)
            s = warpgroup_mma(rope_tiles.index(tile), q_rope.permute((1, 0)), s_zero, use_acc=False)
            s = warpgroup_mma(keys, q_lat.permute((1, 0)), s)
            s = gl.where(valid[:, None], s * sm_scale_log2, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 0))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_use)
            p = gl.exp2(s - m_use[None, :])
            l_rows = l_rows * alpha[None, :] + p
            m_i = m_new
            p_smem.store(p.to(gl.bfloat16))
            fence_async_shared()
            partition_barrier()  # every warp's P rows are in place for the products
            o0 = _value_chunk(keys, p_smem, o0 * alpha[None, :], empty, tile, 0)
            o1 = _value_chunk(keys, p_smem, o1 * alpha[None, :], empty, tile, 1)
            o2 = _value_chunk(keys, p_smem, o2 * alpha[None, :], empty, tile, 2)
            o3 = _value_chunk(keys, p_smem, o3 * alpha[None, :], empty, tile, 3)
        l_i = gl.sum(l_rows, 0)
        _store_result_t(OUT, LSE, PARTIAL, o0, 0, m_i, l_i, t, hb, sp, T, H, stride_ot, stride_oh, stride_lt, SPLITS, True, acc_l)
        _store_result_t(OUT, LSE, PARTIAL, o1, 128, m_i, l_i, t, hb, sp, T, H, stride_ot, stride_oh, stride_lt, SPLITS, False, acc_l)
        _store_result_t(OUT, LSE, PARTIAL, o2, 256, m_i, l_i, t, hb, sp, T, H, stride_ot, stride_oh, stride_lt, SPLITS, False, acc_l)
        _store_result_t(OUT, LSE, PARTIAL, o3, 384, m_i, l_i, t, hb, sp, T, H, stride_ot, stride_oh, stride_lt, SPLITS, False, acc_l)

    @gluon.jit
    def _fewhead_wgmma_fwd_kernel(
        Q, KV, KV_SCALE, KV_ROPE, IDX, OUT, LSE, PARTIAL,
        stride_qt, stride_qh, stride_kvs, stride_ss, stride_rs, stride_it, stride_ot, stride_oh, stride_lt,
        S_KV, TOPK, H, T, sm_scale_log2,
        N_TILES: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SPLITS: gl.constexpr, NB_P: gl.constexpr,
        DEQUANT_REGS: gl.constexpr, TILES: gl.constexpr, L2_AHEAD: gl.constexpr,
    ):
        gl.static_assert(BLOCK_N == 2 * _HALF, "a block is two ring slots of keys")
        operand_smem: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, [1, 0])
        plain_smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        vec_smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        q_lat, q_rope, rows_2d, block_rows = _q_and_rows_smem(NB_P, BLOCK_N, True)
        half_rows = smem_view(rows_2d, gl.int32, [2 * NB_P, _HALF], vec_smem)
        lat_ring = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, _HALF, D_LAT], plain_smem)
        rope_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, _HALF, D_ROPE], operand_smem)
        scale_ring = gl.allocate_shared_memory(gl.float32, [STAGES * N_TILES, _HALF], vec_smem)
        tiles = gl.allocate_shared_memory(gl.bfloat16, [TILES, BLOCK_N, D_LAT], gl.NVMMASharedLayout.get_default_for([BLOCK_N, D_LAT], gl.bfloat16))
        rope_tiles = gl.allocate_shared_memory(gl.bfloat16, [TILES, BLOCK_N, D_ROPE],
                                               gl.NVMMASharedLayout.get_default_for([BLOCK_N, D_ROPE], gl.bfloat16))
        p_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_N, BLOCK_H], gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_H], gl.bfloat16))
        full = gl.allocate_shared_memory(gl.int64, [TILES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [TILES * 4, 1], mbarrier.MBarrierLayout())
        for b in gl.static_range(TILES):
            mbarrier.init(full.index(b), count=1)
        for b in gl.static_range(TILES * 4):
            mbarrier.init(empty.index(b), count=1)

        t, hb, sp, n_lo, n_hi = _split_coords(H, TOPK, SPLITS, BLOCK_N)
        _stage_rows_and_q(Q, IDX, q_lat, q_rope, rows_2d, t, hb, n_lo, n_hi, stride_qt, stride_qh, stride_it, S_KV, H, BLOCK_N, NB_P, _NW)
        fence_async_shared()
        partition_barrier()
        gl.warp_specialize(
            [
                (_mma_partition, (q_lat, q_rope, tiles, rope_tiles, p_smem, block_rows, full, empty, OUT, LSE, PARTIAL,
                                  stride_ot, stride_oh, stride_lt, TOPK, H, T, sm_scale_log2, BLOCK_N, SPLITS, TILES)),
                (_dequantizing_partition, (lat_ring, rope_ring, scale_ring, tiles, rope_tiles, half_rows, full, empty,
                                           KV, KV_SCALE, KV_ROPE, stride_kvs, stride_ss, stride_rs, TOPK, H,
                                           N_TILES, BLOCK_N, STAGES, SPLITS, TILES, L2_AHEAD)),
            ],
            [4],
            [DEQUANT_REGS],
        )
