"""Sparse MLA forward with e4m3 products, the scores and the values in separate warpgroups
(Hopper, Gluon): the arithmetic of gluon_fp8_mma_vregs with 64-key blocks under the lazy
reference (``reference_fp8_mma(block_n=64, lazy=True)``), on another schedule.

Why: in gluon_fp8_mma_vregs both consumer warpgroups compute scores, exchange row maxima, take
P' and then run P V, in step with each other, so the tensor cores idle while both take their
softmax. Here one warpgroup takes every block's scores and P' (the softmax needs no exchange:
it sees all of a block's keys), and two take P V for 256 value columns each, a ring of P'
tiles between them. The value warpgroups' products of block b run while the scores warpgroup
takes block b + 1's products and softmax.

Partitions (four warpgroups, 512 threads): the two value warpgroups (the first is the default
partition) quantize 32 of Q's rows each, then for each block read their value columns of its
keys into registers (V^T as the A operand, as gluon_fp8_mma_vregs), release the slot, wait for
its P' and the factor 2^(k - k') of a moved reference, and add V^T P'^T. The scores warpgroup
waits for Q, then for each block: the e4m3 latent product and the bf16 rope product, t = s c +
log2 sigma, the reference k moved only where P' = 2^(t - k) would pass 2^8, P' into a ring
slot. The producer is gluon_fp8_mma_vregs's, a block at a time.

Status: the kernel ``make_backend(fp8_products=True)`` and MLA_COMPILER_FP8_MMA=1 dispatch to
(triton_sparse_mla); ``"two_term"`` and =2 to its RESIDUAL_LAUNCH (below). H200, V3.2 decode shape (128 heads, top-k 2048), CUDA graphs: 0.1177 ms
against 0.1193 for gluon_fp8_mma_vregs and 0.1792 for bf16 keys in bench_fp8_mma.py's call
(1.52x); 0.1152-0.1159 against 0.1192-0.1194 in probe_fp8_mma.py's calls
(benchmarks/results_probe_split_h200_2026-11-29.json). Its error against the emulation on 8
tokens is the vregs kernel's (4.43e-3 for both; the same file's "errors").

Two-term operands (RESIDUALS=1, ``RESIDUAL_LAUNCH``; ``make_backend(fp8_products="two_term")``
and MLA_COMPILER_FP8_MMA=2 dispatch to it): Q's latent and P' each go in as e4m3 plus their
e4m3 rounding residual under the same scale (``e4m3_terms``: a bf16 Q exactly but for values
under about 2^-10 of its row's largest, P' to about 2^-8 of itself down to 2^-2), one
accumulator each: the scores warpgroup chains Q_hi K^T and
Q_lo K^T, the value warpgroups add V^T P_hi'^T and V^T P_lo'^T with the same V^T registers.
Twice the e4m3 products, the same registers; Q_lo's 32 KB leave shared memory for three key
slots. RESIDUALS_FIRST=1 (the default) issues the residual terms' products first: the tensor
cores add each instruction's products and the incoming accumulator truncated to the largest
one's highest 14 bits (tensor_core_model), so residuals added onto a whole score lose what they
carry. With them first, H200 (fp8_products_accuracy.py): lse 0.81 -> 0.34 and 0.51 -> 0.16 from
exact FP8 on extreme scales (scores in the hundreds), out 8.5e-3 -> 3.0e-3; the model lands
within 0.02 of the kernel's lse in both orders, the fp32 emulation 0.51-0.81 away with the
residuals last and 0.16-0.34 with them first. Same time
(0.1610 ms both, probe_fp8_mma.py, 7 rounds). H200, V3.2 decode (bench_fp8_mma.py): 0.1625 ms,
1.10x bf16 keys and 1.21x the warp-specialized kernel's FP8 rows (the default FP8 path); error
against bf16 keys 5.886e-2 for the layout's 5.865e-2, 4.07e-3 against the exact FP8 reference
(7.19e-3 with the residuals last; one term: 8.45e-2 and 5.88e-2; fp8_error_sources.py's
emulation 2.9e-3 in fp32, 3.8e-3 under the model). The default FP8 path (f16 products) keeps
the lse within 1e-3 and out 1.6e-3 on the extreme inputs; the value accumulator, which runs
across all blocks, has no registers left for the fp32 partial sums that would avoid the
truncation. Timed alone, its consumers (PROBE=2) run 0.1481
ms and its producer (PROBE=1) 0.0771, together 0.1623: bound by the consumers. P_STAGES=1 ran
0.1599 / 0.1612 against 0.1627 / 0.1615 (same calls: no difference kept), STAGES=3 AHEAD=2
0.1827, STAGES=2 0.1828 (probe_fp8_mma.py; results_probe_two_term_h200_2026-11-29.json).
ptxas (sm_90, triton 3.6): one 4-byte value of the scores warpgroup spilled (a load a block);
SCORE_REGS=80 with PRODUCER_REGS=48 (and P_STAGES=1) ran 0.1635, against 0.1612 for
P_STAGES=1 alone in the same call.

Where its time goes (same files): timed alone, the producer's pace (PROBE=1) is 0.0751 ms and
the consumers' (PROBE=2, about: they then compute on stale slots, so the rescale branch and
the producer's log2 sigma work differ) 0.0977; together 0.1159. A fit over top-k puts the
difference in the cost a key (0.0472 against 0.0378 ms per 1024 keys), not in the fixed cost
(0.0229 against 0.0219). In Nsight Compute's profile the producer never waits for a free slot,
the scores warpgroup never for a free P' slot, all three consumers wait for blocks to land, and
the value warpgroups also wait for P' (results_profile_split_stalls_h200_2026-11-29.json). So
copies and products slow each other more than either waits for the other; through shared memory,
which both use, is the likely path (not measured: no shared-memory counters were taken).

Measured and not kept (probe_fp8_mma.py, H200, against the default in the same call):
- P_STAGES=3 (0.1197-0.1200 against 0.1153-0.1156 for 2 in the same calls; 1: 0.1158): the
  scores warpgroup running further ahead gains nothing;
- AHEAD=3 (0.1342) and STAGES=3 (0.1196 with AHEAD=1, 0.1358 with 2); AHEAD=1 0.1166;
- KEY_ORDER=0 (0.1336; in slot order V's loads meet twice the ideal shared wavefronts,
  test_gluon_fp8_mma_vregs's count);
- the value warpgroups holding one 32-key chunk of V at a time, the second read once the first
  product is done (VALUE_REGS=176, SCORE_REGS=104: 0.1205 against 0.1152), with the rope
  product in its own accumulator issued with the latent one (0.1199); at SCORE_REGS=72 the
  second accumulator serializes the products (ptxas C7512);
- reading the next block's V while this block's products run: 4 KB of spills at VALUE_REGS=192
  (ptxas -v on the sm_90 compile, triton 3.6; not timed); at 184 ptxas serializes the products
  (its C7512 note, same compile);
- a persistent grid (one program an SM taking items in turn, rings and phases running on
  across items, the producer copying an item's first blocks under the item before) with the
  scores warpgroup preparing each item's Q eight rows at a time (its registers hold two such
  chunks): 0.1268, and 0.1293 with a program an item, against 0.1195 for gluon_fp8_mma_vregs in
  the same call and 0.1152-0.1159 for this kernel with Q quantized by the value warpgroups (32
  rows each, one trip to memory) in the others. The value warpgroups cannot take the
  next item's Q under this one: their registers hold the accumulator.
"""

