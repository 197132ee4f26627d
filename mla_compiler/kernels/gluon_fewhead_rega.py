"""The few-head FP8 forward with the latent read from its ring slot straight into the registers of
the warpgroup MMAs: no converted tile in shared memory.

gluon_fewhead_wgmma converts each block's e4m3 latent into an f16 tile that both products read
from shared memory. At 16 heads H200 measured shared memory as its busiest unit (the copies, the
raw reads, the tile's stores and both products' reads of it) and the converting partition's
chain of steps as its bound. Here the products take the keys as register operands (the A
operand of a warpgroup MMA may live in registers), loaded from the raw bytes and converted on
the way:

- scores, transposed: S^T [64 keys, 16 heads] = K Q^T, K's 128-column chunk c loaded as
  [64, 128] e4m3 straight into the A operand's layout and converted to f16 in registers;
- values, transposed: O^T [128, 16] += V^T P^T for each 128-column chunk, V^T loaded the same way.

Each thread's share of an operand is made of whole 16-byte (K) or 4-byte (V^T) runs of its key
rows by numbering the columns in the products' own order, which only has to agree between the
two operands of a product: Q's latent columns are staged in K's order, and O^T's rows come out
in V^T's order and are put back when stored (``_k_order`` / ``_v_order``). The ring's 16-byte
runs are permuted by row (``_RING_ROWS``) so that both read patterns are free of bank
conflicts. The scales are those of gluon_fewhead_wgmma's F16 form: on the scores, and on P by
value tile.

Partitions: a copy partition (4 warps; its registers DEQUANT_REGS) fills a ring of STAGES slots
of 64-key blocks (latent by 128-column chunk, rope, scales) and hands each over when it has
landed; the MMA partition (the kernel's 4 warps, one warpgroup) does everything else and gives a
slot back once its last value chunk is in registers (one scale a row) or its products are done.

H200, V3.2 decode at 16 heads (RESULTS.md, tenth and eleventh call sets): one scale a row
0.0680 ms with 3 slots (0.0698-0.0702 before _RING_ROWS; the f16-tile kernel 0.0786-0.0791,
bf16 keys 0.0861-0.0876); FlashMLA's four scales a row 0.116 (the f16-tile kernel 0.0845: four
score accumulators and P buffers spill at 255 registers), so that layout keeps the f16 tile by
default.
"""

from __future__ import annotations

from .gluon_common import HAVE_GLUON

