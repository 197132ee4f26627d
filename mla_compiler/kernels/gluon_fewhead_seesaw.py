"""The few-head FP8 forward of gluon_fewhead_rega with two MMA warpgroups that take turns: each
block's scores by one of them, its values by both, half the output columns each (FlashMLA's
"seesaw" schedule on Hopper, transposed for 16 heads).

gluon_fewhead_rega's one MMA warpgroup runs every step of a block in series (load and convert
K, score products, the softmax, load and convert V^T, value products); H200 measured that chain,
with one MMA warp per scheduler, as its bound. Two warpgroups that each own whole blocks (tried
there as MMA_GROUPS=2) each hold all of O^T (64 registers) and spill at 224 registers. Here:

- warpgroup g computes the scores and the softmax of blocks g, g + 2, ... and stores their P^T
  (and each block's running maximum) in shared memory of its own;
- both warpgroups multiply every block's P^T into their half of O^T: warpgroup g holds output
  columns 256 g ... 256 g + 255 (32 registers), from value chunks 2 g and 2 g + 1;
- each warpgroup, at its block o: starts the scores of o, then takes block o - 1's maximum from
  the other warpgroup (waiting for it only now), runs o's softmax and hands its P^T over, and
  then does its value products of o - 1 and of o. The chain between the warpgroups is the
  softmax alone; the scores of o run while the other warpgroup finishes o - 1.

The row sums are kept per warpgroup (each adds its own blocks' P and rescales with every
block's maximum) and added at the end. Both warpgroups track the keys' largest scale so far
(gluon_fewhead_wgmma's F16 units) from every block's scales, so they agree on it without
exchanging it. A ring slot goes back once both warpgroups are past it (its empty barrier counts
two arrivals); a P^T buffer is rewritten two blocks later, once the other warpgroup's products
on it are done (``p_free``).
"""

from __future__ import annotations

from .gluon_common import HAVE_GLUON