from __future__ import annotations

from typing import Optional


from .gluon_common import HAVE_GLUON
from .gluon_fp8_mma import SHARED_LIMIT, compile_products_kernel, run_products_kernel
from .gluon_sparse_mla import check_register_settings

if HAVE_GLUON:
    from .gluon_common import (
        BLOCK_H,
        D_LAT,
        D_ROPE,
        V_HALF,
        _program_coords,
        _unhoisted,
        fence_async_shared,
        gl,
        gluon,
        mbarrier,
        partition_barrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from .gluon_consumers import _store_lse
    from .gluon_fp8_mma import _quantize_q_rows
    from .gluon_fp8_mma_vregs import _block_scores, _key_chunks, _lazy_p, _producer_vregs, _store_transposed, _v_operand

# Registers a thread: the value warpgroups hold O^T's 128 accumulator registers and two 32-key
# chunks of V^T (at 184, ptxas serializes the products: C7512); the scores warpgroup fits in 72
# and the producer in 56 (48 spills); four warpgroups share 128 x 512. P_STAGES: P' tiles (and
# factors) in flight between the scores warpgroup and the value warpgroups. Reading the next
# block's V while this block's products run spills 4 KB (ptxas, sm_90) and is not offered.
# PROBE (timing only, the output is wrong): 1, the consumers only wait for each block and release
# it (the producer's pace); 2, the producer hands slots over without copying (the consumers').
# RESIDUALS=1: Q's latent and P' each as two e4m3 terms, the rounded value and its rounding
# residual (``e4m3_terms``), so the products carry bf16's Q and P' to about 2^-8: twice the e4m3
# products, the same registers, 32 KB more shared memory (RESIDUAL_LAUNCH fits it in three slots).
# RESIDUALS_FIRST=1: the residual terms' products before the rounded terms' in each accumulator,
# so the tensor cores' truncation meets them at their own size (0: after, for comparison).
LAUNCH = dict(VALUE_REGS=192, SCORE_REGS=72, PRODUCER_REGS=56, STAGES=4, AHEAD=2, P_STAGES=2, KEY_ORDER=1, PROBE=0, RESIDUALS=0,
              RESIDUALS_FIRST=1)
RESIDUAL_LAUNCH = dict(RESIDUALS=1, STAGES=3, AHEAD=1)
REG_BUDGET = 512  # 128 x 512 threads / 128: a thread-slot for each of the four partitions

if HAVE_GLUON:
    @gluon.jit
    def _scores_warpgroup(q8_ring, qr_ring, qs_smem, k8_ring, r_ring, sig_ring, lsig_ring, isig_ring, full, k_empty, p8_ring, fac_ring,
                          p_ready, p_free, bar_q, bar_fin, lfin, LSE, stride_lt, TOPK, H, sm_scale_log2, BLOCK_N: gl.constexpr,
                          STAGES: gl.constexpr, P_STAGES: gl.constexpr, KEY_ORDER: gl.constexpr, PROBE: gl.constexpr,
                          TERMS: gl.constexpr, RESIDUALS_FIRST: gl.constexpr):
        """Each block's scores over all its keys, P' under the lazy reference (``lazy_reference``)
        into the P' ring with the factor that rescales what came before; the softmax sums, and at
        the end the sums for the value warpgroups and the lse."""
        t, hb = _program_coords(H)
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32])
        sr_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        mbarrier.wait(bar_q.index(0), 0)  # Q's latent rows, quantized by the value warpgroups
        q_scale = qs_smem.load(row_s)
        k_ref = gl.full([BLOCK_H], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([BLOCK_H], gl.float32, row_s)
        s_zero = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, s_layout)
        n_blocks = gl.cdiv(TOPK, BLOCK_N)
        for b in range(n_blocks):
            slot = b % STAGES
            mbarrier.wait(full.index(slot), (b // STAGES) & 1)
            if PROBE == 1:
                partition_barrier()
                mbarrier.arrive(k_empty.index(slot))
            else:
                q_at = _unhoisted(b)
                s = _block_scores(q8_ring.index(q_at), q8_ring.index(q_at + (TERMS - 1)), qr_ring.index(q_at), k8_ring.index(slot),
                                  r_ring.index(slot), sig_ring.index(slot), q_scale, s_zero, s_layout, sr_layout, TERMS,
                                  RESIDUALS_FIRST)
                # Invalid keys need no mask: their rows are zero-filled and log2 sigma is -inf there.
                t_b = s * sm_scale_log2 + lsig_ring.index(slot).load(col_s)[None, :]
                isig = isig_ring.index(slot).load(col_s)
                partition_barrier()
                mbarrier.arrive(k_empty.index(slot))  # this warpgroup's reads of the slot are done
                p8, factor, k_ref = _lazy_p(t_b, gl.max(t_b, 1), k_ref)
                l_i = l_i * factor + gl.sum(p8 * isig[None, :], 1)
                e = b % P_STAGES
                p8_e4m3 = p8.to(gl.float8e4nv)
                p8_lo, p8_hi = _key_chunks(p8_e4m3, KEY_ORDER)
                mbarrier.wait(p_free.index(e), ((b // P_STAGES) & 1) ^ 1)
                p8_ring.index(2 * TERMS * e).store(p8_lo)
                p8_ring.index(2 * TERMS * e + 1).store(p8_hi)
                if TERMS == 2:  # P' - e4m3(P') in e4m3, under the same reference: the products add both
                    r8_lo, r8_hi = _key_chunks((p8 - p8_e4m3.to(gl.float32)).to(gl.float8e4nv), KEY_ORDER)
                    p8_ring.index(4 * e + 2).store(r8_lo)
                    p8_ring.index(4 * e + 3).store(r8_hi)
                fac_ring.index(e).store(factor)
                fence_async_shared()
                partition_barrier()
                mbarrier.arrive(p_ready.index(e))
        lfin.store(l_i)
        partition_barrier()
        mbarrier.arrive(bar_fin.index(0))
        empty_row = l_i == 0.0
        _store_lse(k_ref, gl.where(empty_row, 1.0, l_i), empty_row, LSE, t, hb, stride_lt, H, row_s)

    @gluon.jit
    def _value_warpgroup(Q, q8_ring, qs_smem, k8_ring, full, k_empty, p8_ring, fac_ring, p_ready, p_free, bar_q, bar_fin, lfin, OUT,
                         stride_qt, stride_qh, stride_ot, stride_oh, TOPK, H, WG: gl.constexpr, BLOCK_N: gl.constexpr,
                         STAGES: gl.constexpr, P_STAGES: gl.constexpr, KEY_ORDER: gl.constexpr, PROBE: gl.constexpr,
                         TERMS: gl.constexpr, RESIDUALS_FIRST: gl.constexpr):
        """Half of Q's latent rows quantized, then O^T += V^T P'^T for this warpgroup's 256 value
        columns, block after block, V^T from registers; at the end O / l stored."""
        t, hb = _program_coords(H)
        CHUNK: gl.constexpr = BLOCK_N // 2
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_H, 32])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        head_o: gl.constexpr = gl.SliceLayout(0, o_layout)
        _quantize_q_rows(Q, q8_ring.index(0), q8_ring.index(TERMS - 1), qs_smem, t, hb, stride_qt, stride_qh, H, WG * (BLOCK_H // 2),
                         TERMS)
        fence_async_shared()
        partition_barrier()
        mbarrier.arrive(bar_q.index(0))
        acc = gl.zeros([V_HALF, BLOCK_H], gl.float32, o_layout)  # O^T, rows as V_LOAD_LAYOUT maps them
        n_blocks = gl.cdiv(TOPK, BLOCK_N)
        for b in range(n_blocks):
            slot = b % STAGES
            e = b % P_STAGES
            k_slot = k8_ring.index(slot)
            mbarrier.wait(full.index(slot), (b // STAGES) & 1)
            if PROBE == 1:
                partition_barrier()
                mbarrier.arrive(k_empty.index(slot))
            else:
                v_lo = _v_operand(k_slot, WG, 0, CHUNK, a_layout, KEY_ORDER)
                v_hi = _v_operand(k_slot, WG, 1, CHUNK, a_layout, KEY_ORDER)
                partition_barrier()
                mbarrier.arrive(k_empty.index(slot))  # the slot's value columns are in registers
                mbarrier.wait(p_ready.index(e), (b // P_STAGES) & 1)
                factor = fac_ring.index(e).load(head_o)
                if gl.min(factor, 0) < 1.0:  # the reference moved for some head
                    acc = acc * factor[None, :]
                first = 2 * TERMS * e  # P's rounded terms (two 32-key tiles), then its residual terms'
                second = 4 * e + 2
                if TERMS == 2 and RESIDUALS_FIRST == 1:
                    first = 4 * e + 2
                    second = 4 * e
                acc = warpgroup_mma(v_lo, p8_ring.index(first).permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma(v_hi, p8_ring.index(first + 1).permute((1, 0)), acc, is_async=True)
                if TERMS == 2:  # the same V^T
                    acc = warpgroup_mma(v_lo, p8_ring.index(second).permute((1, 0)), acc, is_async=True)
                    acc = warpgroup_mma(v_hi, p8_ring.index(second + 1).permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=[acc])
                partition_barrier()
                mbarrier.arrive(p_free.index(e))
        mbarrier.wait(bar_fin.index(0), 0)
        l_i = lfin.load(head_o)
        _store_transposed(acc * (1.0 / gl.where(l_i == 0.0, 1.0, l_i))[None, :], OUT, t, hb, stride_ot, stride_oh, H, WG)

    @gluon.jit
    def _producer_probe(k8_ring, r_ring, ok_ring, sig_ring, lsig_ring, isig_ring, full, k_empty, KV, KV_SCALE, KV_ROPE, IDX, stride_kvs,
                        stride_ss, stride_rs, stride_it, S_KV, TOPK, H, Q, qr_smem, stride_qt, stride_qh, BLOCK_N: gl.constexpr,
                        STAGES: gl.constexpr, AHEAD: gl.constexpr, PAIRS: gl.constexpr, Q_ROPE: gl.constexpr):
        """PROBE=2: each slot handed over as soon as it is free, nothing copied (the consumers'
        pace alone; the output is wrong)."""
        for j in range(gl.cdiv(TOPK, BLOCK_N)):
            slot = j % STAGES
            mbarrier.wait(k_empty.index(slot), ((j // STAGES) & 1) ^ 1)
            mbarrier.arrive(full.index(slot))

    @gluon.jit(do_not_specialize=["TOPK"])
    def _fp8_mma_split_kernel(
        Q, KV, KV_SCALE, KV_ROPE, IDX, OUT, LSE,
        stride_qt, stride_qh, stride_kvs, stride_ss, stride_rs, stride_it, stride_ot, stride_oh, stride_lt,
        S_KV, TOPK, H, sm_scale_log2,
        VALUE_REGS: gl.constexpr, SCORE_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, STAGES: gl.constexpr, AHEAD: gl.constexpr,
        P_STAGES: gl.constexpr, KEY_ORDER: gl.constexpr, PROBE: gl.constexpr, RESIDUALS: gl.constexpr,
        RESIDUALS_FIRST: gl.constexpr,
    ):
        BLOCK_N: gl.constexpr = 64
        TERMS: gl.constexpr = 1 + RESIDUALS
        vec: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        q8_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_LAT], gl.float8e4nv)
        qr_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_ROPE], gl.bfloat16)
        k8_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D_LAT], gl.float8e4nv)
        r_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D_ROPE], gl.bfloat16)
        p8_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_N // 2], gl.float8e4nv)
        # Q as rings of one: the scores warpgroup indexes them with a value the compiler cannot
        # prove constant (``_unhoisted``), so its descriptors are not hoisted into registers.
        q8_ring = gl.allocate_shared_memory(gl.float8e4nv, [TERMS, BLOCK_H, D_LAT], q8_layout)
        qr_ring = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_H, D_ROPE], qr_layout)
        qs_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_H], vec)
        k8_ring = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, D_LAT], k8_layout)
        r_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D_ROPE], r_layout)
        ok_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N], vec)
        sig_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_N], vec)
        lsig_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_N], vec)
        isig_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_N], vec)
        p8_ring = gl.allocate_shared_memory(gl.float8e4nv, [2 * TERMS * P_STAGES, BLOCK_H, BLOCK_N // 2], p8_layout)
        fac_ring = gl.allocate_shared_memory(gl.float32, [P_STAGES, BLOCK_H], vec)
        lfin = gl.allocate_shared_memory(gl.float32, [BLOCK_H], vec)
        full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        p_ready = gl.allocate_shared_memory(gl.int64, [P_STAGES, 1], mbarrier.MBarrierLayout())
        p_free = gl.allocate_shared_memory(gl.int64, [P_STAGES, 1], mbarrier.MBarrierLayout())
        bar_q = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        bar_fin = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        mbarrier.init(bar_q.index(0), count=2)
        mbarrier.init(bar_fin.index(0), count=1)
        for s in gl.static_range(STAGES):
            mbarrier.init(full.index(s), count=1)
            mbarrier.init(k_empty.index(s), count=3)  # the scores warpgroup and both value warpgroups
        for s in gl.static_range(P_STAGES):
            mbarrier.init(p_ready.index(s), count=1)
            mbarrier.init(p_free.index(s), count=2)
        fence_async_shared()
        partition_barrier()
        gl.warp_specialize(
            [
                (_value_warpgroup, (Q, q8_ring, qs_smem, k8_ring, full, k_empty, p8_ring, fac_ring, p_ready, p_free, bar_q, bar_fin, lfin,
                                    OUT, stride_qt, stride_qh, stride_ot, stride_oh, TOPK, H, 0, BLOCK_N, STAGES, P_STAGES, KEY_ORDER,
                                    PROBE, TERMS, RESIDUALS_FIRST)),
                (_value_warpgroup, (Q, q8_ring, qs_smem, k8_ring, full, k_empty, p8_ring, fac_ring, p_ready, p_free, bar_q, bar_fin, lfin,
                                    OUT, stride_qt, stride_qh, stride_ot, stride_oh, TOPK, H, 1, BLOCK_N, STAGES, P_STAGES, KEY_ORDER,
                                    PROBE, TERMS, RESIDUALS_FIRST)),
                (_scores_warpgroup, (q8_ring, qr_ring, qs_smem, k8_ring, r_ring, sig_ring, lsig_ring, isig_ring, full, k_empty, p8_ring,
                                     fac_ring, p_ready, p_free, bar_q, bar_fin, lfin, LSE, stride_lt, TOPK, H, sm_scale_log2, BLOCK_N,
                                     STAGES, P_STAGES, KEY_ORDER, PROBE, TERMS, RESIDUALS_FIRST)),
                (_producer_vregs if PROBE != 2 else _producer_probe,
                 (k8_ring, r_ring, ok_ring, sig_ring, lsig_ring, isig_ring, full, k_empty, KV, KV_SCALE, KV_ROPE, IDX,
                  stride_kvs, stride_ss, stride_rs, stride_it, S_KV, TOPK, H, Q, qr_ring.index(0), stride_qt, stride_qh,
                  BLOCK_N, STAGES, AHEAD, False, True)),
            ],
            [4, 4, 4],
            [VALUE_REGS, SCORE_REGS, PRODUCER_REGS],
        )


def check_launch(cfg: dict) -> None:
    """Raises ValueError naming the launch setting this kernel cannot run with."""
    unknown = set(cfg) - set(LAUNCH)
    if unknown:
        raise ValueError(f"launch: unknown setting(s) {sorted(unknown)}; the settings are {sorted(LAUNCH)}")
    check_register_settings(cfg, ("VALUE_REGS", "SCORE_REGS", "PRODUCER_REGS"))
    regs = 2 * cfg["VALUE_REGS"] + cfg["SCORE_REGS"] + cfg["PRODUCER_REGS"]
    if regs > REG_BUDGET:
        raise ValueError(f"launch VALUE_REGS={cfg['VALUE_REGS']} SCORE_REGS={cfg['SCORE_REGS']} PRODUCER_REGS={cfg['PRODUCER_REGS']}: "
                         f"keep 2 * VALUE_REGS + SCORE_REGS + PRODUCER_REGS <= {REG_BUDGET} (128 registers a thread for 512 threads)")
    if not 1 <= cfg["AHEAD"] < cfg["STAGES"]:
        raise ValueError(f"launch AHEAD={cfg['AHEAD']} STAGES={cfg['STAGES']}: keep 1 <= AHEAD < STAGES (the slot of block "
                         "i + AHEAD frees once block i + AHEAD - STAGES is done)")
    if cfg["P_STAGES"] < 1:
        raise ValueError(f"launch P_STAGES={cfg['P_STAGES']}: at least 1 (2 lets the scores run a block ahead of the values)")
    if cfg["KEY_ORDER"] not in (0, 1):
        raise ValueError(f"launch KEY_ORDER={cfg['KEY_ORDER']}: 0 or 1")
    if cfg["RESIDUALS"] not in (0, 1):
        raise ValueError(f"launch RESIDUALS={cfg['RESIDUALS']}: 0, or 1 for two-term e4m3 operands (with fewer STAGES: RESIDUAL_LAUNCH)")
    if cfg["RESIDUALS_FIRST"] not in (0, 1):
        raise ValueError(f"launch RESIDUALS_FIRST={cfg['RESIDUALS_FIRST']}: 1 (the residual terms' products first), or 0 (last)")
    if cfg["PROBE"] not in (0, 1, 2):
        raise ValueError(f"launch PROBE={cfg['PROBE']}: 0, or 1 / 2 to time the producer / the consumers alone")


def launch_settings(launch: Optional[dict] = None) -> dict:
    """LAUNCH with ``launch``'s settings."""
    return dict(LAUNCH, **(launch or {}))


def reference_settings(launch: Optional[dict] = None) -> dict:
    """The arguments of ``reference_fp8_mma`` that give this kernel's roundings: the lazy
    reference, moved at most once a 64-key block, each e4m3 operand's terms and their order."""
    cfg = launch_settings(launch)
    return dict(block_n=64, lazy=True, terms=1 + cfg["RESIDUALS"], residuals_first=bool(cfg["RESIDUALS"] and cfg["RESIDUALS_FIRST"]))


def _too_much_shared(cfg: dict, needed) -> str:
    fits = " (RESIDUALS=1 fits with RESIDUAL_LAUNCH's STAGES=3, AHEAD=1)" if cfg["RESIDUALS"] else ""
    return (f"launch STAGES={cfg['STAGES']} P_STAGES={cfg['P_STAGES']} RESIDUALS={cfg['RESIDUALS']}: {needed} bytes of shared "
            f"memory, over sm_90's {SHARED_LIMIT}; use fewer STAGES or P_STAGES{fits}")


def compile_for_hopper(launch: Optional[dict] = None):
    """The kernel compiled for sm_90 on any machine (no GPU needed): shared memory, registers, PTX."""
    cfg = launch_settings(launch)
    check_launch(cfg)
    return compile_products_kernel(_fp8_mma_split_kernel, cfg, _too_much_shared)


def forward(q, kv_latent, kv_scale, kv_rope, indices, sm_scale: float, launch: Optional[dict] = None):
    """out [T, H, 512] and lse [T, H], the arithmetic of ``gluon_fp8_mma.reference_fp8_mma`` under
    ``reference_settings(launch)`` (64-key blocks, the lazy reference, ``terms``): q [T, H, 576] bf16, kv_latent e4m3 [S, 512], kv_scale float32 [S, 1], kv_rope bf16
    [S, 64], indices [T, 1, topk] int32."""
    cfg = launch_settings(launch)
    check_launch(cfg)
    kernel = _fp8_mma_split_kernel if HAVE_GLUON else None  # declined before it is needed without Gluon
    return run_products_kernel(kernel, q, kv_latent, kv_scale, kv_rope, indices, sm_scale, cfg, _too_much_shared)
