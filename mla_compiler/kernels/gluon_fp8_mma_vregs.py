"""Sparse MLA forward with e4m3 products and no transposed copy of the keys (Hopper, Gluon): the
same arithmetic as gluon_fp8_mma (its reference, ``reference_fp8_mma``, holds for both), with P V
computed as O^T = V^T P'^T.

Why: e4m3 warpgroup MMAs take shared-memory operands K-major only. For O = P' V the keys are
the K dimension of V, so gluon_fp8_mma writes a transposed copy of every block (a fourth
partition, and the busiest unit, shared memory, moves each block's rows three more times). In
O^T = V^T P'^T the value columns are M and V^T is the A operand, which may come from registers:
each consumer thread reads its key rows with 4-byte loads (4 value columns of one key) and the
bytes are regrouped in registers into A's fragments (4 keys of one value column). P' is B, and
the [heads, keys] tile the consumers already write for each other is K-major as it stands.

Which value column an accumulator row holds: a thread's A rows in the four 64-row products of
a warpgroup are the same four rows r, so row r of product q holds value column 4 r + q, and the
four are one 4-byte word of a key row. The output store undoes the mapping (regrouped in
registers, then stored 16 bytes a thread along each head's row).

Schedule: one program per (query token, 64 heads), three warpgroups, steps of 128 keys
(STEP_KEYS=128, ``_consumer_vregs_pairs``). Each consumer first quantizes 32 of Q's rows. A
producer copies Q's rope rows with the first block, then each 64-key block (raw e4m3 rows, rope
rows, scales) into one of four ring slots, a step's two blocks together, and writes log2 sigma
once each lands. Consumer WG computes the scores of all of the step's block WG (64-key
products; the rope product accumulates onto the scaled latent scores, one accumulator), the two
exchange row maxima and their P' (as gluon_fp8_mma), read their 256 value columns of both blocks
into registers, 32 keys at a time, release both slots once the last V is read, and add V^T P'^T,
their own block first. With STEP_KEYS=64 (``_consumer_vregs``) a step is one block, each
consumer scoring 32 of its keys, and a slot is released after P V.

Status: ``make_backend(fp8_products=True)`` and MLA_COMPILER_FP8_MMA=1 dispatched to it until
gluon_fp8_mma_split (scores and values in separate warpgroups, 0.1177 against this kernel's 0.1193
ms in one call); ``forward`` here calls it directly. On H200 at the V3.2 decode shape (128 heads,
top-k 2048) it runs 0.119 ms against 0.179 for bf16 keys (RESULTS.md). What
carries it (probe_fp8_mma.py --vregs and A/B runs against the previous commit, H200):
- V's bytes regrouped into A fragments by a 4 x 4 byte transpose in 8 permutes, pairs first
  (``_transposed_words``, inline PTX; the compiler gathered each word from its four sources in 3,
  192 permutes a step instead of 128), and the lazy softmax without a validity mask (invalid keys'
  rows are zero-filled and their sigma is 0, so log2 sigma alone makes their t -inf): 950 -> 831
  SASS instructions a consumer step, 0.1236 -> 0.1186 ms, the same output bits.
- The accumulator rescaled only where a warp's P' reference moved (LAZY_RESCALE=1,
  ``_lazy_softmax``): P' = 2^(score + log2 sigma - k), k moved only where P' would pass 2^8 and
  then to LAZY_LOW (1) binades below the block's largest (gluon_fp8_mma.lazy_reference), so on most steps no
  row's k moves and the 128 multiplies a thread are skipped: 0.1309 -> 0.1247 ms. Its error
  against the exact FP8 arithmetic is the eager form's (5.9e-2 against 5.8e-2 at the decode
  shape); against its own emulation, P' rounds at other places where the tensor cores' error on
  large scores moves a whole row (2.8e-2 on extreme scales, 1.5e-2 or less otherwise).
- The softmax in fewer operations an element (FUSED_SOFTMAX=1, ``_fused_softmax``): the scores'
  scale and log2 sigma in one fused multiply-add, P' in one exp2, the softmax sums from P' / sigma
  (1 / sigma written by the producer beside log2 sigma): 0.1338 -> 0.1300 ms.
- The output regrouped to [heads, columns] before it is stored (``_store_transposed``): from O^T's
  accumulator layout every store was 2 bytes in its own 32-byte sector, 256 a thread; now 16 a
  thread of 16 bytes, a warp a head's row (0.1531 -> 0.1384 ms).
- Q quantized by the consumers, 32 rows each, every load issued before any is used
  (``_quantize_q_rows``; before, the four default warps read Q in several dependent trips before the
  partitions started), and its rope rows copied by the producer with the first block
  (Q_IN_CONSUMERS=1): 0.1388 -> 0.1354 ms.
- 128-key steps: half the exchanges, barriers and accumulator rescales a key, and each score
  product reads Q once for 64 keys instead of 32. With the producer handing a block over only
  after copying the next, as for 64-key steps, a step's second block waited for the step before
  to release its slots (0.1749 against 0.1748); with a step's blocks copied together 0.1652-0.1659.
- Q's shared-memory descriptors computed in the loop (``_unhoisted``): hoisted out of it, the 16
  Q descriptors of the score products held register pairs that the second consumer spilled and
  reloaded every step (0.1653 -> 0.1565).
- Both slots released once their V is in registers (RELEASE_EARLY=1), before the last P V:
  0.1529-0.1531 against 0.1552-0.1565.
- With 64-key steps: the products' key order (KEY_ORDER=1; in slot order two key rows of a V load
  share banks: 0.189-0.192 against 0.181-0.183) and V read after the score products' wait
  (V_AFTER_WAIT=1; read while they run, the loads queue behind the products' own shared-memory
  reads: 0.1815-0.1831 against 0.1746). With 128-key steps either setting measures within 1 %
  of the other (KEY_ORDER=0 0.1552, V_AFTER_WAIT=0 0.1537, against 0.1531).

Measured slower with 128-key steps and not kept: the rope product in a second accumulator,
issued with the latent one (0.1549 against 0.1531); the producer reading a block's indices two
blocks ahead instead of one (0.1696 against 0.1565: it spills at 56 registers); consumers at 232
registers and the producer at 40 (0.2108, before the Q descriptors were unhoisted). Not timed:
the next step's latent product issued before this step's softmax, its accumulator carried over
the loop's back edge; ptxas then serializes every warpgroup MMA (C7511, too few registers for
the wgmma pipeline) and injects waits (C7517).

Measured and not kept (ab_previous.py, H200): Q's row scale folded into the softmax's multiply-add
(the consumers writing Q's rope rows divided by the power-of-two scale, so the latent scores need
the keys' scales alone: 32 multiplies a step fewer, 831 -> 799 SASS instructions, the same bits):
0.1189 against 0.1189 without, at the cost of a least Q scale (2^-64) to keep rope / qs finite.
Against the same kernel before the lazy softmax, where it times 0.1347-0.1351:
a persistent grid, one program an SM taking work items in turn, its ring and barrier phases
running on across items so the producer copies an item's first blocks under the item before
(0.1344; with the producer also asking L2 for the next item's Q rows, 0.1347): a program's fixed
cost (0.021 ms of 0.135 by probe_fixed_cost.py's fit over top-k) is the consumers' own, waiting on
Q's loads at the start; Q's rope rows loaded by the consumers with the latent rows instead of
copied by the producer (0.1353); consumers at 216 registers and the producer at 72 (0.1429), or
232 and 40 (0.1825: the producer spills). Carrying the next item's Q rows in registers from the
item before spilled 1160 bytes (ptxas, sm_90; not timed).

A "seesaw" schedule, after FlashMLA's dense decode, measured slower and not kept (ab_previous.py
--scale v3.2 against 15c909e; 0.1273 against 0.1200 ms, raw
benchmarks/results_ab_seesaw_h200_2026-11-29.json). In it no maxima are exchanged. Each warpgroup
takes its own block's softmax under a reference that moves a block at a time and is handed over
with that block's P' (reference_fp8_mma(block_n=64, lazy=True); it matched on the awkward, extreme
and zero-scale inputs). Warpgroup 1 then takes its softmax while warpgroup 0 runs its first block's
P V. But block A's reference feeds B's, so the two softmaxes of a step run one after the other:
warpgroup 0 waits for B's P' before its last products. The next step's scores depend on that wait.
In the exchanged schedule the two softmaxes run at once.

One hand-over a step instead of two, measured slower and not kept (ab_previous.py --scale v3.2
against the same kernel, a separate call; 0.1349 against 0.1198 ms, and 0.1313 with V read after
the softmax; raw benchmarks/results_ab_one_exchange_h200_2026-11-29.json; the same output bits
as the default launch on the decode inputs, results_one_exchange_same_bits_h200_2026-11-29.log).
Each warpgroup took P' under the current reference before any exchange, wrote it with its rows'
largest t, and handed both over at once. Only where the exchanged maxima moved the reference (any row of the tile) did it take P'
again and hand it over a second time. Writing P' before the exchange needed a third barrier: the
other warpgroup's products of the step before read the same tiles, and there is no room for a
second set (5.5 KB of shared memory free, 8 KB needed). The warpgroup-wide test for a move is a
reduction across warps. Keeping t live across the hand-over for the retake made ptxas spill
(36 bytes; 224 with P' live as well).

Measured slower and not kept (probe_fp8_mma.py --vregs, 64-key steps, against 0.175-0.184 in the
same calls):
- the next block's score products issued before this block's softmax (0.215; the consumers spill
  at 224 registers, and at 240 with a 24-register producer 0.329);
- the same issued after this block's P' (0.213: then nothing overlaps);
- a lazy rescale (0.187): the running maximum kept while within 2^8, P's exponent while within
  three binades, the accumulator's rescale skipped where every factor is 1;
- the slot released before P V, a barrier more (0.180 against 0.175), or at the next block's
  maxima exchange, a barrier fewer (0.179);
- the other half's V read before this half's P V is issued (0.179);
- each warpgroup 32 heads over all keys and value columns, nothing exchanged (S^T = K Q^T, 0.248):
  every warpgroup regroups all of V, and its P V products are 32 heads wide.

P V left in flight behind the next block's score products made ptxas serialize the warpgroup
MMAs (its C7513 warning: the zeroed score accumulator is written while P V runs). Both
consumers' chains (score products, softmax, two exchanges, P V) stay serial per block.
Overlapping them needs registers, and the 128 accumulator registers a thread leave no room for
them.
"""