if HAVE_GLUON:
    from .gluon_common import _chunk, _four_buffers, fence_async_shared, gl, gluon, mbarrier, partition_barrier, smem_view, warpgroup_mma, warpgroup_mma_wait
    from .gluon_fewhead import BLOCK_H, _q_and_rows_smem, _split_coords, _stage_rows_and_q
    from .gluon_fewhead_rega import _BLOCK_N, COPY_THREADS, _copy_partition, _ring_smem, _row_scores_issued, _tile_scores, _value_operand
    from .gluon_fewhead_wgmma import P_UNIT, _block_scales, _softmax_step, _stage_q_f16, _store_p_f16, _store_result_t

    @gluon.jit
    def _half_values(lat_ring, slot, pa, pb, o_a, o_b, factor_a, factor_b, G: gl.constexpr):
        """This warpgroup's half of a block's value products: O^T chunks 2G and 2G + 1 (``o_a``,
        ``o_b``) rescaled by their factors, plus V^T of the slot's chunks 2G, 2G + 1 times P^T
        (``pa``, ``pb``: the P^T buffers of those value tiles). The second chunk is loaded
        while the first chunk's product runs; returns once both are done, past every read of the
        slot by this warpgroup."""
        o_a = warpgroup_mma(_value_operand(lat_ring.index(slot * 4 + 2 * G)), pa, o_a * factor_a[None, :], is_async=True)
        o_b = warpgroup_mma(_value_operand(lat_ring.index(slot * 4 + 2 * G + 1)), pb, o_b * factor_b[None, :], is_async=True)
        return warpgroup_mma_wait(0, deps=[o_a, o_b])

    @gluon.jit
    def _scale_steps(sc, first, u0, u1, u2, u3, N_TILES: gl.constexpr, acc_l: gl.constexpr):
        """_block_scales' largest scales so far and accumulator factors, for a block whose P^T
        the other warpgroup stores."""
        a0, a1, a2, a3, f0, f1, f2, f3, u0, u1, u2, u3, r0, r1, r2, r3 = _block_scales(sc, first, u0, u1, u2, u3, N_TILES, acc_l)
        return u0, u1, u2, u3, r0, r1, r2, r3

    @gluon.jit
    def _other_block(lat_ring, sc, block, m_buf, p_ready, p_free, empty, q0, q1, q2, q3, u0, u1, u2, u3, m_i, l_rows, o_a, o_b,
                     STAGES: gl.constexpr, N_TILES: gl.constexpr, G: gl.constexpr, acc_l: gl.constexpr):
        """Block ``block`` (the other warpgroup's): its maximum once the other warpgroup has
        handed its P^T over (``q0`` ..: that warpgroup's P^T buffers), the rescaling of this
        warpgroup's state, its scales (for the largest scale so far), and this warpgroup's value
        products on it; then its slot and the P^T buffers go back."""
        slot = block % STAGES
        mbarrier.wait(p_ready.index(1 - G), (block // 2) & 1)
        m_new = m_buf.index(1 - G).load(gl.SliceLayout(0, acc_l))
        alpha = gl.exp2(m_i - gl.where(m_new == float("-inf"), 0.0, m_new))
        u0, u1, u2, u3, r0, r1, r2, r3 = _scale_steps(sc, slot * N_TILES, u0, u1, u2, u3, N_TILES, acc_l)
        o_a, o_b = _half_values(lat_ring, slot, _chunk(2 * G, q0, q1, q2, q3), _chunk(2 * G + 1, q0, q1, q2, q3), o_a, o_b,
                                alpha * _chunk(2 * G, r0, r1, r2, r3), alpha * _chunk(2 * G + 1, r0, r1, r2, r3), G)
        partition_barrier()  # every warp is past its reads of the slot and of the P^T buffers
        mbarrier.arrive(empty.index(slot))
        mbarrier.arrive(p_free.index(1 - G))
        return u0, u1, u2, u3, m_new, l_rows * alpha[None, :], o_a, o_b

    @gluon.jit
    def _seesaw_partition(q_lat, q_rope, q_exp, lat_ring, rope_ring, sc, p0, p1, p2, p3, q0, q1, q2, q3, m_buf, l_buf, block_rows,
                          full, empty, p_ready, p_free, done, OUT, LSE, PARTIAL, stride_ot, stride_oh, stride_lt, TOPK, H, T, sm_scale_log2,
                          STAGES: gl.constexpr, SPLITS: gl.constexpr, N_TILES: gl.constexpr, G: gl.constexpr):
        """Warpgroup G: the scores and softmax of blocks G, G + 2, ... (P^T into ``p0`` ..) and
        the value products of every block into output columns 256 G ... (the other warpgroup's
        P^T read from ``q0`` ..); at the end, the row sums added across the two and this half of
        the output stored."""
        t, hb, sp, n_lo, n_hi = _split_coords(H, TOPK, SPLITS, _BLOCK_N)
        n_blocks = gl.cdiv(n_hi - n_lo, _BLOCK_N)
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_H, 16])
        head_l: gl.constexpr = gl.SliceLayout(0, acc_l)
        head_scale = q_exp.load(head_l) * sm_scale_log2  # Q's per-head 2^e back, and the softmax scale
        u0 = sm_scale_log2 * 0.0
        u1 = u0
        u2 = u0
        u3 = u0
        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, head_l)
        l_rows = gl.zeros([_BLOCK_N, BLOCK_H], gl.float32, acc_l)
        o_a = gl.zeros([128, BLOCK_H], gl.float32, acc_l)
        o_b = gl.zeros([128, BLOCK_H], gl.float32, acc_l)
        s_zero = gl.zeros([_BLOCK_N, BLOCK_H], gl.float32, acc_l)
        for o in range(G, n_blocks, 2):
            slot = o % STAGES
            valid = block_rows.index(o).load(gl.SliceLayout(1, acc_l)) >= 0
            mbarrier.wait(full.index(slot), (o // STAGES) & 1)
            fence_async_shared()  # the copies' rope, before the MMAs read it
            if N_TILES == 1:
                s, s0 = _row_scores_issued(lat_ring, slot, rope_ring.index(slot), q_lat, q_rope, s_zero)
            else:
                key_l: gl.constexpr = gl.SliceLayout(1, acc_l)
                s = _tile_scores(lat_ring, slot, rope_ring.index(slot), q_lat, q_rope, s_zero, sc.index(slot * 4).load(key_l),
                                 sc.index(slot * 4 + 1).load(key_l), sc.index(slot * 4 + 2).load(key_l), sc.index(slot * 4 + 3).load(key_l))
                s0 = s
            # While the scores run: block o - 1's maximum (the other warpgroup's softmax).
            alpha_prev = gl.full([BLOCK_H], 1.0, gl.float32, head_l)
            if o > 0:
                mbarrier.wait(p_ready.index(1 - G), ((o - 1) // 2) & 1)
                m_prev = m_buf.index(1 - G).load(head_l)
                alpha_prev = gl.exp2(m_i - gl.where(m_prev == float("-inf"), 0.0, m_prev))
                m_i = m_prev
                l_rows = l_rows * alpha_prev[None, :]
                u0, u1, u2, u3, v0, v1, v2, v3 = _scale_steps(sc, ((o - 1) % STAGES) * N_TILES, u0, u1, u2, u3, N_TILES, acc_l)
            else:
                v0 = u0 * 0.0 + 1.0
                v1 = v0
                v2 = v0
                v3 = v0
            a0, a1, a2, a3, f0, f1, f2, f3, u0, u1, u2, u3, r0, r1, r2, r3 = _block_scales(sc, slot * N_TILES, u0, u1, u2, u3, N_TILES, acc_l)
            if N_TILES == 1:
                s, s0 = warpgroup_mma_wait(0, deps=[s, s0])
                s = s + s0 * a0[:, None]
            p, alpha, m_i, l_rows = _softmax_step(s, valid, head_scale, m_i, l_rows)
            if o >= 2:  # P^T of block o - 2 is still read by the other warpgroup's products
                mbarrier.wait(p_free.index(G), ((o - 2) // 2) & 1)
            _store_p_f16(p, p0, p1, p2, p3, f0, f1, f2, f3, N_TILES)
            m_buf.index(G).store(m_i)
            fence_async_shared()
            partition_barrier()  # every warp's P rows and the maximum are in place
            mbarrier.arrive(p_ready.index(G))
            if o > 0:  # block o - 1's values: the other warpgroup's P^T
                o_a, o_b = _half_values(lat_ring, (o - 1) % STAGES, _chunk(2 * G, q0, q1, q2, q3), _chunk(2 * G + 1, q0, q1, q2, q3), o_a,
                                        o_b, alpha_prev * _chunk(2 * G, v0, v1, v2, v3), alpha_prev * _chunk(2 * G + 1, v0, v1, v2, v3), G)
                partition_barrier()
                mbarrier.arrive(empty.index((o - 1) % STAGES))
                mbarrier.arrive(p_free.index(1 - G))
            o_a, o_b = _half_values(lat_ring, slot, _chunk(2 * G, p0, p1, p2, p3), _chunk(2 * G + 1, p0, p1, p2, p3), o_a, o_b,
                                    alpha * _chunk(2 * G, r0, r1, r2, r3), alpha * _chunk(2 * G + 1, r0, r1, r2, r3), G)
            partition_barrier()
            mbarrier.arrive(empty.index(slot))
        # The last block, when it is the other warpgroup's.
        if n_blocks > 0 and (n_blocks - 1) % 2 != G:
            u0, u1, u2, u3, m_i, l_rows, o_a, o_b = _other_block(lat_ring, sc, n_blocks - 1, m_buf, p_ready, p_free, empty, q0, q1, q2, q3,
                                                                 u0, u1, u2, u3, m_i, l_rows, o_a, o_b, STAGES, N_TILES, G, acc_l)
        # The row sums of both warpgroups (the same maximum by now), then this half of the output.
        l_mine = gl.sum(l_rows, 0)
        l_buf.index(G).store(l_mine)
        partition_barrier()
        mbarrier.arrive(done.index(G))
        mbarrier.wait(done.index(1 - G), 0)
        l_i = l_mine + l_buf.index(1 - G).load(head_l)
        if N_TILES == 4:
            o_a = o_a * (_chunk(2 * G, u0, u1, u2, u3) / P_UNIT)
            o_b = o_b * (_chunk(2 * G + 1, u0, u1, u2, u3) / P_UNIT)
        else:  # one scale a row: u0 is every chunk's
            o_a = o_a * (u0 / P_UNIT)
            o_b = o_b * (u0 / P_UNIT)
        _store_result_t(OUT, LSE, PARTIAL, o_a, 256 * G, m_i, l_i, t, hb, sp, T, H, stride_ot, stride_oh, stride_lt, SPLITS, G == 0, acc_l,
                        True)
        _store_result_t(OUT, LSE, PARTIAL, o_b, 256 * G + 128, m_i, l_i, t, hb, sp, T, H, stride_ot, stride_oh, stride_lt, SPLITS, False,
                        acc_l, True)

    @gluon.jit
    def _fewhead_seesaw_fwd_kernel(
        Q, KV, KV_SCALE, KV_ROPE, IDX, OUT, LSE, PARTIAL,
        stride_qt, stride_qh, stride_kvs, stride_ss, stride_rs, stride_it, stride_ot, stride_oh, stride_lt,
        S_KV, TOPK, H, T, sm_scale_log2,
        N_TILES: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SPLITS: gl.constexpr, NB_P: gl.constexpr,
        DEQUANT_REGS: gl.constexpr, L2_AHEAD: gl.constexpr = 0,
    ):
        gl.static_assert(BLOCK_N == _BLOCK_N, "the keys are a warpgroup MMA's 64 rows")
        vec_smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        q_lat, q_rope, rows_2d, block_rows = _q_and_rows_smem(NB_P, BLOCK_N, True, gl.float16)
        half_rows = smem_view(rows_2d, gl.int32, [2 * NB_P, BLOCK_N // 2], vec_smem)
        lat_ring, rope_ring, scale_slots, scale_ring = _ring_smem(STAGES, N_TILES)
        # Each warpgroup's P^T (one per value tile's scales) and the maximum of its last block; the row sums at the end.
        p_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_H], gl.float16)
        p0, p1, p2, p3 = _four_buffers(N_TILES == 4, gl.float16, [BLOCK_N, BLOCK_H], p_smem)
        q0, q1, q2, q3 = _four_buffers(N_TILES == 4, gl.float16, [BLOCK_N, BLOCK_H], p_smem)
        m_buf = gl.allocate_shared_memory(gl.float32, [2, BLOCK_H], vec_smem)
        l_buf = gl.allocate_shared_memory(gl.float32, [2, BLOCK_H], vec_smem)
        q_exp = gl.allocate_shared_memory(gl.float32, [BLOCK_H], vec_smem)
        full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        p_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        p_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        done = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(full.index(s), count=COPY_THREADS)
            mbarrier.init(empty.index(s), count=2)  # both warpgroups
        for g in gl.static_range(2):
            mbarrier.init(p_ready.index(g), count=1)
            mbarrier.init(p_free.index(g), count=1)
            mbarrier.init(done.index(g), count=1)

        t, hb, sp, n_lo, n_hi = _split_coords(H, TOPK, SPLITS, BLOCK_N)
        _stage_rows_and_q(Q, IDX, q_lat, q_rope, rows_2d, t, hb, n_lo, n_hi, stride_qt, stride_qh, stride_it, S_KV, H, BLOCK_N, NB_P, 4,
                          False)
        _stage_q_f16(Q, q_lat, q_rope, q_exp, t, hb, stride_qt, stride_qh, H, True)
        fence_async_shared()
        partition_barrier()
        # The registers the copy partition leaves, halved between the warpgroups (a multiple of 8).
        MMA_REGS: gl.constexpr = (512 - DEQUANT_REGS) // 16 * 8
        gl.warp_specialize(
            [
                (_seesaw_partition, (q_lat, q_rope, q_exp, lat_ring, rope_ring, scale_ring, p0, p1, p2, p3, q0, q1, q2, q3, m_buf, l_buf,
                                     block_rows, full, empty, p_ready, p_free, done, OUT, LSE, PARTIAL, stride_ot, stride_oh, stride_lt,
                                     TOPK, H, T, sm_scale_log2, STAGES, SPLITS, N_TILES, 0)),
                (_copy_partition, (lat_ring, rope_ring, scale_ring, scale_slots, block_rows, half_rows, full, empty, KV, KV_SCALE, KV_ROPE,
                                   stride_kvs, stride_ss, stride_rs, TOPK, H, N_TILES, STAGES, SPLITS, L2_AHEAD)),
                (_seesaw_partition, (q_lat, q_rope, q_exp, lat_ring, rope_ring, scale_ring, q0, q1, q2, q3, p0, p1, p2, p3, m_buf, l_buf,
                                     block_rows, full, empty, p_ready, p_free, done, OUT, LSE, PARTIAL, stride_ot, stride_oh, stride_lt,
                                     TOPK, H, T, sm_scale_log2, STAGES, SPLITS, N_TILES, 1)),
            ],
            [4, 4],
            [DEQUANT_REGS, MMA_REGS],
        )
