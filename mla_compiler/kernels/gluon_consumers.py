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
        _slot_chunk,
        _swap_with_other,
        _unhoisted,
        fence_async_shared,
        gl,
        gluon,
        mbarrier,
        partition_barrier,
        smem_view,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    @gluon.jit
    def _store_output(acc, m_i, l_i, OUT, LSE, t, hb, stride_ot, stride_oh, stride_lt, H,
                      COL0: gl.constexpr, N_COLS: gl.constexpr, WITH_LSE: gl.constexpr, row_s: gl.constexpr,
                      o_layout: gl.constexpr, stage, STAGED: gl.constexpr):
        """Normalize the output columns COL0 .. COL0 + N_COLS held in ``acc`` and store them; WITH_LSE
        (once a program) also the lse (natural log; +inf and a zero row where no key was valid, as
        the reference). STAGED: through ``stage``, a free [64, N_COLS] bf16 buffer of this
        warpgroup's, so the global stores are 16 bytes a thread along a row (from the accumulator's
        layout they are 4 bytes, a warp's 32 spread over 8 rows); else from the accumulator."""
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        empty_row = l_i == 0.0
        l_safe = gl.where(empty_row, 1.0, l_i)
        out = (acc / gl.convert_layout(l_safe, row_o)[:, None]).to(gl.bfloat16)
        if STAGED:
            LANES_ALONG: gl.constexpr = N_COLS // 8
            store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // LANES_ALONG, LANES_ALONG], [4, 1], [1, 0])
            stage.store(out)
            partition_barrier()
            out = stage.load(store_layout)
        else:
            store_layout: gl.constexpr = o_layout
        heads = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, store_layout))
        cols = COL0 + gl.arange(0, N_COLS, layout=gl.SliceLayout(0, store_layout))
        o_ptr = OUT + t * stride_ot + heads[:, None] * stride_oh + cols[None, :]
        gl.store(o_ptr, out, mask=(heads < H)[:, None])
        if WITH_LSE:
            _store_lse(m_i, l_safe, empty_row, LSE, t, hb, stride_lt, H, row_s)

    @gluon.jit
    def _store_lse(m_i, l_safe, empty_row, LSE, t, hb, stride_lt, H, row_s: gl.constexpr):
        """The program's heads' lse (natural log; +inf where no key was valid, as the reference)."""
        lse = gl.where(empty_row, float("inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
        heads_s = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=row_s)
        gl.store(LSE + t * stride_lt + heads_s, lse, mask=heads_s < H)

    @gluon.jit
    def _sum_halves(l_i, lsum, bar_l, WG: gl.constexpr, row_s: gl.constexpr):
        """The softmax sums over both warpgroups' keys: this warpgroup's ``l_i`` plus the other's,
        exchanged through ``lsum`` once both are past their last block."""
        lsum.index(WG).store(l_i)
        _swap_with_other(bar_l, 0, WG)
        return l_i + lsum.index(1 - WG).load(row_s)

    @gluon.jit
    def _softmax_p_alpha(s, m_i, m_new, l_i):
        """P of the scores ``s`` (base 2) under the new row maxima, the running sum rescaled to them,
        and the factor alpha that rescales the value accumulators (rows with no valid key yet stay
        at 0)."""
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_use)
        p = gl.exp2(s - m_use[:, None])
        return p, l_i * alpha + gl.sum(p, 1), alpha

    @gluon.jit
    def _online_softmax_step(s, m_i, m_new, l_i, acc, row_o: gl.constexpr):
        """_softmax_p_alpha, with the value accumulator ``acc`` rescaled."""
        p, l_i, alpha = _softmax_p_alpha(s, m_i, m_new, l_i)
        return p, l_i, acc * gl.convert_layout(alpha, row_o)[:, None]

    @gluon.jit
    def _fold_scales(s_lat, s_rope, sig, row_scale, sm_scale_log2, valid):
        """FOLD_SCALE: the scores (base 2, -inf for invalid keys) of f16 products Q' K'^T of Q's
        scaled latent and the keys' unscaled e4m3 values (``row_scale``: 1 / Q's scale times
        sm_scale_log2; ``sig``: the keys' scales) and of the bf16 rope products, and ``t`` = the
        scores plus floor(log2 sig), whose row maxima m keep P' = exp2(s - m) * sig < 2 within f16
        and the row's largest P' at 1/2 or more. floor(log2 sig) is sig's exponent field (a few
        integer operations; log2 itself is a 25-instruction polynomial); scales below 2^-64 count
        as 2^-64 there, so exp2(s - m) <= 2^64 stays finite in the sums. Limits: where every key
        of a row has a scale below about 2^-88, P' underflows f16 and the output is 0; scales
        above about 2^95 overflow s_lat * sig (quantizers give amax / 448)."""
        s = (s_lat * sig[None, :]) * row_scale[:, None] + s_rope * sm_scale_log2
        s = gl.where(valid[None, :], s, float("-inf"))
        floor_log2 = gl.maximum(((sig.to(gl.int32, bitcast=True) >> 23) & 0xFF) - 127, -64)
        return s, s + floor_log2.to(gl.float32)[None, :]

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

        _store_output(acc, m_i, l_i, OUT, LSE, t, hb, stride_ot, stride_oh, stride_lt, H, WG * V_HALF, V_HALF, WG == 0, row_s,
                      o_layout, q_a_smem, False)

    @gluon.jit
    def _consumer_split(
        q_a_ring, q_b_ring, k0, k1, k2, k3, r_ring, ok_ring, sc_ring, q_unscale, full, empty, xmax, p_half, lsum, bar_x, bar_p,
        bar_l, OUT, LSE, stride_ot, stride_oh, stride_lt, TOPK, H, sm_scale_log2,
        WG: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CHUNKED: gl.constexpr, CHUNK_BUFFERS: gl.constexpr,
        Q_IN_LOOP: gl.constexpr, FOLD_SCALE: gl.constexpr,
    ):
        """Scores split by keys: this warpgroup computes Q K^T for its half of the block's keys only,
        the two exchange their row maxima and their P halves through shared memory, then each adds
        P V (all keys) for its 256 value columns. No product is computed twice. With CHUNK_BUFFERS
        (each 128-column chunk of a slot its own buffer) the scores take one product per chunk and
        the values two accumulators of 128 columns, one per chunk. FOLD_SCALE (CHUNK_BUFFERS only):
        f16 latent products with the keys' row scales applied to the scores and to P (_fold_scales);
        the accumulators and the sums then carry a common factor 2^-m, which the output's division
        cancels."""
        t, hb = _program_coords(H)
        HALF: gl.constexpr = BLOCK_N // 2
        OTHER: gl.constexpr = 1 - WG
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF, 16])
        # The value columns a product covers: the warpgroup's 256, or one 128-column chunk.
        V_COLS: gl.constexpr = 128 if CHUNK_BUFFERS else V_HALF
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, V_COLS, 16])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)

        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([BLOCK_H], gl.float32, row_s)  # over this warpgroup's keys; summed at the end
        acc = gl.zeros([BLOCK_H, V_COLS], gl.float32, o_layout)
        acc_hi = gl.zeros([BLOCK_H, V_COLS], gl.float32, o_layout)  # CHUNK_BUFFERS: the second chunk's columns
        s_zero = gl.zeros([BLOCK_H, HALF], gl.float32, s_layout)
        if FOLD_SCALE:
            row_scale = q_unscale.load(row_s) * sm_scale_log2
        n_blocks = gl.cdiv(TOPK, BLOCK_N)
        for i in range(n_blocks):
            slot = i % STAGES
            # Q_IN_LOOP: Q's descriptors computed in the loop rather than hoisted into registers.
            q_at = 0
            if Q_IN_LOOP:
                q_at = _unhoisted(i)
            q_a_smem = q_a_ring.index(q_at)
            q_b_smem = q_b_ring.index(q_at)
            if CHUNKED or CHUNK_BUFFERS:
                # One product per 128-column chunk. CHUNKED: FlashMLA's fine-grained copy-GEMM
                # pipelining, the scores over each chunk start as soon as it is in the slot.
                mbarrier.wait(full.index(slot * 4 if CHUNKED else slot), (i // STAGES) & 1)
                s_rope = warpgroup_mma(q_b_smem, r_ring.index(slot).slice(WG * HALF, HALF, dim=0).permute((1, 0)), s_zero,
                                       use_acc=False, is_async=True)
                # FOLD_SCALE: the latent's f16 products apart from the rope's bf16 ones (scaled first).
                s = s_zero if FOLD_SCALE else s_rope
                for c in gl.static_range(4):
                    if CHUNKED and c > 0:
                        mbarrier.wait(full.index(slot * 4 + c), (i // STAGES) & 1)
                    k_c = _slot_chunk(k0, k1, k2, k3, slot, c, CHUNK_BUFFERS).slice(WG * HALF, HALF, dim=0)
                    s = warpgroup_mma(q_a_smem.slice(c * 128, 128, dim=1), k_c.permute((1, 0)), s,
                                      use_acc=not (FOLD_SCALE and c == 0), is_async=True)
                if FOLD_SCALE:
                    s_rope, s = warpgroup_mma_wait(0, deps=[s_rope, s])
                else:
                    s = warpgroup_mma_wait(0, deps=[s])
            else:
                mbarrier.wait(full.index(slot), (i // STAGES) & 1)
                s = warpgroup_mma(q_a_smem, k0.index(slot).slice(WG * HALF, HALF, dim=0).permute((1, 0)), s_zero, use_acc=False)
                s = warpgroup_mma(q_b_smem, r_ring.index(slot).slice(WG * HALF, HALF, dim=0).permute((1, 0)), s)
            valid = ok_ring.index(slot).slice(WG * HALF, HALF).load(col_s) != 0
            if FOLD_SCALE:
                sig = sc_ring.index(slot).slice(WG * HALF, HALF).load(col_s)
                s, t_fold = _fold_scales(s, s_rope, sig, row_scale, sm_scale_log2, valid)
                m_mine = gl.max(t_fold, 1)
            else:
                s = gl.where(valid[None, :], s * sm_scale_log2, float("-inf"))
                m_mine = gl.max(s, 1)
            # Single buffers suffice: a warpgroup writes block i+1's maximum only after waiting for
            # the other's P hand-off of block i, which the other makes after reading block i's
            # maximum (keep that read before the bar_p arrive); P halves likewise after bar_x.
            xmax.index(WG).store(m_mine)
            _swap_with_other(bar_x, i & 1, WG)
            m_new = gl.maximum(m_i, gl.maximum(m_mine, xmax.index(OTHER).load(row_s)))
            p, l_i, alpha = _softmax_p_alpha(s, m_i, m_new, l_i)
            alpha_o = gl.convert_layout(alpha, row_o)[:, None]
            acc = acc * alpha_o
            if CHUNK_BUFFERS:
                acc_hi = acc_hi * alpha_o
            if FOLD_SCALE:
                p_half.index(WG).store((p * sig[None, :]).to(gl.float16))
            else:
                p_half.index(WG).store(p.to(gl.bfloat16))
            fence_async_shared()
            _swap_with_other(bar_p, i & 1, WG)
            if CHUNK_BUFFERS:
                v_lo = _slot_chunk(k0, k1, k2, k3, slot, 2 * WG, CHUNK_BUFFERS)
                v_hi = _slot_chunk(k0, k1, k2, k3, slot, 2 * WG + 1, CHUNK_BUFFERS)
                acc = warpgroup_mma(p_half.index(0), v_lo.slice(0, HALF, dim=0), acc, is_async=True)
                acc_hi = warpgroup_mma(p_half.index(0), v_hi.slice(0, HALF, dim=0), acc_hi, is_async=True)
                acc = warpgroup_mma(p_half.index(1), v_lo.slice(HALF, HALF, dim=0), acc, is_async=True)
                acc_hi = warpgroup_mma(p_half.index(1), v_hi.slice(HALF, HALF, dim=0), acc_hi, is_async=True)
                acc, acc_hi = warpgroup_mma_wait(0, deps=[acc, acc_hi])
            else:
                v = k0.index(slot).slice(WG * V_HALF, V_HALF, dim=1)
                acc = warpgroup_mma(p_half.index(0), v.slice(0, HALF, dim=0), acc)
                acc = warpgroup_mma(p_half.index(1), v.slice(HALF, HALF, dim=0), acc)
            m_i = m_new
            partition_barrier()
            mbarrier.arrive(empty.index(slot))

        # Past here both warpgroups are done with Q: each stages its output columns in its half of it.
        l_i = _sum_halves(l_i, lsum, bar_l, WG, row_s)
        q_dead = q_a_ring.index(0)
        if FOLD_SCALE:  # Q's latent is f16 there: the bf16 output staged in the same bytes
            q_dead = smem_view(q_dead, gl.bfloat16, [BLOCK_H, 2 * V_HALF], gl.NVMMASharedLayout.get_default_for([BLOCK_H, 2 * V_HALF], gl.bfloat16))
        _store_output(acc, m_i, l_i, OUT, LSE, t, hb, stride_ot, stride_oh, stride_lt, H, WG * V_HALF, V_COLS, WG == 0, row_s,
                      o_layout, q_dead.slice(WG * V_HALF, V_COLS, dim=1), True)
        if CHUNK_BUFFERS:
            _store_output(acc_hi, m_i, l_i, OUT, LSE, t, hb, stride_ot, stride_oh, stride_lt, H, WG * V_HALF + V_COLS, V_COLS,
                          False, row_s, o_layout, q_dead.slice(WG * V_HALF + V_COLS, V_COLS, dim=1), True)
