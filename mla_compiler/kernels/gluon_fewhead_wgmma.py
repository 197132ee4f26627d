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

Partitions as in gluon_fewhead_ws: a dequantizing partition (4 warps; launch DQ_WARPS) copies
the rows of each 32-key half block into a ring of STAGES half slots and turns two landed halves
into one 64-key tile (rope copied); the MMA partition (the kernel's 4 warps, one warpgroup) runs the products on
the other tile. The MMA partition gives a tile back a 128-column chunk at a time, as each chunk's
value product is done, so the next block's conversion starts before the block's last product.
Each chunk of the tiles, each P and each chunk's release barrier are their own buffer, and the
four tile scales of a half block move in one step: steps that store into parts of one buffer
are ordered by a barrier each (the compiler cannot tell the parts apart). Two tiles of 64
keys take 144 KB, which leaves room for 2 ring half slots (42 KB); launch TILES=1 has one tile
(the partitions overlap only by chunks) and room for 5 half slots.

F16 (the default): the tile holds the e4m3 values as f16 (exact, one conversion instruction a
pair, against six for e4m3 x scale in fp32 and back to bf16), and the scales go where they cost
a few instructions a key instead of one a value:
- Q is staged once as f16 times 2^-e a head (its largest magnitude into [2^14, 2^15): exact);
- the scores take each 128-column tile's product times the keys' scales of that tile, then 2^e;
- P^T is stored once per value tile (one scale a row: once), each key row times its scale over
  the largest scale so far x 2^15, and the tile's accumulator is kept in units of that largest
  scale (rescaled with the softmax's alpha when it grows, multiplied back at the end).
The keys are then exact (e4m3 x scale), not rounded to bf16, and P has f16's 11 bits.
Without F16, the latent is dequantized (e4m3 x scale in fp32, then bf16) into bf16 tiles.
Program coordinates, rows, Q staging, copies and the dequantization are gluon_fewhead's.
H200, V3.2 decode at 16 heads (RESULTS.md, seventh call set), FlashMLA layout / row scale: F16
0.086 / 0.078 ms, bf16 tiles 0.095 / 0.089, bf16 keys 0.088 (gluon_fewhead_ws's mma.sync form:
0.099 / 0.093).
"""

from __future__ import annotations

from .gluon_common import HAVE_GLUON

if HAVE_GLUON:
    from .gluon_common import (
        _chunk,
        _four_buffers,
        async_copy,
        fence_async_shared,
        gl,
        gluon,
        mbarrier,
        partition_barrier,
        smem_view,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from .gluon_fewhead import (
        BLOCK_H,
        D_LAT,
        D_ROPE,
        _dequantize_into,
        _issue_block,
        _q_and_rows_smem,
        _split_coords,
        _stage_rows_and_q,
    )

    _NW = gl.constexpr(4)  # warps of the kernel's own partition (the MMAs); the dequantizing one has DQ_WARPS
    P_UNIT = gl.constexpr(32768.0)  # F16: P^T x scale / (largest scale) is stored times this
    _HALF = gl.constexpr(32)  # keys a ring slot holds: half a block

    @gluon.jit
    def _prefetch_half(j, n_halves, half_rows, KV, KV_SCALE, KV_ROPE, stride_kvs, stride_ss, stride_rs, NW: gl.constexpr):
        """Asks L2 for half block j's rows (latent, scales, rope: every 128-byte line a row
        touches, FlashMLA's unaligned 656-byte rows included), without registers or shared memory
        to hold them: the ring's copies of it, later, then wait on L2 instead of HBM."""
        if j < n_halves:
            # [32 rows, 8 lines] over the partition's threads: each address once with 4 warps, twice with 8.
            layout: gl.constexpr = gl.BlockedLayout([1, 2], [8, 4], [NW, 1], [1, 0])
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
    def _k_order(k):
        """gluon_fewhead_rega's score operands: the latent column (within its 128-column chunk) at
        position ``k`` of the products' order (bits 0, 3, 4, 5 of k: the byte in a thread's
        16-byte run of a key row; bits 1, 2: the run; bit 6: the half)."""
        return (k & 1) | (((k >> 3) & 7) << 1) | (((k >> 1) & 3) << 4) | (k & 64)

    @gluon.jit
    def _v_order(m):
        """gluon_fewhead_rega's value operands: the latent column (within its 128-column chunk) at
        row ``m`` of V^T and O^T (bits 3, 6 of m: the byte in a thread's 4-byte run of a key row;
        bits 0-2 and 4-5: the run)."""
        return ((m >> 3) & 1) | (((m >> 6) & 1) << 1) | ((m & 7) << 2) | (((m >> 4) & 3) << 5)

    @gluon.jit
    def _stage_q_f16(Q, q_lat, q_rope, q_exp, t, hb, stride_qt, stride_qh, H, K_ORDER: gl.constexpr = False):
        """Q of the program's heads for an f16 key tile (F16): each head's row times 2^-e, the
        power of two that brings its latent's largest magnitude into [2^14, 2^15), so bf16 -> f16
        is exact (f16 has the wider mantissa, and the row now fits its range); the latent as f16,
        the rope as bf16; 2^e per head into ``q_exp`` for the scores. Padded heads are 0.
        K_ORDER: the latent's columns in _k_order within each 128-column chunk."""
        q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [_NW, 1], [1, 0])
        heads = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, q_layout))
        h_ok = (heads < H)[:, None]
        q_row = Q + t * stride_qt + heads[:, None] * stride_qh
        cols = gl.arange(0, D_LAT, layout=gl.SliceLayout(0, q_layout))
        if K_ORDER:
            cols = (cols & ~127) | _k_order(cols & 127)
        lat = gl.load(q_row + cols[None, :], mask=h_ok, other=0.0).to(gl.float32)
        amax = gl.max(gl.abs(lat), 1)
        # floor(log2(amax)) - 14 from the exponent bits (exact), kept where 2^e and 2^-e are normal floats.
        e = gl.where(amax > 0.0, ((amax.to(gl.int32, bitcast=True) >> 23) & 0xFF) - 141, 0)
        e = gl.minimum(gl.maximum(e, -100), 100)
        down = ((127 - e) << 23).to(gl.float32, bitcast=True)
        q_lat.store((lat * down[:, None]).to(gl.float16))
        rope = gl.load(q_row + D_LAT + gl.arange(0, D_ROPE, layout=gl.SliceLayout(0, q_layout))[None, :], mask=h_ok, other=0.0)
        q_rope.store((rope.to(gl.float32) * down[:, None]).to(gl.bfloat16))
        q_exp.store(((127 + e) << 23).to(gl.float32, bitcast=True))

    @gluon.jit
    def _convert_into(lat_ring, dst, slot, c: gl.constexpr, NW: gl.constexpr):
        """Columns c*128 .. c*128+127 of the FP8 latent in ring slot ``slot`` into ``dst``, that
        chunk's f16 buffer, as they are (e4m3 -> f16 is exact, one conversion a pair; the scales go
        to the scores and P). Same thread layout as gluon_fewhead._dequantize_into (no bank conflicts)."""
        cvt_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [NW, 1], [1, 0])
        dst.store(lat_ring.index(slot).slice(c * 128, 128, dim=1).load(cvt_layout).to(gl.float16))

    @gluon.jit
    def _copy_scales(scale_slots, slot, tile_scales, tile, part: gl.constexpr, NW: gl.constexpr):
        """F16: the scales of a half block, every value tile's in one step, from the ring slot into
        the tile's scales (a warp a value tile; one step: steps into one buffer are ordered by barriers)."""
        scale_layout: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [NW, 1], [1, 0])
        tile_scales.index(tile).slice(part * _HALF, _HALF, dim=1).store(scale_slots.index(slot).load(scale_layout))

    @gluon.jit
    def _dequantizing_partition(lat_ring, rope_ring, scale_ring, scale_slots, k0, k1, k2, k3, rope_tiles, tile_scales, half_rows, full,
                                e0, e1, e2, e3,
                                KV, KV_SCALE, KV_ROPE, stride_kvs, stride_ss, stride_rs, TOPK, H,
                                N_TILES: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SPLITS: gl.constexpr,
                                TILES: gl.constexpr, L2_AHEAD: gl.constexpr, F16: gl.constexpr, NW: gl.constexpr):
        """Copies half blocks STAGES - 1 ahead (NW warps: DQ_WARPS); block b's two halves go into tile b % TILES once
        the MMA partition has released it (block b - TILES), then one arrive hands it over. F16:
        the latent is converted as it is and its scales copied beside the tile."""
        t, hb, sp, n_lo, n_hi = _split_coords(H, TOPK, SPLITS, BLOCK_N)
        n_halves = 2 * gl.cdiv(n_hi - n_lo, BLOCK_N)
        for j in gl.static_range(STAGES - 1 + L2_AHEAD):
            if j >= STAGES - 1:
                _prefetch_half(j, n_halves, half_rows, KV, KV_SCALE, KV_ROPE, stride_kvs, stride_ss, stride_rs, NW)
            else:
                _issue_block(j, n_halves, half_rows, lat_ring, rope_ring, scale_ring, KV, KV_SCALE, KV_ROPE,
                             stride_kvs, stride_ss, stride_rs, True, N_TILES, _HALF, STAGES, NW, scale_slots)
        rope_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NW, 1], [1, 0])
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
                             stride_kvs, stride_ss, stride_rs, True, N_TILES, _HALF, STAGES, NW, scale_slots)
                if L2_AHEAD > 0:
                    _prefetch_half(i + STAGES - 1 + L2_AHEAD, n_halves, half_rows, KV, KV_SCALE, KV_ROPE, stride_kvs, stride_ss, stride_rs,
                                   NW)
                slot = i % STAGES
                async_copy.wait_group(STAGES - 1)  # this thread's copies of half block i have landed
                partition_barrier()  # ... and every thread's
                for c in gl.static_range(4):
                    if part == 0:
                        # The MMAs release the tile a 128-column chunk at a time (chunk 0 with the
                        # rope): each chunk is refilled as soon as its product is done.
                        mbarrier.wait(_chunk(c, e0, e1, e2, e3).index(tile), ((b // TILES) & 1) ^ 1)
                    dst = _chunk(c, k0, k1, k2, k3).index(tile).slice(part * _HALF, _HALF, dim=0)
                    if F16:
                        _convert_into(lat_ring, dst, slot, c, NW)
                    else:
                        _dequantize_into(lat_ring, scale_ring, dst, slot, c, N_TILES, NW)
                    if c == 0:
                        rope_tiles.index(tile).slice(part * _HALF, _HALF, dim=0).store(rope_ring.index(slot).load(rope_layout))
                        if F16:
                            # The MMAs read the tile's scales before its chunk 0 goes back.
                            _copy_scales(scale_slots, slot, tile_scales, tile, part, NW)
            # The MMAs read the tile through the async proxy: order these stores before them.
            fence_async_shared()
            partition_barrier()  # every thread's stores are done: one arrive for the partition
            mbarrier.arrive(full.index(tile))
        async_copy.wait_group(0)

    @gluon.jit
    def _store_result_t(OUT, LSE, PARTIAL, o_t, col0, m_i, l_i, t, hb, sp, T, H, stride_ot, stride_oh, stride_lt,
                        SPLITS: gl.constexpr, WITH_STATE: gl.constexpr, acc_l: gl.constexpr, V_ORDER: gl.constexpr = False):
        """gluon_fewhead._store_result for a transposed accumulator O^T [columns, heads] holding
        output columns col0 ...: unsplit, out (normalized, bf16) and, WITH_STATE, lse (natural
        log; +inf for a head with no valid key); split, the unnormalized partial state per (split,
        token, head) that triton_sparse_mla's combine kernel merges (acc [512], m in base 2, l).
        V_ORDER: O^T's rows are the 128 columns of a chunk in _v_order."""
        heads = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, acc_l))
        h_ok = heads < H
        cols = gl.arange(0, o_t.shape[0], layout=gl.SliceLayout(1, acc_l))
        if V_ORDER:
            cols = _v_order(cols)
        cols = col0 + cols
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
    def _value_chunk(keys_c, p_smem, o_c, empty_c, tile):
        """O^T rows c*128 ... += V^T of that value chunk (``keys_c``: the tile's chunk c) x P^T;
        then chunk c of the tile (chunk 0 with the rope, read by the scores before) goes back to
        the dequantizing partition."""
        o_c = warpgroup_mma(keys_c.permute((1, 0)), p_smem, o_c)
        partition_barrier()  # every warp is past its reads of the chunk
        mbarrier.arrive(empty_c.index(tile))
        return o_c

    @gluon.jit
    def _issue_scores_f16(k0, k1, k2, k3, rope, q_lat, q_rope, s_zero, N_TILES: gl.constexpr):
        """F16: starts the score products: the rope's, and the f16 latent's (per 128-column tile,
        each its own accumulator, for the tile's scales; N_TILES 1: one over all 512 columns)."""
        s = warpgroup_mma(rope, q_rope.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        if N_TILES == 4:
            s0 = warpgroup_mma(k0, q_lat.slice(0, 128, dim=1).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s1 = warpgroup_mma(k1, q_lat.slice(128, 128, dim=1).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s2 = warpgroup_mma(k2, q_lat.slice(256, 128, dim=1).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s3 = warpgroup_mma(k3, q_lat.slice(384, 128, dim=1).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        else:
            s0 = _latent_scores(k0, k1, k2, k3, q_lat, s_zero, True)
            s1 = s0
            s2 = s0
            s3 = s0
        return s, s0, s1, s2, s3

    @gluon.jit
    def _finish_scores_f16(s, s0, s1, s2, s3, a0, a1, a2, a3, N_TILES: gl.constexpr):
        """F16: S^T up to the per-head factor, once the products are done: the rope's plus each
        tile's latent product times its keys' scales (``a0`` .., per key row)."""
        if N_TILES == 4:
            s, s0, s1, s2, s3 = warpgroup_mma_wait(0, deps=[s, s0, s1, s2, s3])
            return s + s0 * a0[:, None] + s1 * a1[:, None] + s2 * a2[:, None] + s3 * a3[:, None]
        else:
            s, s0 = warpgroup_mma_wait(0, deps=[s, s0])
            return s + s0 * a0[:, None]

    @gluon.jit
    def _latent_scores(k0, k1, k2, k3, q_lat, acc, ASYNC: gl.constexpr):
        """acc + K Q^T over the latent's 512 columns, a 128-column chunk buffer at a time."""
        acc = warpgroup_mma(k0, q_lat.slice(0, 128, dim=1).permute((1, 0)), acc, is_async=ASYNC)
        acc = warpgroup_mma(k1, q_lat.slice(128, 128, dim=1).permute((1, 0)), acc, is_async=ASYNC)
        acc = warpgroup_mma(k2, q_lat.slice(256, 128, dim=1).permute((1, 0)), acc, is_async=ASYNC)
        return warpgroup_mma(k3, q_lat.slice(384, 128, dim=1).permute((1, 0)), acc, is_async=ASYNC)

    @gluon.jit
    def _key_scales(scales, u, acc_l: gl.constexpr):
        """F16: one value tile's scales of the block's keys ``scales``: (per key row, in the
        accumulator's rows; the factor of its P^T rows; the largest scale so far ``u`` raised by
        this block's; the factor that rescales the tile's accumulator to it). P^T x factor is P x
        scale / u x 2^15: at most 2^15 (f16 holds 65504) and normal down to P x scale / u =
        2^-29, so keys whose scales sit up to 2^24 below the largest (the extreme-scale tests) keep
        f16 precision."""
        all_l: gl.constexpr = gl.BlockedLayout([2], [32], [4], [0])  # every key in each warp: no cross-warp reduction
        u_new = gl.maximum(u, gl.max(scales.load(all_l), 0))
        sc = scales.load(gl.SliceLayout(1, acc_l))
        return sc, sc * gl.where(u_new > 0.0, P_UNIT / u_new, 0.0), u_new, gl.where(u_new > 0.0, u / u_new, 1.0)

    @gluon.jit
    def _softmax_state(sm_scale_log2, BLOCK_N: gl.constexpr, acc_l: gl.constexpr):
        """The online softmax's starting state, transposed: (F16: the largest scale so far of each
        value tile, u0-u3, N_TILES 1: u0 for all; m per head; each key row's share of the sum,
        rescaled with the accumulator and summed over the rows once at the end instead of across
        warps every block; O^T by 128-column chunk of the value; zero scores)."""
        u = sm_scale_log2 * 0.0
        return (u, u, u, u, gl.full([BLOCK_H], float("-inf"), gl.float32, gl.SliceLayout(0, acc_l)),
                gl.zeros([BLOCK_N, BLOCK_H], gl.float32, acc_l),
                gl.zeros([128, BLOCK_H], gl.float32, acc_l), gl.zeros([128, BLOCK_H], gl.float32, acc_l),
                gl.zeros([128, BLOCK_H], gl.float32, acc_l), gl.zeros([128, BLOCK_H], gl.float32, acc_l),
                gl.zeros([BLOCK_N, BLOCK_H], gl.float32, acc_l))

    @gluon.jit
    def _block_scales(sc, first, u0, u1, u2, u3, N_TILES: gl.constexpr, acc_l: gl.constexpr):
        """_key_scales of a block's value tiles (``sc`` rows ``first`` ..; N_TILES 1: the one
        scale serves all four chunks): a0-a3, f0-f3, u0-u3, r0-r3."""
        a0, f0, u0, r0 = _key_scales(sc.index(first), u0, acc_l)
        if N_TILES == 4:
            a1, f1, u1, r1 = _key_scales(sc.index(first + 1), u1, acc_l)
            a2, f2, u2, r2 = _key_scales(sc.index(first + 2), u2, acc_l)
            a3, f3, u3, r3 = _key_scales(sc.index(first + 3), u3, acc_l)
        else:
            a1, f1, r1 = a0, f0, r0
            a2, f2, r2 = a0, f0, r0
            a3, f3, r3 = a0, f0, r0
        return a0, a1, a2, a3, f0, f1, f2, f3, u0, u1, u2, u3, r0, r1, r2, r3

    @gluon.jit
    def _softmax_step(s, valid, head_scale, m_i, l_rows):
        """One block of the online softmax down the columns of S^T (keys not ``valid`` masked):
        (P^T, the heads' rescale factor, m, the rows' sums)."""
        s = gl.where(valid[:, None], s * head_scale[None, :], float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 0))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_use)
        p = gl.exp2(s - m_use[None, :])
        return p, alpha, m_new, l_rows * alpha[None, :] + p

    @gluon.jit
    def _store_p_f16(p, p0, p1, p2, p3, f0, f1, f2, f3, N_TILES: gl.constexpr):
        """F16: P^T by value tile, each key row times its tile's factor (``f0`` ..)."""
        p0.store((p * f0[:, None]).to(gl.float16))
        if N_TILES == 4:
            p1.store((p * f1[:, None]).to(gl.float16))
            p2.store((p * f2[:, None]).to(gl.float16))
            p3.store((p * f3[:, None]).to(gl.float16))

    @gluon.jit
    def _store_results_t(OUT, LSE, PARTIAL, o0, o1, o2, o3, u0, u1, u2, u3, m_i, l_rows, t, hb, sp, T, H, stride_ot, stride_oh, stride_lt,
                         SPLITS: gl.constexpr, N_TILES: gl.constexpr, F16: gl.constexpr, V_ORDER: gl.constexpr, acc_l: gl.constexpr):
        """The four O^T chunks through _store_result_t, F16: first back from units of each value
        tile's largest scale / 2^15 (``u0`` ..; N_TILES 1: u0 for all)."""
        if F16:
            u0, u1, u2, u3 = u0 / P_UNIT, u1 / P_UNIT, u2 / P_UNIT, u3 / P_UNIT
            if N_TILES == 4:
                o0, o1, o2, o3 = o0 * u0, o1 * u1, o2 * u2, o3 * u3
            else:
                o0, o1, o2, o3 = o0 * u0, o1 * u0, o2 * u0, o3 * u0
        l_i = gl.sum(l_rows, 0)
        _store_result_t(OUT, LSE, PARTIAL, o0, 0, m_i, l_i, t, hb, sp, T, H, stride_ot, stride_oh, stride_lt, SPLITS, True, acc_l, V_ORDER)
        _store_result_t(OUT, LSE, PARTIAL, o1, 128, m_i, l_i, t, hb, sp, T, H, stride_ot, stride_oh, stride_lt, SPLITS, False, acc_l, V_ORDER)
        _store_result_t(OUT, LSE, PARTIAL, o2, 256, m_i, l_i, t, hb, sp, T, H, stride_ot, stride_oh, stride_lt, SPLITS, False, acc_l, V_ORDER)
        _store_result_t(OUT, LSE, PARTIAL, o3, 384, m_i, l_i, t, hb, sp, T, H, stride_ot, stride_oh, stride_lt, SPLITS, False, acc_l, V_ORDER)

    @gluon.jit
    def _mma_partition(q_lat, q_rope, q_exp, k0, k1, k2, k3, rope_tiles, sc, p0, p1, p2, p3, block_rows, full, e0, e1, e2, e3,
                       OUT, LSE, PARTIAL,
                       stride_ot, stride_oh, stride_lt, TOPK, H, T, sm_scale_log2,
                       BLOCK_N: gl.constexpr, SPLITS: gl.constexpr, TILES: gl.constexpr, N_TILES: gl.constexpr, F16: gl.constexpr):
        """The online softmax over the split's blocks, transposed (keys are rows, heads columns),
        each block read from its tile (bf16, or F16 f16), which is then released to the dequantizing partition.
        F16: the tile holds the e4m3 values as f16; the keys' scales multiply the scores, and P by
        value tile (the accumulator of a tile kept in units of its largest scale so far)."""
        t, hb, sp, n_lo, n_hi = _split_coords(H, TOPK, SPLITS, BLOCK_N)
        n_blocks = gl.cdiv(n_hi - n_lo, BLOCK_N)
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_H, 16])
        head_l: gl.constexpr = gl.SliceLayout(0, acc_l)
        if F16:
            head_scale = q_exp.load(head_l) * sm_scale_log2  # Q's per-head 2^e back, and the softmax scale
        else:
            head_scale = gl.full([BLOCK_H], 1.0, gl.float32, head_l) * sm_scale_log2
        # O^T by 128-column chunks of the value, one product each, so the tile is released by chunk.
        u0, u1, u2, u3, m_i, l_rows, o0, o1, o2, o3, s_zero = _softmax_state(sm_scale_log2, BLOCK_N, acc_l)
        for b in range(n_blocks):
            tile = b % TILES
            valid = block_rows.index(b).load(gl.SliceLayout(1, acc_l)) >= 0
            mbarrier.wait(full.index(tile), (b // TILES) & 1)
            c0, c1, c2, c3 = k0.index(tile), k1.index(tile), k2.index(tile), k3.index(tile)
            if F16:
                # The products run while the keys' scales are read and reduced.
                s, s0, s1, s2, s3 = _issue_scores_f16(c0, c1, c2, c3, rope_tiles.index(tile), q_lat, q_rope, s_zero, N_TILES)
                a0, a1, a2, a3, f0, f1, f2, f3, u0, u1, u2, u3, r0, r1, r2, r3 = _block_scales(sc, tile * N_TILES, u0, u1, u2, u3, N_TILES,
                                                                                               acc_l)
                s = _finish_scores_f16(s, s0, s1, s2, s3, a0, a1, a2, a3, N_TILES)
            else:
                s = warpgroup_mma(rope_tiles.index(tile), q_rope.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                s = warpgroup_mma_wait(0, deps=[_latent_scores(c0, c1, c2, c3, q_lat, s, True)])
            p, alpha, m_i, l_rows = _softmax_step(s, valid, head_scale, m_i, l_rows)
            if F16:
                _store_p_f16(p, p0, p1, p2, p3, f0, f1, f2, f3, N_TILES)
            else:
                p0.store(p.to(gl.bfloat16))
                r0 = 1.0
                r1 = 1.0
                r2 = 1.0
                r3 = 1.0
            fence_async_shared()
            partition_barrier()  # every warp's P rows are in place for the products
            o0 = _value_chunk(c0, p0, o0 * (alpha * r0)[None, :], e0, tile)
            o1 = _value_chunk(c1, p1, o1 * (alpha * r1)[None, :], e1, tile)
            o2 = _value_chunk(c2, p2, o2 * (alpha * r2)[None, :], e2, tile)
            o3 = _value_chunk(c3, p3, o3 * (alpha * r3)[None, :], e3, tile)
        _store_results_t(OUT, LSE, PARTIAL, o0, o1, o2, o3, u0, u1, u2, u3, m_i, l_rows, t, hb, sp, T, H, stride_ot, stride_oh, stride_lt,
                         SPLITS, N_TILES, F16, False, acc_l)

    @gluon.jit
    def _fewhead_wgmma_fwd_kernel(
        Q, KV, KV_SCALE, KV_ROPE, IDX, OUT, LSE, PARTIAL,
        stride_qt, stride_qh, stride_kvs, stride_ss, stride_rs, stride_it, stride_ot, stride_oh, stride_lt,
        S_KV, TOPK, H, T, sm_scale_log2,
        N_TILES: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SPLITS: gl.constexpr, NB_P: gl.constexpr,
        DEQUANT_REGS: gl.constexpr, TILES: gl.constexpr, L2_AHEAD: gl.constexpr, F16: gl.constexpr = False, DQ_WARPS: gl.constexpr = 4,
    ):
        gl.static_assert(BLOCK_N == 2 * _HALF, "a block is two ring slots of keys")
        operand_smem: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, [1, 0])
        plain_smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        vec_smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        TILE_DTYPE: gl.constexpr = gl.float16 if F16 else gl.bfloat16
        N_P: gl.constexpr = N_TILES if F16 else 1
        q_lat, q_rope, rows_2d, block_rows = _q_and_rows_smem(NB_P, BLOCK_N, True, TILE_DTYPE)
        half_rows = smem_view(rows_2d, gl.int32, [2 * NB_P, _HALF], vec_smem)
        lat_ring = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, _HALF, D_LAT], plain_smem)
        rope_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, _HALF, D_ROPE], operand_smem)
        # The ring's scales: [slot, tile, key] for the copies (one step a half block), rows of keys
        # for the reads. The tiles by 128-column chunk, separate buffers (see _four_buffers).
        scale_slots = gl.allocate_shared_memory(gl.float32, [STAGES, N_TILES, _HALF], plain_smem)
        scale_ring = smem_view(scale_slots, gl.float32, [STAGES * N_TILES, _HALF], vec_smem)
        chunk_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, 128], TILE_DTYPE)
        k0, k1, k2, k3 = _four_buffers(True, TILE_DTYPE, [TILES, BLOCK_N, 128], chunk_layout)
        rope_tiles = gl.allocate_shared_memory(gl.bfloat16, [TILES, BLOCK_N, D_ROPE],
                                               gl.NVMMASharedLayout.get_default_for([BLOCK_N, D_ROPE], gl.bfloat16))
        # P (F16: one per value tile's scales); F16: the tiles' key scales ([tile, value tile, key]
        # for the copy, rows for the reads) and Q's per-head powers of two.
        p0, p1, p2, p3 = _four_buffers(N_P == 4, TILE_DTYPE, [BLOCK_N, BLOCK_H],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_H], TILE_DTYPE))
        tile_scales = gl.allocate_shared_memory(gl.float32, [TILES, N_TILES, BLOCK_N], plain_smem)
        sc = smem_view(tile_scales, gl.float32, [TILES * N_TILES, BLOCK_N], vec_smem)
        q_exp = gl.allocate_shared_memory(gl.float32, [BLOCK_H], vec_smem)
        full = gl.allocate_shared_memory(gl.int64, [TILES, 1], mbarrier.MBarrierLayout())
        # empty: one barrier a tile and 128-column chunk (each chunk its own buffer, as the chunks).
        e0, e1, e2, e3 = _four_buffers(True, gl.int64, [TILES, 1], mbarrier.MBarrierLayout())
        for b in gl.static_range(TILES):
            mbarrier.init(full.index(b), count=1)
        for b in gl.static_range(TILES * 4):
            mbarrier.init(_chunk(b // TILES, e0, e1, e2, e3).index(b % TILES), count=1)

        t, hb, sp, n_lo, n_hi = _split_coords(H, TOPK, SPLITS, BLOCK_N)
        _stage_rows_and_q(Q, IDX, q_lat, q_rope, rows_2d, t, hb, n_lo, n_hi, stride_qt, stride_qh, stride_it, S_KV, H, BLOCK_N, NB_P, _NW,
                          not F16)
        if F16:
            _stage_q_f16(Q, q_lat, q_rope, q_exp, t, hb, stride_qt, stride_qh, H)
        fence_async_shared()
        partition_barrier()
        gl.warp_specialize(
            [
                (_mma_partition, (q_lat, q_rope, q_exp, k0, k1, k2, k3, rope_tiles, sc, p0, p1, p2, p3, block_rows, full, e0, e1, e2, e3,
                                  OUT, LSE, PARTIAL,
                                  stride_ot, stride_oh, stride_lt, TOPK, H, T, sm_scale_log2, BLOCK_N, SPLITS, TILES, N_TILES, F16)),
                (_dequantizing_partition, (lat_ring, rope_ring, scale_ring, scale_slots, k0, k1, k2, k3, rope_tiles, tile_scales, half_rows, full, e0, e1, e2, e3,
                                           KV, KV_SCALE, KV_ROPE, stride_kvs, stride_ss, stride_rs, TOPK, H,
                                           N_TILES, BLOCK_N, STAGES, SPLITS, TILES, L2_AHEAD, F16, DQ_WARPS)),
            ],
            [DQ_WARPS],
            [DEQUANT_REGS],
        )