from __future__ import annotations

from typing import Optional


from .gluon_common import HAVE_GLUON
from .gluon_fp8_mma import LAZY_LOW, SHARED_LIMIT, compile_products_kernel, run_products_kernel
from .gluon_sparse_mla import REG_BUDGET, check_register_settings

if HAVE_GLUON:
    from .gluon_common import (
        BLOCK_H,
        D_LAT,
        D_ROPE,
        V_HALF,
        _program_coords,
        _swap_with_other,
        _unhoisted,
        async_copy,
        fence_async_shared,
        gl,
        gluon,
        mbarrier,
        partition_barrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from .gluon_consumers import _store_lse, _sum_halves
    from .gluon_fp8_mma import (
        HEADROOM_LOG2,
        RAW_COPY_LAYOUT,
        ROPE_COPY_LAYOUT,
        _exchanged_maxima,
        _exchanged_softmax,
        _exp2_int,
        _floored_sigma,
        _half_scores,
        _issue_next,
        _issue_scores,
        _masked_maxima,
        _quantize_q,
        _quantize_q_rows,
        _copy_q_rope,
    )
    from .gluon_producers import _block_indices

# STAGES ring slots of BLOCK_N=64 keys (raw rows, rope rows, scales), held until both consumers'
# P V is done. STEP_KEYS=128: each consumer step takes two blocks, one a warpgroup's scores
# (``_consumer_vregs_pairs``), and the producer copies a step's two blocks together; 64: a block a
# step, its two halves' scores one a warpgroup (``_consumer_vregs``), the producer copying AHEAD
# blocks ahead of the one it hands over. KEY_ORDER=1 reads V without bank conflicts
# (V_LOAD_LAYOUT_SPREAD). V_AFTER_WAIT=1: a consumer reads its first V chunk once its score
# products are done (0: while they run, or with STEP_KEYS=128 after the softmax).
# RELEASE_EARLY=1 (STEP_KEYS=128): a step's slots released once their V is in registers, before
# the last P V product (0: after it).
# Q_IN_CONSUMERS=1: each consumer quantizes half of Q's rows in its partition, so the producer's
# first copies overlap it (0: the four default warps quantize all of Q before the partitions start).
# FUSED_SOFTMAX=1 (STEP_KEYS=128): P' taken in one exp2 of score + log2 sigma, the softmax sums
# from P' / sigma (``_fused_softmax``); 0: P, then P' = P sigma 2^(8 - e).
# LAZY_RESCALE=1 (FUSED_SOFTMAX=1): P' = 2^(score + log2 sigma - k), k moved only where P' would pass
# 2^8 (gluon_fp8_mma.lazy_reference), and the accumulator rescaled only where a warp's k moved;
# reference_fp8_mma(lazy=True) has its arithmetic (0: P' under the running maximum and the step's
# exponent, the accumulator rescaled every step).
LAUNCH = dict(CONSUMER_REGS=224, PRODUCER_REGS=56, STAGES=4, AHEAD=1, KEY_ORDER=1, V_AFTER_WAIT=1, STEP_KEYS=128, RELEASE_EARLY=1,
              Q_IN_CONSUMERS=1, FUSED_SOFTMAX=1, LAZY_RESCALE=1)

# Four words in ($4 .. $7) -> four words out ($0 .. $3), out q = byte q of each input, in input
# order: the pairs (a, b) and (c, d) interleaved by bytes, then the interleaved halves joined.
BYTE_TRANSPOSE_PTX = """{
            .reg .b32 ab_lo, ab_hi, cd_lo, cd_hi;
            prmt.b32 ab_lo, $4, $5, 0x5140;
            prmt.b32 ab_hi, $4, $5, 0x7362;
            prmt.b32 cd_lo, $6, $7, 0x5140;
            prmt.b32 cd_hi, $6, $7, 0x7362;
            prmt.b32 $0, ab_lo, cd_lo, 0x5410;
            prmt.b32 $1, ab_lo, cd_lo, 0x7632;
            prmt.b32 $2, ab_hi, cd_hi, 0x5410;
            prmt.b32 $3, ab_hi, cd_hi, 0x7632;
            }"""

if HAVE_GLUON:
    LAZY_LOW_C = gl.constexpr(LAZY_LOW)
    BYTE_TRANSPOSE_PTX_C = gl.constexpr(BYTE_TRANSPOSE_PTX)

    # A [32 keys, 256 value columns] half block as the consumer reads it: 4 value columns (one
    # 4-byte word) x 4 keys a thread per load group. After regrouping (``_v_operand``) it is
    # exactly the A operand fragment of the [256, 32] product with row 64 q + r = column 4 r + q.
    # Its loads meet two key rows in the same banks (rows 8 apart share the 128-byte swizzle's phase).
    V_LOAD_LAYOUT = gl.constexpr(gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [0, 32], [16, 0]],
        lane_bases=[[4, 0], [8, 0], [0, 4], [0, 8], [0, 16]],
        warp_bases=[[0, 64], [0, 128]], block_bases=[], shape=[32, 256]))
    # KEY_ORDER=1: the same with the product's key order k -> key (bits 1, 2, 4, 8, 16 -> 1, 8, 2, 4,
    # 16), so a load's four lane rows are 2 apart, in four swizzle phases: no bank conflicts. P' is
    # stored in the same key order (``_key_ordered``).
    V_LOAD_LAYOUT_SPREAD = gl.constexpr(gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [1, 0], [8, 0], [0, 32], [16, 0]],
        lane_bases=[[2, 0], [4, 0], [0, 4], [0, 8], [0, 16]],
        warp_bases=[[0, 64], [0, 128]], block_bases=[], shape=[32, 256]))
    # The output's [64 heads, 256 value columns] half: 8 columns (16 bytes) a thread, a warp a row.
    OUT_STORE_LAYOUT = gl.constexpr(gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0]))

    @gluon.jit
    def _key_ordered(x, KEY_ORDER: gl.constexpr):
        """[rows, 32 keys] in the products' key order (KEY_ORDER=1: column k holds key 1, 8, 2, 4, 16
        for k's bits 1, 2, 4, 8, 16; 0: unchanged)."""
        if KEY_ORDER:
            rows: gl.constexpr = x.shape[0]
            x = gl.permute(gl.reshape(x, [rows, 2, 2, 2, 2, 2]), (0, 1, 3, 4, 2, 5))
            x = gl.reshape(x, [rows, 32])
        return x

    @gluon.jit
    def _v_operand(k_slot, WG: gl.constexpr, KEYS: gl.constexpr, HALF: gl.constexpr, a_layout: gl.constexpr,
                   KEY_ORDER: gl.constexpr):
        """V^T's A operand for this warpgroup's 256 value columns and the keys of half KEYS of
        the slot: [256 rows (64 q + r = column 4 r + q), HALF keys in the products' key order]."""
        keys = k_slot.slice(KEYS * HALF, HALF, dim=0).slice(WG * V_HALF, V_HALF, dim=1)
        if KEY_ORDER:
            return _spread_v_operand(keys.load(V_LOAD_LAYOUT_SPREAD), a_layout)
        x = keys.load(V_LOAD_LAYOUT)
        x = gl.permute(gl.reshape(x, [HALF, V_HALF // 4, 4]), (2, 1, 0))
        x = gl.reshape(x, [V_HALF, HALF])
        return gl.convert_layout(x, a_layout)

    @gluon.jit
    def _transposed_words(a, b, c, d):
        """Word q of the result holds byte q of a, b, c and d (in that byte order): a 4 x 4 byte
        transpose in 8 byte permutes, pairs first. Left to the compiler, each result word is
        gathered from its four sources in 3 permutes (192 a step instead of 128)."""
        return gl.inline_asm_elementwise(BYTE_TRANSPOSE_PTX_C, "=r,=r,=r,=r,r,r,r,r", [a, b, c, d], dtype=(gl.int8, gl.int8, gl.int8, gl.int8),
                                         is_pure=True, pack=4)

    @gluon.jit
    def _spread_v_operand(x, a_layout: gl.constexpr):
        """V^T's A operand from a [32 keys, 256 columns] half block read in V_LOAD_LAYOUT_SPREAD, in
        the products' key order (``_key_ordered``). A thread holds words of keys +0, +1, +8, +9
        (4 columns each) and each A register takes one column's bytes of those four keys, the
        products' keys 4 k .. 4 k + 3: the four words are transposed as bytes (``_transposed_words``)."""
        keys: gl.constexpr = x.shape[0]
        cols: gl.constexpr = x.shape[1]
        x = gl.reshape(x.to(gl.int8, bitcast=True), [keys // 16, 2, 2, 2, 2, cols])  # [k16, k8, k4, k2, k1, column]
        x = gl.permute(x, (0, 2, 3, 5, 1, 4))  # [k16, k4, k2, column, k8, k1]
        lo, hi = gl.split(x)  # k1
        a, c = gl.split(lo)  # k8
        b, d = gl.split(hi)
        o0, o1, o2, o3 = _transposed_words(a, b, c, d)
        # [k16, k4, k2, r, j1, j0, q0, q1]: word q of column group r holds key (j0 + 8 j1)'s column 4 r + q.
        z = gl.reshape(gl.join(gl.join(o0, o1), gl.join(o2, o3)), [keys // 16, 2, 2, cols // 4, 2, 2, 2, 2])
        z = gl.permute(z, (7, 6, 3, 0, 1, 2, 4, 5))  # [q1, q0, r, k16, k4, k2, j1, j0]
        z = gl.reshape(z, [cols, keys]).to(gl.float8e4nv, bitcast=True)
        return gl.convert_layout(z, a_layout)

    @gluon.jit
    def _consumer_q(Q, q8_smem, qs_smem, bar_q, t, hb, stride_qt, stride_qh, H, WG: gl.constexpr, Q_IN_CONSUMERS: gl.constexpr):
        """With Q_IN_CONSUMERS, this warpgroup's half of Q's latent rows quantized into shared memory,
        then both consumers' halves waited for (the producer copies the rope rows with the first
        block); else nothing (Q is in place before the partitions start)."""
        if Q_IN_CONSUMERS:
            _quantize_q_rows(Q, q8_smem, q8_smem, qs_smem, t, hb, stride_qt, stride_qh, H, WG * (BLOCK_H // 2), 1)
            fence_async_shared()
            partition_barrier()
            mbarrier.arrive(bar_q.index(0))
            mbarrier.wait(bar_q.index(0), 0)

    @gluon.jit
    def _producer_vregs(k8_ring, r_ring, ok_ring, sig_ring, lsig_ring, isig_ring, full, k_empty, KV, KV_SCALE, KV_ROPE, IDX, stride_kvs,
                        stride_ss, stride_rs, stride_it, S_KV, TOPK, H, Q, qr_smem, stride_qt, stride_qh, BLOCK_N: gl.constexpr,
                        STAGES: gl.constexpr, AHEAD: gl.constexpr, PAIRS: gl.constexpr, Q_ROPE: gl.constexpr):
        """Each block's raw rows, rope rows and scales copied into a slot AHEAD blocks before it is
        handed over; once landed, log2 sigma, then ``full``. PAIRS (consumer steps of two blocks):
        a step's two blocks are copied together, once both slots are free, and each handed over as
        it lands; the blocks are padded to whole steps (a padding block's keys are all invalid).
        Handing block j over only after copying block j + 1 would hold a step's second block until
        the step before had released its slots. Q_ROPE: Q's rope rows are copied with the first
        block (its ``full`` says they landed)."""
        row_layout: gl.constexpr = gl.SliceLayout(1, RAW_COPY_LAYOUT)
        sig_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        HANDS: gl.constexpr = 2 if PAIRS else 1  # blocks handed over at once
        LAG: gl.constexpr = 0 if PAIRS else AHEAD
        t, hb = _program_coords(H)
        stride_rs = gl.multiple_of(stride_rs, 8)
        stride_kvs = gl.multiple_of(stride_kvs, 16)
        idx_row = IDX + t * stride_it
        cols = gl.arange(0, 256, layout=gl.SliceLayout(0, RAW_COPY_LAYOUT))
        n_blocks = gl.cdiv(TOPK, BLOCK_N)
        if PAIRS:
            n_blocks = 2 * gl.cdiv(TOPK, 2 * BLOCK_N)
        if Q_ROPE:
            _copy_q_rope(Q, qr_smem, t, hb, stride_qt, stride_qh, H)
        idx = _block_indices(idx_row, 0, TOPK, BLOCK_N, row_layout)
        # One commit group a block, empty past the last one: wait_group(AHEAD) means block i landed.
        for j in range(n_blocks + LAG):
            idx = _issue_next(k8_ring, r_ring, ok_ring, sig_ring, k_empty, KV, KV_SCALE, KV_ROPE, idx, idx_row, j, n_blocks, stride_kvs,
                              stride_ss, stride_rs, cols, S_KV, TOPK, BLOCK_N, STAGES, row_layout, ROPE_COPY_LAYOUT, sig_layout)
            ready = j >= AHEAD
            if PAIRS:
                ready = j % 2 == 1
            if ready:
                for h in gl.static_range(HANDS):
                    i = j - LAG - (HANDS - 1) + h
                    async_copy.wait_group(HANDS - 1 - h if PAIRS else AHEAD)
                    partition_barrier()  # every producer thread's rows of block i have landed
                    slot = i % STAGES
                    sig = _floored_sigma(sig_ring.index(slot), ok_ring.index(slot), sig_layout)
                    lsig_ring.index(slot).store(gl.log2(sig))
                    isig_ring.index(slot).store(gl.where(sig > 0.0, 1.0 / sig, 0.0))  # 0 at invalid keys (sigma 0)
                    fence_async_shared()
                    partition_barrier()
                    mbarrier.arrive(full.index(slot))
        async_copy.wait_group(0)  # none left in flight at exit (Q's rope rows, where no block was copied)

    @gluon.jit
    def _consumer_vregs(Q, q8_smem, qr_smem, qs_smem, k8_ring, r_ring, ok_ring, sig_ring, lsig_ring, full, k_empty, xmax, wmax, p8_half,
                        lsum, bar_q, bar_x, bar_p, bar_l, OUT, LSE, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, TOPK, H,
                        sm_scale_log2, WG: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, KEY_ORDER: gl.constexpr,
                        V_AFTER_WAIT: gl.constexpr, Q_IN_CONSUMERS: gl.constexpr):
        """Scores of this warpgroup's half of each block's keys, the row maxima and P' halves
        exchanged with the other warpgroup (as gluon_fp8_mma), then O^T += V^T P'^T for this
        warpgroup's 256 value columns, V^T from registers."""
        t, hb = _program_coords(H)
        HALF: gl.constexpr = BLOCK_N // 2
        OTHER: gl.constexpr = 1 - WG
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF, 32])
        sr_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_H, 32])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        head_o: gl.constexpr = gl.SliceLayout(0, o_layout)

        _consumer_q(Q, q8_smem, qs_smem, bar_q, t, hb, stride_qt, stride_qh, H, WG, Q_IN_CONSUMERS)
        q_log2 = qs_smem.load(row_s) * sm_scale_log2
        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([BLOCK_H], gl.float32, row_s)
        e_prev = gl.zeros([BLOCK_H], gl.float32, row_s)  # acc holds the output / 2^(e_prev - 8)
        acc = gl.zeros([V_HALF, BLOCK_H], gl.float32, o_layout)  # O^T, rows as V_LOAD_LAYOUT maps them
        s_zero = gl.zeros([BLOCK_H, HALF], gl.float32, s_layout)
        sr_zero = gl.zeros([BLOCK_H, HALF], gl.float32, sr_layout)
        n_blocks = gl.cdiv(TOPK, BLOCK_N)
        for i in range(n_blocks):
            slot = i % STAGES
            k_slot = k8_ring.index(slot)
            s8, sr = _issue_scores(q8_smem, qr_smem, k8_ring, r_ring, full, i, s_zero, sr_zero, WG, HALF, STAGES, 0)
            if not V_AFTER_WAIT:
                v_mine = _v_operand(k_slot, WG, WG, HALF, a_layout, KEY_ORDER)  # read while the score products run
            s8, sr = warpgroup_mma_wait(0, deps=[s8, sr])
            if V_AFTER_WAIT:
                # Read once the score products, which read Q and the keys from shared memory, are
                # done: beside them the loads wait in the shared-memory queue (0.1815 -> 0.1746 ms).
                v_mine = _v_operand(k_slot, WG, WG, HALF, a_layout, KEY_ORDER)
            s, sig, m_mine, m_safe, w_mine = _half_scores(s8, sr, slot, sig_ring, ok_ring, lsig_ring, q_log2, sm_scale_log2, WG, HALF,
                                                          s_layout)
            # P' = P sigma 2^(8 - e) <= 256; acc carries 2^(e - 8).
            p, alpha, m_new, e = _exchanged_softmax(s, m_mine, m_safe, w_mine, m_i, e_prev, xmax, wmax, bar_x, i, WG, row_s)
            p8 = (p * sig[None, :] * _exp2_int(HEADROOM_LOG2 - e)[:, None]).to(gl.float8e4nv)
            l_i = l_i * alpha + gl.sum(p, 1)
            p8_half.index(WG).store(_key_ordered(p8, KEY_ORDER))
            fence_async_shared()
            partition_barrier()
            mbarrier.arrive(bar_p.index(WG))
            acc = acc * gl.convert_layout(alpha * _exp2_int(e_prev - e), head_o)[None, :]
            acc = warpgroup_mma(v_mine, p8_half.index(WG).permute((1, 0)), acc, is_async=True)
            v_other = _v_operand(k_slot, WG, OTHER, HALF, a_layout, KEY_ORDER)
            mbarrier.wait(bar_p.index(OTHER), i & 1)
            acc = warpgroup_mma(v_other, p8_half.index(OTHER).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=[acc])
            m_i = m_new
            e_prev = e
            # The slot's rows (read into registers and by the score products), rope rows and
            # scales are read; P V reads only P' (shared) and registers.
            partition_barrier()
            mbarrier.arrive(k_empty.index(slot))

        _finish_output(acc, m_i, l_i, e_prev, lsum, bar_l, OUT, LSE, t, hb, stride_ot, stride_oh, stride_lt, H, WG, row_s, o_layout)

    @gluon.jit
    def _block_scores(q8_smem, q8_res_smem, qr_smem, k_slot, r_slot, sig_slot, q_scale, s_zero, s_layout: gl.constexpr,
                      sr_layout: gl.constexpr, TERMS: gl.constexpr, RESIDUALS_FIRST: gl.constexpr):
        """A block's scores over all its keys (before sm_scale_log2) in one accumulator: the e4m3
        latent product (TERMS=2: plus that of Q's residual, under the same scale; RESIDUALS_FIRST=1
        issues the residual's first, see the split kernel's RESIDUALS_FIRST), scaled by Q's and the
        keys' scales, then the bf16 rope product added onto it. Two accumulators, both products at
        once, measured slower (0.1549 against 0.1531 ms)."""
        first = q8_smem
        second = q8_res_smem
        if TERMS == 2 and RESIDUALS_FIRST == 1:
            first = q8_res_smem
            second = q8_smem
        s8 = warpgroup_mma(first, k_slot.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        if TERMS == 2:
            s8 = warpgroup_mma(second, k_slot.permute((1, 0)), s8, is_async=True)
        s8 = warpgroup_mma_wait(0, deps=[s8])
        sig = sig_slot.load(gl.SliceLayout(0, s_layout))
        s = gl.convert_layout(s8 * (q_scale[:, None] * sig[None, :]), sr_layout)
        s = warpgroup_mma(qr_smem, r_slot.permute((1, 0)), s, is_async=True)
        s = warpgroup_mma_wait(0, deps=[s])
        return gl.convert_layout(s, s_layout)

    @gluon.jit
    def _fused_softmax(s, valid, lsig_keys, isig_keys, sm_scale_log2, m_i, e_prev, xmax, wmax, bar_x, i, WG: gl.constexpr,
                       s_layout: gl.constexpr):
        """A block's P' (e4m3) and softmax sum from its scores ``s`` (before sm_scale_log2), the
        arithmetic of ``_masked_maxima``, ``_exchanged_softmax`` and P' = P sigma 2^(8 - e) in fewer
        operations an element: t = s c + log2 sigma in one fused multiply-add, the maxima of s
        (times c: c > 0, so the same maxima) and of t, P' = 2^(t - (m + e - 8)) in one exp2, and
        the sum of P from P' / sigma (``isig_keys``, 0 at invalid keys) times 2^(e - 8). Also
        returns alpha, the new running maxima and e, as ``_exchanged_maxima``."""
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        s = gl.where(valid[None, :], s, float("-inf"))
        m_mine = gl.max(s, 1) * sm_scale_log2
        m_safe = gl.where(m_mine == float("-inf"), 0.0, m_mine)
        t = s * sm_scale_log2 + lsig_keys.load(col_s)[None, :]
        w_mine = gl.max(t, 1) - m_safe
        alpha, m_new, m_use, e = _exchanged_maxima(m_mine, m_safe, w_mine, m_i, e_prev, xmax, wmax, bar_x, i, WG, row_s)
        p8 = gl.exp2(t - (m_use + e - HEADROOM_LOG2)[:, None])
        l_step = gl.sum(p8 * isig_keys.load(col_s)[None, :], 1) * _exp2_int(e - HEADROOM_LOG2)
        return p8.to(gl.float8e4nv), l_step, alpha, m_new, e

    @gluon.jit
    def _lazy_softmax(s, lsig_keys, isig_keys, sm_scale_log2, k_ref, xmax, bar_x, i, WG: gl.constexpr, s_layout: gl.constexpr):
        """A block's P' (e4m3) and softmax sum under the lazy reference k (``lazy_reference``): t =
        s c + log2 sigma, the rows' largest t exchanged with the other warpgroup, k moved only
        where P' = 2^(t - k) would pass 2^8, the sum of P from P' / sigma. Returns P', the sum,
        the factor 2^(k - k') that rescales the sums before (1 where nothing moved), and k'.
        Invalid keys need no mask: their rows are zero-filled and their sigma is 0, so s is finite
        and log2 sigma makes t -inf."""
        OTHER: gl.constexpr = 1 - WG
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        t = s * sm_scale_log2 + lsig_keys.load(col_s)[None, :]
        w_mine = gl.max(t, 1)
        xmax.index(WG).store(w_mine)
        _swap_with_other(bar_x, i & 1, WG)
        w_row = gl.maximum(w_mine, xmax.index(OTHER).load(row_s))
        p8, factor, k_new = _lazy_p(t, w_row, k_ref)
        l_step = gl.sum(p8 * isig_keys.load(col_s)[None, :], 1)
        return p8.to(gl.float8e4nv), l_step, factor, k_new

    @gluon.jit
    def _lazy_p(t, w_row, k_ref):
        """P' = 2^(t - k') (fp32) of a block's t = s c + log2 sigma under the lazy reference
        (``lazy_reference``: k' = k unless P' would pass 2^8 at the rows' largest t ``w_row``),
        the factor 2^(k - k') that rescales the sums before (1 where there were none), and k'.
        The caller takes the softmax sum of P as that of P' / sigma."""
        k_new = gl.where(w_row > k_ref + HEADROOM_LOG2, gl.ceil(w_row) - LAZY_LOW_C, k_ref)
        factor = gl.where(k_ref == float("-inf"), 1.0, gl.exp2(k_ref - k_new))
        p8 = gl.exp2(t - gl.where(k_new == float("-inf"), 0.0, k_new)[:, None])
        return p8, factor, k_new

    @gluon.jit
    def _key_chunks(p8, KEY_ORDER: gl.constexpr):
        """[64 heads, 64 keys] -> its two [64 heads, 32 keys] halves, each in the products' key order."""
        rows: gl.constexpr = p8.shape[0]
        lo, hi = gl.split(gl.permute(gl.reshape(p8, [rows, 2, p8.shape[1] // 2]), (0, 2, 1)))
        return _key_ordered(lo, KEY_ORDER), _key_ordered(hi, KEY_ORDER)

    @gluon.jit
    def _consumer_vregs_pairs(Q, q8_ring, qr_ring, qs_smem, k8_ring, r_ring, ok_ring, sig_ring, lsig_ring, isig_ring, full, k_empty, xmax,
                              wmax, p8_tiles, lsum, bar_q, bar_x, bar_p, bar_l, OUT, LSE, stride_qt, stride_qh, stride_ot, stride_oh,
                              stride_lt, TOPK, H, sm_scale_log2, WG: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                              KEY_ORDER: gl.constexpr, V_AFTER_WAIT: gl.constexpr, RELEASE_EARLY: gl.constexpr,
                              Q_IN_CONSUMERS: gl.constexpr, FUSED_SOFTMAX: gl.constexpr, LAZY_RESCALE: gl.constexpr):
        """Steps of two blocks: warpgroup WG computes the scores of all of block 2 s + WG's keys
        (64-key score products, half as many Q reads a key as 32), the row maxima and P' halves are
        exchanged once a step, then O^T += V^T P'^T for this warpgroup's 256 value columns over
        both blocks, 32 keys a product (P' in four [64 heads, 32 keys] tiles, 2 owner + chunk).
        V_AFTER_WAIT=1 reads this warpgroup's first V chunk before the softmax, 0 after it.
        RELEASE_EARLY=1 releases both slots once their V is in registers, before the last P V.
        FUSED_SOFTMAX=1 takes P' and the softmax sums as ``_fused_softmax`` does."""
        t, hb = _program_coords(H)
        CHUNK: gl.constexpr = BLOCK_N // 2
        OTHER: gl.constexpr = 1 - WG
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32])
        sr_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_H, 32])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        head_o: gl.constexpr = gl.SliceLayout(0, o_layout)

        _consumer_q(Q, q8_ring.index(0), qs_smem, bar_q, t, hb, stride_qt, stride_qh, H, WG, Q_IN_CONSUMERS)
        q_scale = qs_smem.load(row_s)
        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, row_s)  # LAZY_RESCALE: the reference k
        l_i = gl.zeros([BLOCK_H], gl.float32, row_s)
        # acc holds the output / 2^(e_prev - 8); with LAZY_RESCALE, P' carries no 2^(e - 8): e_prev stays 8.
        e_prev = gl.full([BLOCK_H], HEADROOM_LOG2 * LAZY_RESCALE, gl.float32, row_s)
        acc = gl.zeros([V_HALF, BLOCK_H], gl.float32, o_layout)  # O^T, rows as V_LOAD_LAYOUT maps them
        s_zero = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, s_layout)
        n_steps = gl.cdiv(TOPK, 2 * BLOCK_N)
        for i in range(n_steps):
            mine = 2 * i + WG
            theirs = 2 * i + OTHER
            pair = 2 * (i % (STAGES // 2))  # the slot of block 2 i (STAGES is even)
            slot = pair + WG
            k_mine = k8_ring.index(slot)
            k_theirs = k8_ring.index(pair + OTHER)
            mbarrier.wait(full.index(slot), (mine // STAGES) & 1)
            q_at = _unhoisted(i)
            s = _block_scores(q8_ring.index(q_at), q8_ring.index(q_at), qr_ring.index(q_at), k_mine, r_ring.index(slot),
                              sig_ring.index(slot), q_scale, s_zero, s_layout, sr_layout, 1, 0)
            if V_AFTER_WAIT:
                v_first = _v_operand(k_mine, WG, 0, CHUNK, a_layout, KEY_ORDER)
            if LAZY_RESCALE:
                p8, l_step, alpha, m_new = _lazy_softmax(s, lsig_ring.index(slot), isig_ring.index(slot), sm_scale_log2, m_i, xmax,
                                                         bar_x, i, WG, s_layout)
                e = e_prev
            elif FUSED_SOFTMAX:
                valid = ok_ring.index(slot).load(gl.SliceLayout(0, s_layout)) != 0
                p8, l_step, alpha, m_new, e = _fused_softmax(s, valid, lsig_ring.index(slot), isig_ring.index(slot), sm_scale_log2, m_i,
                                                             e_prev, xmax, wmax, bar_x, i, WG, s_layout)
            else:
                valid = ok_ring.index(slot).load(gl.SliceLayout(0, s_layout)) != 0
                s = s * sm_scale_log2
                s, m_mine, m_safe, w_mine = _masked_maxima(s, valid, lsig_ring.index(slot), s_layout)
                p, alpha, m_new, e = _exchanged_softmax(s, m_mine, m_safe, w_mine, m_i, e_prev, xmax, wmax, bar_x, i, WG, row_s)
                sig = sig_ring.index(slot).load(gl.SliceLayout(0, s_layout))
                p8 = (p * sig[None, :] * _exp2_int(HEADROOM_LOG2 - e)[:, None]).to(gl.float8e4nv)
                l_step = gl.sum(p, 1)
            l_i = l_i * alpha + l_step
            p8_lo, p8_hi = _key_chunks(p8, KEY_ORDER)
            p8_tiles.index(2 * WG).store(p8_lo)
            p8_tiles.index(2 * WG + 1).store(p8_hi)
            fence_async_shared()
            partition_barrier()
            mbarrier.arrive(bar_p.index(WG))
            if not V_AFTER_WAIT:
                v_first = _v_operand(k_mine, WG, 0, CHUNK, a_layout, KEY_ORDER)
            if LAZY_RESCALE:
                factor = gl.convert_layout(alpha, head_o)
                if gl.min(factor, 0) < 1.0:  # the warp's heads (all 64 in each warp) where k moved
                    acc = acc * factor[None, :]
            else:
                acc = acc * gl.convert_layout(alpha * _exp2_int(e_prev - e), head_o)[None, :]
            acc = warpgroup_mma(v_first, p8_tiles.index(2 * WG).permute((1, 0)), acc, is_async=True)
            v = _v_operand(k_mine, WG, 1, CHUNK, a_layout, KEY_ORDER)
            acc = warpgroup_mma(v, p8_tiles.index(2 * WG + 1).permute((1, 0)), acc, is_async=True)
            # The other block landed before the other warpgroup's scores (its P' says so); the
            # wait on its own barrier makes that explicit for this thread's loads.
            mbarrier.wait(full.index(pair + OTHER), (theirs // STAGES) & 1)
            v = _v_operand(k_theirs, WG, 0, CHUNK, a_layout, KEY_ORDER)
            mbarrier.wait(bar_p.index(OTHER), i & 1)
            acc = warpgroup_mma(v, p8_tiles.index(2 * OTHER).permute((1, 0)), acc, is_async=True)
            v = _v_operand(k_theirs, WG, 1, CHUNK, a_layout, KEY_ORDER)
            if RELEASE_EARLY:
                # Both slots' rows are in registers now (P V reads registers and P').
                partition_barrier()
                mbarrier.arrive(k_empty.index(pair))
                mbarrier.arrive(k_empty.index(pair + 1))
            acc = warpgroup_mma(v, p8_tiles.index(2 * OTHER + 1).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=[acc])
            m_i = m_new
            e_prev = e
            if not RELEASE_EARLY:
                partition_barrier()
                mbarrier.arrive(k_empty.index(pair))
                mbarrier.arrive(k_empty.index(pair + 1))

        _finish_output(acc, m_i, l_i, e_prev, lsum, bar_l, OUT, LSE, t, hb, stride_ot, stride_oh, stride_lt, H, WG, row_s, o_layout)

    @gluon.jit
    def _finish_output(acc, m_i, l_i, e_prev, lsum, bar_l, OUT, LSE, t, hb, stride_ot, stride_oh, stride_lt, H, WG: gl.constexpr,
                       row_s: gl.constexpr, o_layout: gl.constexpr):
        """This warpgroup's output columns (acc over both warpgroups' softmax sums, times the 2^(e - 8)
        it carries) and, from warpgroup 0, the LSE."""
        l_i = _sum_halves(l_i, lsum, bar_l, WG, row_s)
        empty_row = l_i == 0.0
        l_safe = gl.where(empty_row, 1.0, l_i)
        factor = gl.convert_layout(_exp2_int(e_prev - HEADROOM_LOG2) / l_safe, gl.SliceLayout(0, o_layout))
        _store_transposed(acc * factor[None, :], OUT, t, hb, stride_ot, stride_oh, H, WG)
        if WG == 0:
            _store_lse(m_i, l_safe, empty_row, LSE, t, hb, stride_lt, H, row_s)

    @gluon.jit
    def _store_transposed(acc, OUT, t, hb, stride_ot, stride_oh, H, WG: gl.constexpr):
        """O^T [256 rows, 64 heads] (row 64 q + r = value column 4 r + q) into out[t, heads, cols]:
        regrouped to [heads, columns] and stored 16 bytes a thread, a warp a head's 512-byte row
        (from the accumulator's layout every store is 2 bytes, each in its own 32-byte sector)."""
        x = gl.reshape(acc.to(gl.bfloat16), [4, V_HALF // 4, BLOCK_H])  # [q, r, head]
        x = gl.reshape(gl.permute(x, (2, 1, 0)), [BLOCK_H, V_HALF])  # [head, 4 r + q]
        x = gl.convert_layout(x, OUT_STORE_LAYOUT)
        heads = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, OUT_STORE_LAYOUT))
        cols = WG * V_HALF + gl.arange(0, V_HALF, layout=gl.SliceLayout(0, OUT_STORE_LAYOUT))
        o_ptr = OUT + t * stride_ot + heads[:, None] * stride_oh + cols[None, :]
        gl.store(o_ptr, x, mask=(heads < H)[:, None])

    @gluon.jit(do_not_specialize=["TOPK"])
    def _fp8_mma_vregs_kernel(
        Q, KV, KV_SCALE, KV_ROPE, IDX, OUT, LSE,
        stride_qt, stride_qh, stride_kvs, stride_ss, stride_rs, stride_it, stride_ot, stride_oh, stride_lt,
        S_KV, TOPK, H, sm_scale_log2,
        STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, AHEAD: gl.constexpr,
        KEY_ORDER: gl.constexpr, V_AFTER_WAIT: gl.constexpr, STEP_KEYS: gl.constexpr, RELEASE_EARLY: gl.constexpr,
        Q_IN_CONSUMERS: gl.constexpr, FUSED_SOFTMAX: gl.constexpr, LAZY_RESCALE: gl.constexpr,
    ):
        t, hb = _program_coords(H)
        BLOCK_N: gl.constexpr = 64
        HALF: gl.constexpr = BLOCK_N // 2
        vec: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        q8_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_LAT], gl.float8e4nv)
        qr_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_ROPE], gl.bfloat16)
        k8_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D_LAT], gl.float8e4nv)
        r_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D_ROPE], gl.bfloat16)
        p8_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, HALF], gl.float8e4nv)
        # Q as rings of one: the 128-key consumers index them with a value the compiler cannot
        # prove constant (``_unhoisted``).
        q8_ring = gl.allocate_shared_memory(gl.float8e4nv, [1, BLOCK_H, D_LAT], q8_layout)
        qr_ring = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_H, D_ROPE], qr_layout)
        q8_smem = q8_ring.index(0)
        qr_smem = qr_ring.index(0)
        qs_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_H], vec)
        k8_ring = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, D_LAT], k8_layout)
        r_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D_ROPE], r_layout)
        ok_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N], vec)
        sig_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_N], vec)
        lsig_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_N], vec)
        isig_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_N], vec)
        xmax = gl.allocate_shared_memory(gl.float32, [2, BLOCK_H], vec)
        wmax = gl.allocate_shared_memory(gl.float32, [2, BLOCK_H], vec)
        lsum = gl.allocate_shared_memory(gl.float32, [2, BLOCK_H], vec)
        BLOCKS_A_STEP: gl.constexpr = STEP_KEYS // BLOCK_N
        p8_half = gl.allocate_shared_memory(gl.float8e4nv, [2 * BLOCKS_A_STEP, BLOCK_H, HALF], p8_layout)
        full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        bar_x = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        bar_p = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        bar_l = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        bar_q = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        mbarrier.init(bar_q.index(0), count=2)
        for s in gl.static_range(STAGES):
            mbarrier.init(full.index(s), count=1)
            mbarrier.init(k_empty.index(s), count=2)
        for w in gl.static_range(2):
            mbarrier.init(bar_x.index(w), count=1)
            mbarrier.init(bar_p.index(w), count=1)
            mbarrier.init(bar_l.index(w), count=1)
        if not Q_IN_CONSUMERS:
            _quantize_q(Q, q8_smem, qr_smem, qs_smem, t, hb, stride_qt, stride_qh, H)
        fence_async_shared()
        partition_barrier()
        if BLOCKS_A_STEP == 2:
            gl.warp_specialize(
                [
                    (_consumer_vregs_pairs, (Q, q8_ring, qr_ring, qs_smem, k8_ring, r_ring, ok_ring, sig_ring, lsig_ring, isig_ring, full,
                                             k_empty,
                                             xmax, wmax, p8_half, lsum, bar_q, bar_x, bar_p, bar_l, OUT, LSE, stride_qt, stride_qh,
                                             stride_ot, stride_oh, stride_lt, TOPK, H, sm_scale_log2, 0, BLOCK_N, STAGES, KEY_ORDER,
                                             V_AFTER_WAIT, RELEASE_EARLY, Q_IN_CONSUMERS, FUSED_SOFTMAX, LAZY_RESCALE)),
                    (_consumer_vregs_pairs, (Q, q8_ring, qr_ring, qs_smem, k8_ring, r_ring, ok_ring, sig_ring, lsig_ring, isig_ring, full,
                                             k_empty,
                                             xmax, wmax, p8_half, lsum, bar_q, bar_x, bar_p, bar_l, OUT, LSE, stride_qt, stride_qh,
                                             stride_ot, stride_oh, stride_lt, TOPK, H, sm_scale_log2, 1, BLOCK_N, STAGES, KEY_ORDER,
                                             V_AFTER_WAIT, RELEASE_EARLY, Q_IN_CONSUMERS, FUSED_SOFTMAX, LAZY_RESCALE)),
                    (_producer_vregs, (k8_ring, r_ring, ok_ring, sig_ring, lsig_ring, isig_ring, full, k_empty, KV, KV_SCALE, KV_ROPE, IDX,
                                       stride_kvs,
                                       stride_ss, stride_rs, stride_it, S_KV, TOPK, H, Q, qr_smem, stride_qt, stride_qh, BLOCK_N, STAGES,
                                       AHEAD, True, Q_IN_CONSUMERS)),
                ],
                [4, 4],
                [CONSUMER_REGS, PRODUCER_REGS],
            )
        else:
            gl.warp_specialize(
                [
                    (_consumer_vregs, (Q, q8_smem, qr_smem, qs_smem, k8_ring, r_ring, ok_ring, sig_ring, lsig_ring, full, k_empty, xmax,
                                       wmax, p8_half, lsum, bar_q, bar_x, bar_p, bar_l, OUT, LSE, stride_qt, stride_qh, stride_ot,
                                       stride_oh, stride_lt, TOPK, H, sm_scale_log2, 0, BLOCK_N, STAGES, KEY_ORDER, V_AFTER_WAIT,
                                       Q_IN_CONSUMERS)),
                    (_consumer_vregs, (Q, q8_smem, qr_smem, qs_smem, k8_ring, r_ring, ok_ring, sig_ring, lsig_ring, full, k_empty, xmax,
                                       wmax, p8_half, lsum, bar_q, bar_x, bar_p, bar_l, OUT, LSE, stride_qt, stride_qh, stride_ot,
                                       stride_oh, stride_lt, TOPK, H, sm_scale_log2, 1, BLOCK_N, STAGES, KEY_ORDER, V_AFTER_WAIT,
                                       Q_IN_CONSUMERS)),
                    (_producer_vregs, (k8_ring, r_ring, ok_ring, sig_ring, lsig_ring, isig_ring, full, k_empty, KV, KV_SCALE, KV_ROPE, IDX,
                                       stride_kvs,
                                       stride_ss, stride_rs, stride_it, S_KV, TOPK, H, Q, qr_smem, stride_qt, stride_qh, BLOCK_N, STAGES,
                                       AHEAD, False, Q_IN_CONSUMERS)),
                ],
                [4, 4],
                [CONSUMER_REGS, PRODUCER_REGS],
            )


