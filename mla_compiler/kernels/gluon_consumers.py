"""The consumer partitions of the warp-specialized sparse MLA forward: two warpgroups that run
the MMAs and the online softmax on the ring slots the producer fills (gluon_sparse_mla.py has the
schedule), and the output store."""

from __future__ import annotations

from .gluon_common import HAVE_GLUON

if HAVE_GLUON:
    from .gluon_common import (
        BLOCK_H,
        V_HALF,
        _program_coords,
        fence_async_shared,
        gl,
        gluon,
        mbarrier,
        partition_barrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

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
    def _online_softmax_step(s, m_i, m_new, l_i, acc, row_o: gl.constexpr):
        """P of the scores ``s`` (base 2) under the new row maxima, the running sum and the value
        accumulator rescaled to them (rows with no valid key yet stay at 0)."""
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_use)
        p = gl.exp2(s - m_use[:, None])
        return p, l_i * alpha + gl.sum(p, 1), acc * gl.convert_layout(alpha, row_o)[:, None]

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
            p, l_i, acc = _online_softmax_step(s, m_i, m_new, l_i, acc, row_o)
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
            p, l_i, acc = _online_softmax_step(s, m_i, m_new, l_i, acc, row_o)
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