if HAVE_GLUON:
    from .gluon_common import (
        _chunk,
        _four_buffers,
        async_copy,
        async_rows,
        fence_async_shared,
        gl,
        gluon,
        mbarrier,
        partition_barrier,
        smem_view,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from .gluon_fewhead import BLOCK_H, _issue_rope_and_scales, _q_and_rows_smem, _split_coords, _stage_rows_and_q
    from .gluon_fewhead_wgmma import _block_scales, _softmax_state, _softmax_step, _stage_q_f16, _store_p_f16, _store_results_t

    _BLOCK_N = gl.constexpr(64)
    _LANES = gl.constexpr([[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]])  # the A operand's lanes (k_width 2)
    _WARPS = gl.constexpr([[16, 0], [32, 0]])
    # A ring chunk's bytes [64 keys, 128]: each row's 16-byte runs permuted by the row, the run's
    # bit 2 flipped by row bits 0 and 2 and its bit 1 by row bit 1. Then the K operand's 16-byte
    # reads (each 8-lane phase: two rows, one half of their runs each) and V^T's 4-byte reads
    # (rows 0, 2, 4, 6 of a group, two runs each) both meet 32 distinct banks. (Row & 7 XORed into
    # the run, the usual swizzle, puts a K phase's two rows on the same 16 banks: 2-way conflicts
    # on every K read, measured on H200 as 26 % of the shared-load wavefronts.)
    _RING_ROWS = gl.constexpr(gl.SharedLinearLayout(offset_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [0, 16], [0, 32], [0, 64],
                                                                  [1, 64], [2, 32], [4, 64], [8, 0], [16, 0], [32, 0]]))
    # The same bytes as K [64 keys, 128 in K order]: offset bits (byte in the run x4, run x3, row
    # x6) -> (key, k); and the A operand's register layout with the 16 bytes of a run first, so
    # one load moves them.
    _K_VIEW = gl.constexpr(gl.SharedLinearLayout(offset_bases=[[0, 1], [0, 8], [0, 16], [0, 32], [0, 2], [0, 4], [0, 64],
                                                               [1, 64], [2, 4], [4, 64], [8, 0], [16, 0], [32, 0]]))
    _K_LOAD = gl.constexpr(gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 8], [0, 16], [0, 32], [8, 0], [0, 64]],
                                                      lane_bases=_LANES.value, warp_bases=_WARPS.value, block_bases=[], shape=[64, 128]))
    # ... and as V^T [128 in V order, 64 keys], 4-byte runs a load.
    _V_VIEW = gl.constexpr(gl.SharedLinearLayout(offset_bases=[[8, 0], [64, 0], [1, 0], [2, 0], [4, 0], [16, 0], [32, 0],
                                                               [32, 1], [16, 2], [32, 4], [0, 8], [0, 16], [0, 32]]))
    _V_LOAD = gl.constexpr(gl.DistributedLinearLayout(reg_bases=[[8, 0], [64, 0], [0, 1], [0, 8], [0, 16], [0, 32]],
                                                      lane_bases=_LANES.value, warp_bases=_WARPS.value, block_bases=[], shape=[128, 64]))

    @gluon.jit
    def _a_operand(chunk, view: gl.constexpr, load: gl.constexpr):
        """A ring chunk read through the shared layout ``view`` in the register layout ``load`` (the
        A operand's, its registers reordered so that each thread's bytes of a row come first),
        converted to f16, in the A operand's layout (a renaming of registers: no data moves)."""
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_H, 16])
        raw = smem_view(chunk, gl.float8e4nv, load.shape, view).load(load)
        return gl.convert_layout(raw.to(gl.float16), gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2), assert_trivial=True)

    @gluon.jit
    def _key_operand(chunk):
        """K's 128-column chunk [64 keys, 128] (``chunk``: a ring chunk), as f16 in the A
        operand's registers, columns in K order: element (key, k) is byte _k_order(k) of the row.
        Each thread reads two rows x two 16-byte runs."""
        return _a_operand(chunk, _K_VIEW, _K_LOAD)

    @gluon.jit
    def _value_operand(chunk):
        """V^T of a 128-column chunk, [128, 64 keys], as f16 in the A operand's registers, rows in
        V order: row m is byte _v_order(m) of each key row. Each thread reads 4-byte runs."""
        return _a_operand(chunk, _V_VIEW, _V_LOAD)

    @gluon.jit
    def _issue_rows(j, n_blocks, block_rows, lat_ring, rope_ring, scale_ring, scale_slots, KV, KV_SCALE, KV_ROPE,
                    stride_kvs, stride_ss, stride_rs, N_TILES: gl.constexpr, STAGES: gl.constexpr, NW: gl.constexpr):
        """Starts the copies of block j's rows into slot j % STAGES (latent by 128-column chunk,
        rope, scales; nothing past the last block; rows -1 copy nothing), then closes the copy
        group (one a block, empty or not: see gluon_fewhead._issue_block)."""
        if j < n_blocks:
            slot = j % STAGES
            # 8 lanes a row's 128 bytes of a chunk, 16 bytes a thread.
            lat_layout: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [NW, 1], [1, 0])
            rows = block_rows.index(j).load(gl.SliceLayout(1, lat_layout)).to(gl.int64)
            ptr = KV + rows[:, None] * stride_kvs + gl.arange(0, 128, layout=gl.SliceLayout(0, lat_layout))[None, :]
            ptr = gl.max_contiguous(gl.multiple_of(ptr, [16, 16]), [1, 128])
            ok = (rows >= 0)[:, None]
            for c in gl.static_range(4):
                async_rows(smem_view(lat_ring.index(slot * 4 + c), gl.float8e4nv, [_BLOCK_N, 128], _RING_ROWS), ptr + c * 128, mask=ok)
            _issue_rope_and_scales(block_rows.index(j), slot, rope_ring, scale_ring, KV_SCALE, KV_ROPE, stride_ss, stride_rs, True,
                                   N_TILES, NW, scale_slots)
        async_copy.commit_group()

    @gluon.jit
    def _copy_partition(lat_ring, rope_ring, scale_ring, scale_slots, block_rows, full, empty, KV, KV_SCALE, KV_ROPE,
                        stride_kvs, stride_ss, stride_rs, TOPK, H,
                        N_TILES: gl.constexpr, STAGES: gl.constexpr, SPLITS: gl.constexpr):
        """Keeps STAGES - 1 blocks in flight: hands block b over once its copies have landed, then
        refills the slot block b - 1 had (once the MMA partition has given it back) with block
        b + STAGES - 1."""
        t, hb, sp, n_lo, n_hi = _split_coords(H, TOPK, SPLITS, _BLOCK_N)
        n_blocks = gl.cdiv(n_hi - n_lo, _BLOCK_N)
        for j in gl.static_range(STAGES - 1):
            _issue_rows(j, n_blocks, block_rows, lat_ring, rope_ring, scale_ring, scale_slots, KV, KV_SCALE, KV_ROPE,
                        stride_kvs, stride_ss, stride_rs, N_TILES, STAGES, 4)
        for b in range(n_blocks):
            async_copy.wait_group(STAGES - 2)  # this thread's copies of block b have landed
            fence_async_shared()  # the rope is read by the MMAs (async proxy)
            partition_barrier()  # ... and every thread's
            mbarrier.arrive(full.index(b % STAGES))
            nxt = b + STAGES - 1
            mbarrier.wait(empty.index(nxt % STAGES), ((nxt // STAGES) & 1) ^ 1)
            _issue_rows(nxt, n_blocks, block_rows, lat_ring, rope_ring, scale_ring, scale_slots, KV, KV_SCALE, KV_ROPE,
                        stride_kvs, stride_ss, stride_rs, N_TILES, STAGES, 4)
        async_copy.wait_group(0)

    @gluon.jit
    def _row_scores_issued(lat_ring, slot, rope, q_lat, q_rope, s_zero):
        """One scale a row: starts S^T's products (the rope's; the latent's, K from registers, one
        128-column chunk's product running while the next chunk is loaded: two chunks' operands
        held, four and the compiler serializes every MMA) and returns their accumulators with the
        last two still running."""
        s = warpgroup_mma(rope, q_rope.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s0 = s_zero
        for c in gl.static_range(4):
            k = _key_operand(lat_ring.index(slot * 4 + c))
            s0 = warpgroup_mma(k, q_lat.slice(c * 128, 128, dim=1).permute((1, 0)), s0, use_acc=c > 0, is_async=True)
            if c > 0:
                s0 = warpgroup_mma_wait(1, deps=[s0])
        return s, s0

    @gluon.jit
    def _tile_scores(lat_ring, slot, rope, q_lat, q_rope, s_zero, a0, a1, a2, a3):
        """Four scales a row (FlashMLA): S^T up to the per-head factor, each 128-column chunk's
        product (K from registers) in its own accumulator times its keys' scales (``a0`` .., per
        key row), one chunk at a time (overlapped, they spill)."""
        s = warpgroup_mma(rope, q_rope.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        for c in gl.static_range(4):
            k = _key_operand(lat_ring.index(slot * 4 + c))
            s_c = warpgroup_mma(k, q_lat.slice(c * 128, 128, dim=1).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            if c == 0:
                s, s_c = warpgroup_mma_wait(0, deps=[s, s_c])
            else:
                s_c = warpgroup_mma_wait(0, deps=[s_c])
            s = s + s_c * _chunk(c, a0, a1, a2, a3)[:, None]
        return s

    @gluon.jit
    def _mma_partition(q_lat, q_rope, q_exp, lat_ring, rope_ring, sc, p0, p1, p2, p3, block_rows, full, empty,
                       OUT, LSE, PARTIAL, stride_ot, stride_oh, stride_lt, TOPK, H, T, sm_scale_log2,
                       STAGES: gl.constexpr, SPLITS: gl.constexpr, N_TILES: gl.constexpr):
        """The online softmax over the split's blocks, transposed (keys are rows, heads columns),
        as gluon_fewhead_wgmma's F16 form, with both products' keys read from the ring slot."""
        t, hb, sp, n_lo, n_hi = _split_coords(H, TOPK, SPLITS, _BLOCK_N)
        n_blocks = gl.cdiv(n_hi - n_lo, _BLOCK_N)
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_H, 16])
        head_l: gl.constexpr = gl.SliceLayout(0, acc_l)
        head_scale = q_exp.load(head_l) * sm_scale_log2  # Q's per-head 2^e back, and the softmax scale
        u0, u1, u2, u3, m_i, l_rows, o0, o1, o2, o3, s_zero = _softmax_state(sm_scale_log2, _BLOCK_N, acc_l)
        for b in range(n_blocks):
            slot = b % STAGES
            valid = block_rows.index(b).load(gl.SliceLayout(1, acc_l)) >= 0
            mbarrier.wait(full.index(slot), (b // STAGES) & 1)
            if N_TILES == 1:
                # While the last score products run: the keys' scales, and value chunk 0's operand.
                s, s0 = _row_scores_issued(lat_ring, slot, rope_ring.index(slot), q_lat, q_rope, s_zero)
                a0, a1, a2, a3, f0, f1, f2, f3, u0, u1, u2, u3, r0, r1, r2, r3 = _block_scales(sc, slot, u0, u1, u2, u3, 1, acc_l)
                v0 = _value_operand(lat_ring.index(slot * 4))
                s, s0 = warpgroup_mma_wait(0, deps=[s, s0])
                s = s + s0 * a0[:, None]
            else:
                a0, a1, a2, a3, f0, f1, f2, f3, u0, u1, u2, u3, r0, r1, r2, r3 = _block_scales(sc, slot * 4, u0, u1, u2, u3, 4, acc_l)
                s = _tile_scores(lat_ring, slot, rope_ring.index(slot), q_lat, q_rope, s_zero, a0, a1, a2, a3)
            p, alpha, m_i, l_rows = _softmax_step(s, valid, head_scale, m_i, l_rows)
            _store_p_f16(p, p0, p1, p2, p3, f0, f1, f2, f3, N_TILES)
            fence_async_shared()
            partition_barrier()  # every warp's P rows are in place for the products
            if N_TILES == 1:
                # One chunk's product runs while the next chunk's operand is loaded (chunk 0's was
                # loaded under the score products); the slot goes back once the last operand is in
                # registers. (With four scales a row this spills: H200, 0.142 against 0.116 ms.)
                o0 = warpgroup_mma(v0, p0, o0 * (alpha * r0)[None, :], is_async=True)
                o1 = warpgroup_mma(_value_operand(lat_ring.index(slot * 4 + 1)), p1, o1 * (alpha * r1)[None, :], is_async=True)
                o0 = warpgroup_mma_wait(1, deps=[o0])
                o2 = warpgroup_mma(_value_operand(lat_ring.index(slot * 4 + 2)), p2, o2 * (alpha * r2)[None, :], is_async=True)
                o1 = warpgroup_mma_wait(1, deps=[o1])
                o3 = warpgroup_mma(_value_operand(lat_ring.index(slot * 4 + 3)), p3, o3 * (alpha * r3)[None, :], is_async=True)
                partition_barrier()  # every warp is past its reads of the slot
                mbarrier.arrive(empty.index(slot))
                o2, o3 = warpgroup_mma_wait(0, deps=[o2, o3])
            else:
                o0 = warpgroup_mma(_value_operand(lat_ring.index(slot * 4)), p0, o0 * (alpha * r0)[None, :])
                o1 = warpgroup_mma(_value_operand(lat_ring.index(slot * 4 + 1)), p1, o1 * (alpha * r1)[None, :])
                o2 = warpgroup_mma(_value_operand(lat_ring.index(slot * 4 + 2)), p2, o2 * (alpha * r2)[None, :])
                o3 = warpgroup_mma(_value_operand(lat_ring.index(slot * 4 + 3)), p3, o3 * (alpha * r3)[None, :])
                partition_barrier()  # every warp is past its reads of the slot
                mbarrier.arrive(empty.index(slot))
        _store_results_t(OUT, LSE, PARTIAL, o0, o1, o2, o3, u0, u1, u2, u3, m_i, l_rows, t, hb, sp, T, H, stride_ot, stride_oh, stride_lt,
                         SPLITS, N_TILES, True, True, acc_l)

    @gluon.jit
    def _fewhead_rega_fwd_kernel(
        Q, KV, KV_SCALE, KV_ROPE, IDX, OUT, LSE, PARTIAL,
        stride_qt, stride_qh, stride_kvs, stride_ss, stride_rs, stride_it, stride_ot, stride_oh, stride_lt,
        S_KV, TOPK, H, T, sm_scale_log2,
        N_TILES: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SPLITS: gl.constexpr, NB_P: gl.constexpr,
        DEQUANT_REGS: gl.constexpr,
    ):
        gl.static_assert(BLOCK_N == _BLOCK_N, "the keys are a warpgroup MMA's 64 rows")
        plain_smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        vec_smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        q_lat, q_rope, rows_2d, block_rows = _q_and_rows_smem(NB_P, BLOCK_N, True, gl.float16)
        # The ring: [slot x 4 chunks, 64 keys, 128 bytes] of latent, the rope as an MMA operand, the
        # scales ([slot, tile, key] for the copies, rows of keys for the reads).
        # Written and read through views in _RING_ROWS's order (the copies, _key_operand, _value_operand).
        lat_ring = gl.allocate_shared_memory(gl.float8e4nv, [STAGES * 4, BLOCK_N, 128], plain_smem)
        rope_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, 64],
                                              gl.NVMMASharedLayout.get_default_for([BLOCK_N, 64], gl.bfloat16))
        scale_slots = gl.allocate_shared_memory(gl.float32, [STAGES, N_TILES, BLOCK_N], plain_smem)
        scale_ring = smem_view(scale_slots, gl.float32, [STAGES * N_TILES, BLOCK_N], vec_smem)
        p0, p1, p2, p3 = _four_buffers(N_TILES == 4, gl.float16, [BLOCK_N, BLOCK_H],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_H], gl.float16))
        q_exp = gl.allocate_shared_memory(gl.float32, [BLOCK_H], vec_smem)
        full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(full.index(s), count=1)
            mbarrier.init(empty.index(s), count=1)

        t, hb, sp, n_lo, n_hi = _split_coords(H, TOPK, SPLITS, BLOCK_N)
        _stage_rows_and_q(Q, IDX, q_lat, q_rope, rows_2d, t, hb, n_lo, n_hi, stride_qt, stride_qh, stride_it, S_KV, H, BLOCK_N, NB_P, 4,
                          False)
        _stage_q_f16(Q, q_lat, q_rope, q_exp, t, hb, stride_qt, stride_qh, H, True)
        fence_async_shared()
        partition_barrier()
        gl.warp_specialize(
            [
                (_mma_partition, (q_lat, q_rope, q_exp, lat_ring, rope_ring, scale_ring, p0, p1, p2, p3, block_rows, full, empty,
                                  OUT, LSE, PARTIAL, stride_ot, stride_oh, stride_lt, TOPK, H, T, sm_scale_log2, STAGES, SPLITS, N_TILES)),
                (_copy_partition, (lat_ring, rope_ring, scale_ring, scale_slots, block_rows, full, empty, KV, KV_SCALE, KV_ROPE,
                                   stride_kvs, stride_ss, stride_rs, TOPK, H, N_TILES, STAGES, SPLITS)),
            ],
            [4],
            [DEQUANT_REGS],
        )