def check_launch(cfg: dict) -> None:
    """Raises ValueError naming the launch setting this kernel cannot run with."""
    unknown = set(cfg) - set(LAUNCH)
    if unknown:
        raise ValueError(f"launch: unknown setting(s) {sorted(unknown)}; the settings are {sorted(LAUNCH)}")
    check_register_settings(cfg)
    if 2 * cfg["CONSUMER_REGS"] + cfg["PRODUCER_REGS"] > REG_BUDGET:
        raise ValueError(f"launch CONSUMER_REGS={cfg['CONSUMER_REGS']} PRODUCER_REGS={cfg['PRODUCER_REGS']}: keep "
                         f"2 * CONSUMER_REGS + PRODUCER_REGS <= {REG_BUDGET} (168 registers a thread for 384 threads)")
    if cfg["STEP_KEYS"] not in (64, 128):
        raise ValueError(f"launch STEP_KEYS={cfg['STEP_KEYS']}: 64 (a block a consumer step) or 128 (two)")
    for flag in ("KEY_ORDER", "V_AFTER_WAIT", "RELEASE_EARLY", "Q_IN_CONSUMERS", "FUSED_SOFTMAX", "LAZY_RESCALE"):
        if cfg[flag] not in (0, 1):
            raise ValueError(f"launch {flag}={cfg[flag]}: 0 or 1")
    if not 1 <= cfg["AHEAD"] < cfg["STAGES"]:
        raise ValueError(f"launch AHEAD={cfg['AHEAD']} STAGES={cfg['STAGES']}: keep 1 <= AHEAD < STAGES (the slot of block "
                         "i + AHEAD frees once block i + AHEAD - STAGES is done)")
    for flag in ("RELEASE_EARLY", "FUSED_SOFTMAX", "LAZY_RESCALE"):
        if cfg[flag] and cfg["STEP_KEYS"] != 128:
            raise ValueError(f"launch {flag}=1 takes STEP_KEYS=128")
    if cfg["LAZY_RESCALE"] and not cfg["FUSED_SOFTMAX"]:
        raise ValueError("launch LAZY_RESCALE=1 takes FUSED_SOFTMAX=1 (its P' is taken as the fused softmax takes it)")
    if cfg["STEP_KEYS"] == 128 and cfg["STAGES"] % 2:
        raise ValueError(f"launch STAGES={cfg['STAGES']} STEP_KEYS=128: an even number of slots (a step takes a pair)")
    if cfg["STEP_KEYS"] == 128 and cfg["AHEAD"] != 1:
        raise ValueError(f"launch AHEAD={cfg['AHEAD']} STEP_KEYS=128: AHEAD=1 (a step's two blocks are copied together, once the "
                         "step STAGES / 2 before is done)")


def launch_settings(launch: Optional[dict] = None) -> dict:
    """LAUNCH with ``launch``'s settings; 64-key steps release their slot after P V and take P as
    P' = P sigma 2^(8 - e) unless told otherwise (RELEASE_EARLY, FUSED_SOFTMAX and LAZY_RESCALE are
    128-key step settings), and FUSED_SOFTMAX=0 rescales every step."""
    launch = launch or {}
    cfg = dict(LAUNCH, **launch)
    for flag in ("RELEASE_EARLY", "FUSED_SOFTMAX", "LAZY_RESCALE"):
        if cfg["STEP_KEYS"] == 64 and flag not in launch:
            cfg[flag] = 0
    if not cfg["FUSED_SOFTMAX"] and "LAZY_RESCALE" not in launch:
        cfg["LAZY_RESCALE"] = 0
    return cfg


def reference_settings(launch: Optional[dict] = None) -> dict:
    """The arguments of ``reference_fp8_mma`` that give this kernel's roundings under ``launch``:
    its keys a step (``block_n``: P's exponent or reference moves at most once a step) and
    whether P' is taken under the lazy reference (``lazy``)."""
    cfg = launch_settings(launch)
    return dict(block_n=cfg["STEP_KEYS"], lazy=bool(cfg["LAZY_RESCALE"]))


def _too_much_shared(cfg: dict, needed) -> str:
    return f"launch STAGES={cfg['STAGES']}: {needed} bytes of shared memory, over sm_90's {SHARED_LIMIT}; use fewer STAGES"


def compile_for_hopper(launch: Optional[dict] = None):
    """The kernel compiled for sm_90 on any machine (no GPU needed): shared memory, registers, PTX."""
    cfg = launch_settings(launch)
    check_launch(cfg)
    return compile_products_kernel(_fp8_mma_vregs_kernel, cfg, _too_much_shared)


def forward(q, kv_latent, kv_scale, kv_rope, indices, sm_scale: float, launch: Optional[dict] = None):
    """out [T, H, 512] and lse [T, H], the arithmetic of ``gluon_fp8_mma.reference_fp8_mma``: q
    [T, H, 576] bf16, kv_latent e4m3 [S, 512], kv_scale float32 [S, 1], kv_rope bf16 [S, 64],
    indices [T, 1, topk] int32."""
    cfg = launch_settings(launch)
    check_launch(cfg)
    kernel = _fp8_mma_vregs_kernel if HAVE_GLUON else None  # declined before it is needed without Gluon
    return run_products_kernel(kernel, q, kv_latent, kv_scale, kv_rope, indices, sm_scale, cfg, _too_much_shared)
