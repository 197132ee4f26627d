"""Sparse MLA forward with FP8 tensor-core products (Hopper, Gluon): Q K^T over the latent and P V
run as e4m3 warpgroup MMAs, for an e4m3 latent with one scale a key row. The rope product stays
bf16. Reference: ``reference_fp8_mma`` below (the same roundings), and fp8_reference.py (exact).

Why: at 128 heads and two query tokens a decode step is compute-bound (256 query rows a key).
With bf16 MMAs an FP8 cache at best matches bf16 keys there (RESULTS.md); e4m3 MMAs run at twice
the rate. The price is two roundings the dequantizing kernels do not make:
- Q's latent part is rounded to e4m3 with one power-of-two scale a (token, head) row;
- P is rounded to e4m3 after it takes the key rows' scales: P' = P * sigma_j * 2^(8 - e) <= 256,
  where e is per row and block: the least integer with P_j sigma_j <= 2^e over the block's keys
  (from max_j score_j + log2 sigma_j, exchanged with the row maxima), so each row's largest P'
  lies in (128, 256] for key scales within 2^-60 .. 2^60 of the row's (e is clamped to +-60 so
  the accumulator's rescale stays a normal float); the value accumulator carries 2^(e-8).
The softmax sum uses P in fp32. (SnapMLA, arXiv 2602.10718, folds the per-token scale into P the
same way, without a per-row exponent.)

Status: ``forward`` here calls it directly; the FP8 forward's opt-in (``make_backend(fp8_products=True)``
or ``"two_term"``, MLA_COMPILER_FP8_MMA=1 or 2) takes gluon_fp8_mma_split: the same products without the transposed
copy (P V as V^T P'^T, V^T from registers), P' under the lazy reference
(``reference_fp8_mma(block_n=64, lazy=True)``); gluon_fp8_mma_vregs is the form before it. 0.1177
against 0.1833 ms for this kernel (H200, V3.2 decode, bench_fp8_mma.py, 2026-11-29). This module
keeps the arithmetic's reference and the checks and host code the three kernels share. On
H200 at the V3.2 decode shape it first ran 0.184 ms against 0.221 for the dequantizing kernel (row
scale) and 0.201 for bf16 keys (2026-11-28); without the transposes it would have run about 0.157
(benchmarks/probe_fp8_mma.py, RESULTS.md).

Schedule (as gluon_sparse_mla's split scores): one program per (query token, 64 heads), four
warpgroups. A copier partition gathers each 64-key block into a ring slot as soon as the slot
frees (the raw e4m3 rows by asynchronous copies: Q K^T's B operand as they land; their landing
tracked by an mbarrier, so it never waits on a copy); a transposer partition, once the block has
landed and a transposed tile is free, writes the block's transposed copy, keys contiguous, which
e4m3 P V needs (wgmma takes 8-bit B operands K-major only). Two consumer warpgroups each compute
the scores of half the keys, exchange row maxima and their P' halves, and add P' V for their 256
value columns, starting on their own half before the other's arrives. A slot's raw rows are
released after the scores and its transposed tiles after P V. With one producer partition doing
both jobs (COPIER=0, three warpgroups) a block's transposes queued behind the next block's copy
issue, which waits on the consumers' scores: 0.196 ms; the split took it to 0.187, the consumers'
own half first to 0.184. Four warpgroups leave ptxas 128 registers a thread for the kernel, too
few for one product's 128 accumulator registers, so each consumer's value columns go in two
128-column accumulators. The other schedules LAUNCH selects measured slower at this shape
(probe_fp8_mma.py, H200, against 0.196 for COPIER=0): each warpgroup computing all of a block's
scores (SPLIT=0; twice the Q K^T products, no exchanges) 0.259 ms, the same with 32-key blocks in
six slots 0.290 (both spill at the default registers), three raw-row slots with one transposed
tile, two blocks copied ahead, 0.211 (0.218 with the copier). Issuing the next block's score
products right behind P V measured slower (0.2165 against 0.2107 ms, an earlier version), and so
did the two consumers alternating blocks (each the scores and softmax of every other block, its P'
handed over, its next scores issued while the other's softmax runs; the FlashAttention-3
ping-pong with the value columns split): 0.2575 ms with 32-key blocks in four slots, 0.208
without the transposes, 0.275 with 64-key blocks (spilling). Also measured slower and not kept
(against 0.184-0.186 in the same calls): the scores started before the transposes (0.188), the
transposed tiles released a block later to save a barrier (0.190), the keys' scales read before
the score products' wait (0.195), the copier asking L2 for blocks 1-4 ahead (0.193-0.196), a
third latent slot beside a separate two-slot rope ring (0.186), and Q's first 128 latent columns
held in registers as the score products' A operand (0.1833 against 0.1835; 256 spill). Nsight
Compute (RESULTS.md): shared memory is the busiest unit (69.6 %); the stall samples show the
copier and the transposer mostly waiting, the consumers spread over their products' waits, the
exchanges' barriers and short-scoreboard waits on shared memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from triton.runtime.errors import OutOfResources

from .gluon_common import _BLOCK_H, _D_LAT, _D_ROPE, HAVE_GLUON, key_operands_problem, platform_problem, too_few_programs
from .gluon_sparse_mla import REG_BUDGET, _misaligned, check_register_settings, check_row_counts, compile_ws_arguments
from .tensor_core_model import chained_terms

if HAVE_GLUON:
    from .gluon_common import (
        BLOCK_H,
        D_LAT,
        D_ROPE,
        V_HALF,
        _program_coords,
        _swap_with_other,
        async_copy,
        async_rows,
        fence_async_shared,
        gl,
        gluon,
        mbarrier,
        partition_barrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from .gluon_consumers import _softmax_p_alpha, _store_output, _sum_halves
    from .gluon_producers import _block_indices, _rope_rows, _row_ptrs, _valid_rows

LOG2E = 1.4426950408889634
# =1: FP8 calls try the FP8-products kernel first (it rounds Q and P to e4m3: less accurate than
# the dequantizing kernels); =2: with Q and P as two e4m3 terms each; unset: it is never taken;
# =0: declines() says it is switched off.
ENV_OFF = "MLA_COMPILER_FP8_MMA"
P_HEADROOM_LOG2 = 8  # P' = P * sigma * 2^(P_HEADROOM_LOG2 - e) <= 256 (see p_exponent)
E_LIMIT = 60  # |e| at most this: the accumulator's rescale 2^(e_prev - e) stays a normal float
# The lazy reference (``lazy_reference``): P' = 2^(score + log2 sigma - k) with k moved only where a
# block's largest exponent w would take P' past 2^P_HEADROOM_LOG2, and then to ceil(w) - LAZY_LOW,
# so P' <= 2^LAZY_LOW after the move and the running maximum may grow 8 - LAZY_LOW binades before
# the next one. At V3.2's softmax scale (YaRN's mscale folded in) a 64-head tile's k moved on 12
# of 16 steps with LAZY_LOW=4, 3.9 with 1, 1.8 with 0 (CPU count on the decode inputs), while the
# error against the exact FP8 arithmetic stays 5.88e-2 (keys far below k round to e4m3's
# subnormals or 0 either way). H200, vregs kernel, A/B in one process: 0.1214 -> 0.1194 ms with 1,
# 0.1212 -> 0.1194 with 0 (error 5.89e-2), so 1.
LAZY_LOW = 1
# A selected key's scale counts as at least 2^SIGMA_FLOOR_LOG2 in log2 sigma and 1 / sigma (its
# scores keep the true scale). The fused and lazy softmax take P' = 2^(score + log2 sigma - k) and
# recover P as P' / sigma for the sums, so a key whose scale is 0 would drop out of the softmax's
# denominator although its rope score counts (FlashMLA's and the exact reference's arithmetic keep
# it); there its latent part enters the output at 2^-64 of its payload instead of 0. The unfused
# forms take P' = P sigma from the true scale and the sums from P; for them the floor only moves
# the exponent e of a row whose scales are all 0 (its P' are 0 either way).
SIGMA_FLOOR_LOG2 = -64
# PROBE_SKIP=1 / 2 (timing probes only, the output is wrong): the producer skips the transposes /
# the split consumers skip the value accumulator's rescale;
# benchmarks/probe_fp8_mma.py times it (RESULTS.md).
# BLOCK_N keys a block; STAGES raw-row slots, VT_STAGES transposed tiles; the producer copies
# AHEAD blocks ahead of the one it transposes; SPLIT=1: the two warpgroups split each block's
# scores and exchange maxima and P' (BLOCK_N 64 only), SPLIT=0: each computes all of them.
# COPIER=1: the producer's work in two partitions, one issuing copies (COPIER_REGS), one
# transposing (PRODUCER_REGS; AHEAD unused): four warpgroups share the register file.
# COPIER=0: one producer partition does both (three warpgroups; ONE_PRODUCER has its registers).
LAUNCH = dict(CONSUMER_REGS=208, PRODUCER_REGS=40, PROBE_SKIP=0, BLOCK_N=64, STAGES=2, VT_STAGES=2, AHEAD=1, SPLIT=1, COPIER=1,
              COPIER_REGS=56)
ONE_PRODUCER = dict(COPIER=0, CONSUMER_REGS=216, PRODUCER_REGS=72)  # the three-warpgroup layout's registers
COPIER_REG_BUDGET = 512  # the four 128-thread partitions of COPIER=1 (128 x 512 / 128)
SHARED_LIMIT = 232448  # bytes a program may allocate on sm_90 (227 KB)


def product_terms(products: int = 0) -> int:
    """The e4m3 terms of Q and P that FP8 calls ask the FP8-products kernel for: the call's
    (``products``: the op's ``fp8_products``, from ``make_backend(fp8_products=True)`` (1) or
    ``"two_term"`` (2)), else every call's (MLA_COMPILER_FP8_MMA=1 or 2); 0 where none asks. An
    explicit choice: one term (e4m3 Q and P) roughly adds the key layout's own error again, two
    terms keep the layout's error at about 1.4x the time of one (RESULTS.md).
    MLA_COMPILER_FP8_MMA=0 still switches the kernel off (``declines`` says so)."""
    if products not in (0, 1, 2):  # True and False are 1 and 0
        raise ValueError(f"products={products!r}: 0, 1 or 2 e4m3 terms of Q and P")
    if products:
        return int(products)
    env = os.environ.get(ENV_OFF)
    return int(env) if env in ("1", "2") else 0


def asked_for(products: int = 0) -> bool:
    """Whether FP8 calls should try the FP8-products kernel first (``product_terms``)."""
    return product_terms(products) > 0


def declines(q: torch.Tensor, kv_latent: torch.Tensor, kv_scale: Optional[torch.Tensor], kv_rope: Optional[torch.Tensor],
             d_v: int, attn_sink=None, topk_length=None, h_kv: int = 1) -> Optional[str]:
    """Why the FP8-MMA kernel does not take this call (None when it does)."""
    problem = platform_problem(q, ENV_OFF, "e4m3 wgmma is an sm_90 instruction", h_kv)
    if problem is not None:
        return problem
    if kv_scale is None:
        return "bf16 keys (this kernel's products take an e4m3 latent)"
    if kv_latent.shape[1] != _D_LAT or kv_rope is None or kv_rope.shape[1] != _D_ROPE or d_v != _D_LAT:
        rope = None if kv_rope is None else kv_rope.shape[1]
        return f"latent {kv_latent.shape[1]} / rope {rope} / d_v {d_v} (512 / 64 / 512 only)"
    if q.shape[2] != _D_LAT + _D_ROPE:
        return f"query width {q.shape[2]} (576 only)"
    if q.shape[1] < _BLOCK_H:
        return f"{q.shape[1]} heads (64 or more: wgmma tiles 64 rows)"
    if attn_sink is not None or topk_length is not None:
        return "attn_sink / topk_length (not implemented here)"
    problem = key_operands_problem(kv_latent, kv_scale, kv_rope)
    if problem is not None:
        return problem
    if kv_scale.shape[1] != 1:
        return (f"{kv_scale.shape[1]} scales a row: e4m3 products take one scale a key row (a scale per 128 columns "
                "would need a score accumulator per tile); quantize the cache with layout 'row'")
    return _misaligned(kv_latent, kv_rope)


def dispatch_declines(q: torch.Tensor, kv_latent: torch.Tensor, kv_scale: Optional[torch.Tensor], kv_rope: Optional[torch.Tensor],
                      d_v: int, attn_sink=None, topk_length=None, h_kv: int = 1) -> Optional[str]:
    """Why the FP8 forward should not hand this call to this kernel (None when it should): what
    ``declines`` says, or too few programs to fill the SMs (one program walks a token's whole
    top-k; the Triton kernel splits it). ``forward`` itself runs any call ``declines`` accepts."""
    return declines(q, kv_latent, kv_scale, kv_rope, d_v, attn_sink, topk_length, h_kv) or too_few_programs(q)


# --- the reference: the kernel's roundings, in torch -------------------------------------------

def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """The least power of two >= x for float32 x > 0 (from the bits, exact); 0 stays 0."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)


def p_exponent(w_max: torch.Tensor, e_prev: torch.Tensor) -> torch.Tensor:
    """A row's exponent e for a block: the least integer with P_j sigma_j <= 2^e over the block's
    keys, from w_max = max_j (score_j - m + log2 sigma_j) (base 2, m the row's running maximum),
    clamped to +-E_LIMIT; the previous block's e where the row has no valid key in this one."""
    return torch.where(w_max == float("-inf"), e_prev, torch.ceil(w_max)).clamp(-E_LIMIT, E_LIMIT)


def quantize_q_rows(q_latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., 512] -> (e4m3 [..., 512], float32 [...]): one power-of-two scale a row, amax / 448
    rounded up (1 for a zero row), so x / scale is exact before the cast."""
    amax = q_latent.float().abs().amax(-1)
    scale = pow2_ceil(amax * torch.tensor(1.0 / 448.0, dtype=torch.float32))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (q_latent.float() / scale.unsqueeze(-1)).to(torch.float8_e4m3fn), scale


def lazy_reference(w_max: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k', f): a row's reference for P' = 2^(score + log2 sigma - k') after a block whose largest
    score + log2 sigma is ``w_max``, and the factor 2^(k - k') that rescales the sums taken under
    k (1 where there were none: k = -inf). k moves only where P' would pass 2^P_HEADROOM_LOG2."""
    moved = torch.where(w_max > k + P_HEADROOM_LOG2, torch.ceil(w_max) - LAZY_LOW, k)
    return moved, torch.where(k == float("-inf"), torch.ones_like(k), torch.exp2(k - moved))


def e4m3_terms(x: torch.Tensor, terms: int = 1) -> torch.Tensor:
    """``x`` (float32) as the products see it: rounded to e4m3, or with ``terms=2`` that plus its
    rounding residual rounded to e4m3 (hi + lo, about 8 significant bits: a bf16 value scaled by a
    power of two into e4m3's range is kept exactly where |x| >= 2^-2, for Q under its row scale
    every value above about 2^-10 of the row's largest; below, the residual meets e4m3's smallest
    step 2^-9)."""
    parts = e4m3_term_list(x, terms)
    return parts[0] if terms == 1 else parts[0] + parts[1]


def e4m3_term_list(x: torch.Tensor, terms: int = 1) -> list[torch.Tensor]:
    """``e4m3_terms``'s terms, the rounded value first: [hi] or [hi, lo]."""
    if terms not in (1, 2):
        raise ValueError(f"terms={terms}: 1 or 2")
    hi = x.to(torch.float8_e4m3fn).float()
    return [hi] if terms == 1 else [hi, (x - hi).to(torch.float8_e4m3fn).float()]


def reference_fp8_mma(q, kv_latent, kv_scale, kv_rope, indices, sm_scale: float, block_n: int = 64, lazy: bool = False,
                      terms: int = 1, residuals_first: bool = False, tc_bits: Optional[int] = None):
    """out [T, H, 512] (float32) and lse [T, H] of the FP8-MMA kernel's arithmetic: Q's latent and
    P' rounded to e4m3 as the kernel does, blocks of ``block_n`` keys in top-k order, online
    softmax in fp32. q [T, H, 576] bf16, kv_latent e4m3 [S, 512], kv_scale [S, 1], kv_rope bf16
    [S, 64], indices [T, 1, topk]. ``lazy``: P' under ``lazy_reference``'s k (the vregs kernel's
    LAZY_RESCALE=1), the sums kept in its units; else under the running maximum and a block's
    exponent (``p_exponent``). ``terms=2`` (lazy only): Q's latent and P' each as two e4m3 terms
    (``e4m3_terms``), the split kernel's RESIDUALS=1; ``residuals_first``: their residual terms'
    products issued first (its RESIDUALS_FIRST=1). ``tc_bits`` (lazy only): the e4m3 products
    added as ``tensor_core_model`` says the tensor cores add them (None: in fp32), so the order of
    the terms matters."""
    if terms not in (1, 2) or (terms == 2 and not lazy):
        raise ValueError(f"terms={terms}: 1, or 2 with lazy=True (the only kernel with two-term operands takes the lazy reference)")
    if tc_bits is not None and not lazy:
        raise ValueError(f"tc_bits={tc_bits}: with lazy=True only (the split kernel's arithmetic)")
    if lazy:
        order = _TermOrder(terms, residuals_first, tc_bits)
        return _reference_fp8_mma_lazy(q, kv_latent, kv_scale, kv_rope, indices, sm_scale, block_n, order)
    t, h, _ = q.shape
    m = torch.full((t, h), float("-inf"), device=q.device)
    l_sum = torch.zeros((t, h), device=q.device)
    e = torch.zeros((t, h), device=q.device)
    acc = torch.zeros((t, h, _D_LAT), device=q.device)
    for k8, sig, valid, s in _reference_block_scores(q, kv_latent, kv_scale, kv_rope, indices, sm_scale, block_n):
        m_new = torch.maximum(m, s.amax(-1))
        m_use = torch.where(m_new == float("-inf"), 0.0, m_new)
        p = torch.exp2(s - m_use[..., None])
        alpha = torch.exp2(m - m_use)
        e = p_exponent((s - m_use[..., None] + torch.log2(floored_sigma(sig, valid))[:, None, :]).amax(-1), e)
        p8 = (p * sig[:, None, :] * torch.exp2(P_HEADROOM_LOG2 - e)[..., None]).to(torch.float8_e4m3fn).float()
        acc = acc * alpha[..., None] + torch.einsum("thn,tnd->thd", p8, k8) * torch.exp2(e - P_HEADROOM_LOG2)[..., None]
        l_sum = l_sum * alpha + p.sum(-1)
        m = m_new
    return _reference_output(acc, l_sum, m)


@dataclass(frozen=True)
class _TermOrder:
    """How the reference adds a product of two-term operands: ``terms`` e4m3 terms of the
    rounded operand, the residuals' products first or last, and the accumulation
    (``tensor_core_model``'s bits; None: the terms summed, then one fp32 product)."""

    terms: int = 1
    residuals_first: bool = False
    tc_bits: Optional[int] = None

    def product(self, acc: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """acc + e4m3_terms(x) @ b, the terms' products in the kernel's order."""
        if self.tc_bits is None:
            return acc + e4m3_terms(x, self.terms) @ b
        parts = e4m3_term_list(x, self.terms)
        ordered = parts[::-1] if self.residuals_first else parts
        return chained_terms(acc, [(part, b) for part in ordered], self.tc_bits)


def _reference_block_scores(q, kv_latent, kv_scale, kv_rope, indices, sm_scale: float, block_n: int,
                            order: Optional[_TermOrder] = None):
    """Each block of ``block_n`` keys in top-k order, as reference_fp8_mma reads it: the e4m3
    latent rows as float [T, n, 512], sigma [T, n], which keys are valid [T, n] and the base-2
    scores [T, H, n] (Q's latent rounded as the kernel does, in ``order``'s e4m3 terms and order;
    0, 0 and -inf at invalid keys)."""
    order = order or _TermOrder()
    s_kv = kv_latent.shape[0]
    _, qs = quantize_q_rows(q[..., :_D_LAT])
    q_lat = q[..., :_D_LAT].float() / qs.unsqueeze(-1)  # the scale is a power of two: exact
    q_rope = q[..., _D_LAT:].float()
    scale_log2 = sm_scale * LOG2E
    idx = indices[:, 0].long()
    for b0 in range(0, idx.shape[-1], block_n):
        blk = idx[:, b0:b0 + block_n]
        valid = (blk >= 0) & (blk < s_kv)
        safe = torch.where(valid, blk, torch.zeros_like(blk))
        k8 = torch.where(valid[..., None], kv_latent[safe].float(), 0.0)  # [T, n, 512]
        sig = torch.where(valid, kv_scale[safe, 0].float(), 0.0)  # [T, n]
        rope = torch.where(valid[..., None], kv_rope[safe].float(), 0.0)
        s8 = order.product(torch.zeros(blk.shape[0], q.shape[1], blk.shape[1], device=q.device), q_lat, k8.transpose(1, 2))
        s = s8 * (qs * scale_log2)[..., None] * sig[:, None, :] + torch.einsum("thd,tnd->thn", q_rope, rope) * scale_log2
        yield k8, sig, valid, s.masked_fill(~valid[:, None, :], float("-inf"))


def floored_sigma(sig: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The keys' scales as log2 sigma and 1 / sigma take them (SIGMA_FLOOR_LOG2): at least
    2^SIGMA_FLOOR_LOG2 at a selected key, 0 at an invalid one."""
    return torch.where(valid, sig.clamp_min(2.0**SIGMA_FLOOR_LOG2), 0.0)


def _reference_output(acc, l_sum, m):
    """out and lse from the sums kept under the rows' reference m (0 and +inf where no key was valid)."""
    empty = l_sum == 0
    out = acc / torch.where(empty, 1.0, l_sum)[..., None]
    lse = torch.where(empty, float("inf"), (m + torch.log2(torch.where(empty, 1.0, l_sum))) / LOG2E)
    return out, lse


def _reference_fp8_mma_lazy(q, kv_latent, kv_scale, kv_rope, indices, sm_scale: float, block_n: int, order: _TermOrder):
    t, h, _ = q.shape
    k_ref = torch.full((t, h), float("-inf"), device=q.device)
    l_sum = torch.zeros((t, h), device=q.device)
    acc = torch.zeros((t, h, _D_LAT), device=q.device)
    for k8, sig, valid, s in _reference_block_scores(q, kv_latent, kv_scale, kv_rope, indices, sm_scale, block_n, order):
        sig = floored_sigma(sig, valid)  # P' and the sums both take it (P' / sigma is P)
        w = s + torch.log2(sig)[:, None, :]
        k_ref, f = lazy_reference(w.amax(-1), k_ref)
        p = torch.exp2(w - torch.where(k_ref == float("-inf"), 0.0, k_ref)[..., None])  # P' in fp32
        acc = order.product(acc * f[..., None], p, k8)
        l_sum = l_sum * f + (p * torch.where(sig > 0, 1.0 / sig, 0.0)[:, None, :]).sum(-1)
    return _reference_output(acc, l_sum, k_ref)

if HAVE_GLUON:
    HEADROOM_LOG2, E_MAX = gl.constexpr(P_HEADROOM_LOG2), gl.constexpr(E_LIMIT)
    SIGMA_FLOOR = gl.constexpr(2.0**SIGMA_FLOOR_LOG2)

    # How the copying partition spreads a block's copies: 64 rows x 256 latent bytes (16 a thread),
    # and 64 rows x 64 rope values.
    RAW_COPY_LAYOUT = gl.constexpr(gl.BlockedLayout([1, 16], [2, 16], [4, 1], [1, 0]))
    ROPE_COPY_LAYOUT = gl.constexpr(gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0]))

    # The producer's transpose of a [64 keys, 128 columns] chunk: 4 columns x 16 keys a thread, read
    # as 4-byte runs of the key rows, written as 16-byte runs of the transposed tile's rows (64
    # keys, 64-byte swizzle). Both take twice their ideal shared wavefronts, the fewest among the
    # layouts searched (runs of 4 bytes or more both ways; tests/test_gluon_fp8_mma.py counts
    # them); 8 x 4 a thread into two 32-key tiles took 4x on the stores: 0.230 -> 0.211 ms.
    TRANSPOSE_LAYOUT = gl.constexpr(gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0], [8, 0]],
                                                               lane_bases=[[16, 0], [0, 4], [0, 64], [0, 32], [0, 16]],
                                                               warp_bases=[[32, 0], [0, 8]], block_bases=[], shape=[64, 128]))

    # The same for 32-key blocks, a [32 keys, 128 columns] chunk into a [512, 32] tile (32-byte
    # swizzle): 4 columns x 8 keys a thread; loads at 2x the ideal wavefronts, stores (8 bytes) at 4x.
    TRANSPOSE_32_COLUMNS = gl.constexpr(128)
    TRANSPOSE_LAYOUT_32 = gl.constexpr(gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
                                                                  lane_bases=[[0, 4], [0, 32], [0, 64], [8, 0], [0, 16]],
                                                                  warp_bases=[[16, 0], [0, 8]], block_bases=[], shape=[32, 128]))

    @gluon.jit
    def _pow2_ceil(x):
        """pow2_ceil in the kernel: the least power of two >= x > 0, from the bits (exact)."""
        bits = x.to(gl.int32, bitcast=True)
        return ((bits + 0x7FFFFF) & 0x7F800000).to(gl.float32, bitcast=True)

    @gluon.jit
    def _pow2_inv(x):
        """1 / x for a normal power of two x (2^-125 .. 2^126), from the bits (exact)."""
        return (0x7F000000 - x.to(gl.int32, bitcast=True)).to(gl.float32, bitcast=True)

    @gluon.jit
    def _exp2_int(k):
        """2^k for an integer-valued float k in -126 .. 127, from the bits (exact)."""
        return ((k.to(gl.int32) + 127) << 23).to(gl.float32, bitcast=True)

    @gluon.jit
    def _q_scales(amax):
        """Each Q row's power-of-two scale (amax / 448 rounded up; 1 for a zero row) and its inverse."""
        qs = _pow2_ceil(amax * (1.0 / 448.0))
        qs = gl.where(qs > 0.0, qs, 1.0)
        return qs, _pow2_inv(qs)

    @gluon.jit
    def _quantize_q(Q, q8_smem, qr_smem, qs_smem, t, hb, stride_qt, stride_qh, H):
        """This program's 64 query rows into shared memory: the latent as e4m3 with one power-of-two
        scale a row (``qs_smem``), the rope as bf16 (padded heads are 0)."""
        q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        heads = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, q_layout))
        h_ok = (heads < H)[:, None]
        q_row = Q + t * stride_qt + heads[:, None] * stride_qh
        cols = gl.arange(0, 128, layout=gl.SliceLayout(0, q_layout))
        amax = gl.zeros([BLOCK_H], gl.float32, gl.SliceLayout(1, q_layout))
        for c in gl.static_range(D_LAT // 128):
            x = gl.load(q_row + c * 128 + cols[None, :], mask=h_ok, other=0.0).to(gl.float32)
            amax = gl.maximum(amax, gl.max(gl.abs(x), 1))
        qs, inv = _q_scales(amax)
        # Q is read again (from L2, once a program): holding a row's 512 values through the maxima
        # would take 256 registers a thread.
        for c in gl.static_range(D_LAT // 128):
            x = gl.load(q_row + c * 128 + cols[None, :], mask=h_ok, other=0.0).to(gl.float32)
            q8_smem.slice(c * 128, 128, dim=1).store((x * inv[:, None]).to(gl.float8e4nv))
        qs_smem.store(qs)
        rope_cols = gl.arange(0, D_ROPE, layout=gl.SliceLayout(0, q_layout))
        qr_smem.store(gl.load(q_row + D_LAT + rope_cols[None, :], mask=h_ok, other=0.0))

    @gluon.jit
    def _quantize_q_rows(Q, q8_smem, q8_res_smem, qs_smem, t, hb, stride_qt, stride_qh, H, ROW0: gl.constexpr, TERMS: gl.constexpr):
        """The latent of rows ROW0 .. ROW0 + 32 of the program's query rows into shared memory (as
        ``_quantize_q``; the rope rows are copied by ``_copy_q_rope``), by the four warps that call
        it. Every load is issued before any is used: one trip to memory, not one a 128-column chunk
        and pass (64 registers a thread hold the rows). TERMS=2: also each value's rounding
        residual, in e4m3 under the same scale, into ``q8_res_smem`` (``e4m3_terms``)."""
        ROWS: gl.constexpr = BLOCK_H // 2
        q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        heads = hb * BLOCK_H + ROW0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, q_layout))
        h_ok = (heads < H)[:, None]
        q_row = Q + t * stride_qt + heads[:, None] * stride_qh
        cols = gl.arange(0, 128, layout=gl.SliceLayout(0, q_layout))
        x0 = gl.load(q_row + cols[None, :], mask=h_ok, other=0.0)
        x1 = gl.load(q_row + 128 + cols[None, :], mask=h_ok, other=0.0)
        x2 = gl.load(q_row + 256 + cols[None, :], mask=h_ok, other=0.0)
        x3 = gl.load(q_row + 384 + cols[None, :], mask=h_ok, other=0.0)
        amax = gl.maximum(gl.maximum(gl.max(gl.abs(x0.to(gl.float32)), 1), gl.max(gl.abs(x1.to(gl.float32)), 1)),
                          gl.maximum(gl.max(gl.abs(x2.to(gl.float32)), 1), gl.max(gl.abs(x3.to(gl.float32)), 1)))
        qs, inv = _q_scales(amax)
        _store_q_terms(x0, inv, q8_smem, q8_res_smem, ROW0, 0, TERMS)
        _store_q_terms(x1, inv, q8_smem, q8_res_smem, ROW0, 128, TERMS)
        _store_q_terms(x2, inv, q8_smem, q8_res_smem, ROW0, 256, TERMS)
        _store_q_terms(x3, inv, q8_smem, q8_res_smem, ROW0, 384, TERMS)
        qs_smem.slice(ROW0, ROWS).store(qs)

    @gluon.jit
    def _store_q_terms(x, inv, q8_smem, q8_res_smem, ROW0: gl.constexpr, COL0: gl.constexpr, TERMS: gl.constexpr):
        """One 128-column chunk of Q's rows times their inverse scales, rounded to e4m3 (and with
        TERMS=2 its residual rounded to e4m3) into the chunk's place."""
        y = x.to(gl.float32) * inv[:, None]
        hi = y.to(gl.float8e4nv)
        q8_smem.slice(ROW0, x.shape[0], dim=0).slice(COL0, 128, dim=1).store(hi)
        if TERMS == 2:
            q8_res_smem.slice(ROW0, x.shape[0], dim=0).slice(COL0, 128, dim=1).store((y - hi.to(gl.float32)).to(gl.float8e4nv))

    @gluon.jit
    def _copy_q_rope(Q, qr_smem, t, hb, stride_qt, stride_qh, H):
        """The program's 64 query rows' rope part (bf16, as is) into ``qr_smem`` by asynchronous
        copies, left uncommitted: they join the caller's next commit group. Padded heads are 0."""
        heads = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ROPE_COPY_LAYOUT))
        cols = gl.arange(0, D_ROPE, layout=gl.SliceLayout(0, ROPE_COPY_LAYOUT))
        async_rows(qr_smem, Q + t * stride_qt + heads[:, None] * stride_qh + D_LAT + cols[None, :], mask=(heads < H)[:, None])

    @gluon.jit
    def _producer_fp8_mma(k8_ring, vt_lo, vt_hi, r_ring, ok_ring, sig_ring, lsig_ring, full, k_empty, v_empty,
                          KV, KV_SCALE, KV_ROPE, IDX, stride_kvs, stride_ss, stride_rs, stride_it, S_KV, TOPK, H,
                          BLOCK_N: gl.constexpr, STAGES: gl.constexpr, VT_STAGES: gl.constexpr, AHEAD: gl.constexpr,
                          PROBE_SKIP: gl.constexpr):
        """Each block: the raw e4m3 rows copied into a slot (Q K^T's B operand), the rope rows, the
        keys' scales sigma and log2 sigma, then the rows transposed into a [512, BLOCK_N] tile (P V's
        B operand, keys contiguous). Blocks i + 1 .. i + AHEAD are in flight while block i is
        transposed."""
        copy_layout: gl.constexpr = RAW_COPY_LAYOUT
        rope_layout: gl.constexpr = ROPE_COPY_LAYOUT
        row_layout: gl.constexpr = gl.SliceLayout(1, copy_layout)
        t, _ = _program_coords(H)
        stride_rs = gl.multiple_of(stride_rs, 8)
        stride_kvs = gl.multiple_of(stride_kvs, 16)
        idx_row = IDX + t * stride_it
        cols = gl.arange(0, 256, layout=gl.SliceLayout(0, copy_layout))
        n_blocks = gl.cdiv(TOPK, BLOCK_N)
        sig_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        # One commit group a block, empty past the last one, so wait_group(AHEAD) always means
        # "block i has landed".
        idx = _block_indices(idx_row, 0, TOPK, BLOCK_N, row_layout)
        for j in gl.static_range(AHEAD):
            idx = _issue_next(k8_ring, r_ring, ok_ring, sig_ring, k_empty, KV, KV_SCALE, KV_ROPE, idx, idx_row, j, n_blocks, stride_kvs,
                              stride_ss, stride_rs, cols, S_KV, TOPK, BLOCK_N, STAGES, row_layout, rope_layout, sig_layout)
        for i in range(n_blocks):
            # The slot of block i + AHEAD is free once the consumers' scores of block
            # i + AHEAD - STAGES (at most i - 1) are done.
            idx = _issue_next(k8_ring, r_ring, ok_ring, sig_ring, k_empty, KV, KV_SCALE, KV_ROPE, idx, idx_row, i + AHEAD, n_blocks,
                              stride_kvs, stride_ss, stride_rs, cols, S_KV, TOPK, BLOCK_N, STAGES, row_layout, rope_layout, sig_layout)
            async_copy.wait_group(AHEAD)
            partition_barrier()  # every producer thread's rows of block i have landed
            _hand_over_block(k8_ring, vt_lo, vt_hi, ok_ring, sig_ring, lsig_ring, full, v_empty, i, BLOCK_N, STAGES, VT_STAGES, PROBE_SKIP)

    @gluon.jit
    def _hand_over_block(k8_ring, vt_lo, vt_hi, ok_ring, sig_ring, lsig_ring, full, v_empty, i, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                         VT_STAGES: gl.constexpr, PROBE_SKIP: gl.constexpr):
        """Block i, landed in its slot: log2 sigma once a key (the consumers would take log2's long
        form per element), the transposes once its transposed tiles are free, then the block handed
        to the consumers (``full``)."""
        slot = i % STAGES
        vslot = i % VT_STAGES
        sig_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        lsig_ring.index(slot).store(gl.log2(_floored_sigma(sig_ring.index(slot), ok_ring.index(slot), sig_layout)))
        mbarrier.wait(v_empty.index(vslot), ((i // VT_STAGES) & 1) ^ 1)
        _transpose_block(k8_ring.index(slot), vt_lo.index(vslot), vt_hi.index(vslot), BLOCK_N, PROBE_SKIP)
        fence_async_shared()
        partition_barrier()
        mbarrier.arrive(full.index(slot))

    @gluon.jit
    def _floored_sigma(sig_slot, ok_slot, sig_layout: gl.constexpr):
        """A block's key scales as log2 sigma and 1 / sigma take them (SIGMA_FLOOR_LOG2): at least
        2^SIGMA_FLOOR_LOG2 at a selected key (in the fused and lazy softmax a scale of 0 would
        drop its P from the sums), 0 at an invalid one."""
        sig = sig_slot.load(sig_layout)
        return gl.where(ok_slot.load(sig_layout) != 0, gl.maximum(sig, SIGMA_FLOOR), 0.0)

    @gluon.jit
    def _transpose_block(k_slot, vt_lo_slot, vt_hi_slot, BLOCK_N: gl.constexpr, PROBE_SKIP: gl.constexpr):
        """A slot's raw rows [BLOCK_N, 512] into the two transposed tiles [256, BLOCK_N] (keys
        contiguous). Chunks alternate between the two halves: the compiler fences a store to a
        tile from the previous store to the same tile with a barrier (one a block, not three:
        0.199 -> 0.196 ms on H200)."""
        t_layout: gl.constexpr = TRANSPOSE_LAYOUT if BLOCK_N == 64 else TRANSPOSE_LAYOUT_32
        CHUNK: gl.constexpr = 128 if BLOCK_N == 64 else TRANSPOSE_32_COLUMNS
        HALF_CHUNKS: gl.constexpr = V_HALF // CHUNK
        for n in gl.static_range(D_LAT // CHUNK if PROBE_SKIP != 1 else 0):
            x = k_slot.slice(((n % 2) * HALF_CHUNKS + n // 2) * CHUNK, CHUNK, dim=1).load(t_layout)
            if n % 2 == 0:
                vt_lo_slot.slice((n // 2) * CHUNK, CHUNK, dim=0).permute((1, 0)).store(x)
            else:
                vt_hi_slot.slice((n // 2) * CHUNK, CHUNK, dim=0).permute((1, 0)).store(x)

    @gluon.jit
    def _copier_fp8_mma(k8_ring, r_ring, ok_ring, sig_ring, landed, k_empty, KV, KV_SCALE, KV_ROPE, IDX, stride_kvs, stride_ss,
                        stride_rs, stride_it, S_KV, TOPK, H, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """COPIER=1: block after block, as soon as its slot frees, the raw rows, rope rows and key
        scales by asynchronous copies, whose landing ``landed`` tracks (the copies' own arrivals),
        and the keys' validity beside them. Nothing here waits on a copy: the transposer does."""
        copy_layout: gl.constexpr = RAW_COPY_LAYOUT
        rope_layout: gl.constexpr = ROPE_COPY_LAYOUT
        sig_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        row_layout: gl.constexpr = gl.SliceLayout(1, copy_layout)
        t, _ = _program_coords(H)
        stride_rs = gl.multiple_of(stride_rs, 8)
        stride_kvs = gl.multiple_of(stride_kvs, 16)
        idx_row = IDX + t * stride_it
        cols = gl.arange(0, 256, layout=gl.SliceLayout(0, copy_layout))
        n_blocks = gl.cdiv(TOPK, BLOCK_N)
        idx = _block_indices(idx_row, 0, TOPK, BLOCK_N, row_layout)
        for i in range(n_blocks):
            rows = _valid_rows(idx, S_KV)
            idx = _block_indices(idx_row, i + 1, TOPK, BLOCK_N, row_layout)  # waited on next block
            _issue_block(k8_ring, r_ring, ok_ring, sig_ring, k_empty, KV, KV_SCALE, KV_ROPE, rows, i, stride_kvs, stride_ss, stride_rs,
                         cols, STAGES, rope_layout, sig_layout)
            # Each thread's copies add a pending arrival that lands with them; the one arrival
            # below (after every thread has added its own) also publishes the validity store.
            async_copy.mbarrier_arrive(landed.index(i % STAGES))
            partition_barrier()
            mbarrier.arrive(landed.index(i % STAGES))

    @gluon.jit
    def _transposer_fp8_mma(k8_ring, vt_lo, vt_hi, ok_ring, sig_ring, lsig_ring, landed, full, v_empty, TOPK, BLOCK_N: gl.constexpr,
                            STAGES: gl.constexpr, VT_STAGES: gl.constexpr, PROBE_SKIP: gl.constexpr):
        """COPIER=1: each block once its copies land and its transposed tiles are free: log2 sigma,
        the transposes, then the block handed to the consumers. Off the copies' path, so a block's
        transposes wait on neither the copy issue nor the consumers' scores of the block before."""
        n_blocks = gl.cdiv(TOPK, BLOCK_N)
        for i in range(n_blocks):
            mbarrier.wait(landed.index(i % STAGES), (i // STAGES) & 1)
            _hand_over_block(k8_ring, vt_lo, vt_hi, ok_ring, sig_ring, lsig_ring, full, v_empty, i, BLOCK_N, STAGES, VT_STAGES, PROBE_SKIP)

    @gluon.jit
    def _issue_next(k8_ring, r_ring, ok_ring, sig_ring, k_empty, KV, KV_SCALE, KV_ROPE, idx, idx_row, j, n_blocks, stride_kvs, stride_ss,
                    stride_rs, cols, S_KV, TOPK, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, row_layout: gl.constexpr,
                    rope_layout: gl.constexpr, sig_layout: gl.constexpr):
        """Block j's copies from its indices ``idx`` (an empty commit group past the last block);
        returns block j + 1's indices, read now: their value is waited on only at the next call."""
        rows = _valid_rows(idx, S_KV)
        idx_next = _block_indices(idx_row, j + 1, TOPK, BLOCK_N, row_layout)
        if j < n_blocks:
            _issue_block(k8_ring, r_ring, ok_ring, sig_ring, k_empty, KV, KV_SCALE, KV_ROPE, rows, j, stride_kvs, stride_ss, stride_rs,
                         cols, STAGES, rope_layout, sig_layout)
        else:
            async_copy.commit_group()
        return idx_next

    @gluon.jit
    def _issue_block(k8_ring, r_ring, ok_ring, sig_ring, k_empty, KV, KV_SCALE, KV_ROPE, rows, i, stride_kvs, stride_ss, stride_rs,
                     cols, STAGES: gl.constexpr, rope_layout: gl.constexpr, sig_layout: gl.constexpr):
        """Block i's raw rows, rope rows and key scales by asynchronous copies (one commit group)
        into its slot, once the consumers' scores of block i - STAGES are done; the keys' validity
        beside them. ``rows`` were read an iteration earlier, and the scales are copied rather than
        loaded, so no global load's latency lies on the producer's path: waiting on the indices,
        then on the scales they address, each block ran 0.215 ms against 0.199 (H200)."""
        slot = i % STAGES
        valid = rows >= 0
        base = _row_ptrs(KV, rows, cols, stride_kvs, 256)
        mbarrier.wait(k_empty.index(slot), ((i // STAGES) & 1) ^ 1)
        k_slot = k8_ring.index(slot)
        async_rows(k_slot.slice(0, 256, dim=1), base, mask=valid[:, None])
        async_rows(k_slot.slice(256, 256, dim=1), base + 256, mask=valid[:, None])
        _rope_rows(r_ring.index(slot), KV_ROPE, rows, stride_rs, rope_layout)
        sig_rows = gl.convert_layout(rows, sig_layout)
        async_rows(sig_ring.index(slot), KV_SCALE + sig_rows.to(gl.int64) * stride_ss, mask=sig_rows >= 0)
        async_copy.commit_group()
        ok_ring.index(slot).store(valid.to(gl.int32))

    @gluon.jit
    def _issue_scores(q8_smem, qr_smem, k8_ring, r_ring, full, i, s_zero, sr_zero, WG: gl.constexpr, HALF: gl.constexpr,
                      STAGES: gl.constexpr, COPIER: gl.constexpr):
        """Waits for block i's slot and issues this warpgroup's score products on it (asynchronous):
        the e4m3 latent product and the bf16 rope product, into separate accumulators."""
        slot = i % STAGES
        mbarrier.wait(full.index(slot), (i // STAGES) & 1)
        if COPIER:
            # The rows were copied by other threads than the ones that handed them over: make
            # what this thread now sees visible to its MMAs' async proxy.
            fence_async_shared()
        keys = k8_ring.index(slot).slice(WG * HALF, HALF, dim=0)
        s8 = warpgroup_mma(q8_smem, keys.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        sr = warpgroup_mma(qr_smem, r_ring.index(slot).slice(WG * HALF, HALF, dim=0).permute((1, 0)), sr_zero, use_acc=False,
                           is_async=True)
        return s8, sr

    @gluon.jit
    def _half_scores(s8, sr, slot, sig_ring, ok_ring, lsig_ring, q_log2, sm_scale_log2, WG: gl.constexpr, HALF: gl.constexpr,
                     s_layout: gl.constexpr):
        """This warpgroup's half of a block's scores (base 2) from its latent and rope products,
        -inf at invalid keys; the keys' scales sigma; the half's row maxima m, m_safe (0 for a row
        with no valid key) and w = max_j (score_j - m_safe + log2 sigma_j)."""
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        sig = sig_ring.index(slot).slice(WG * HALF, HALF).load(col_s)
        valid = ok_ring.index(slot).slice(WG * HALF, HALF).load(col_s) != 0
        s = s8 * (q_log2[:, None] * sig[None, :]) + gl.convert_layout(sr, s_layout) * sm_scale_log2
        s, m_mine, m_safe, w_mine = _masked_maxima(s, valid, lsig_ring.index(slot).slice(WG * HALF, HALF), s_layout)
        return s, sig, m_mine, m_safe, w_mine

    @gluon.jit
    def _masked_maxima(s, valid, lsig_keys, s_layout: gl.constexpr):
        """Scores ``s`` -inf where a key is not ``valid``; the row maxima m, m_safe (0 for a row
        with no valid key) and w = max_j (score_j - m_safe + log2 sigma_j) (``lsig_keys``)."""
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        s = gl.where(valid[None, :], s, float("-inf"))
        m_mine = gl.max(s, 1)
        # max_j (score_j + log2 sigma_j) relative to this maximum: scores of any size keep log2
        # sigma's bits (the absolute sum loses them past 2^23).
        m_safe = gl.where(m_mine == float("-inf"), 0.0, m_mine)
        w_mine = gl.max(s - m_safe[:, None] + lsig_keys.load(col_s)[None, :], 1)
        return s, m_mine, m_safe, w_mine

    @gluon.jit
    def _exchanged_softmax(s, m_mine, m_safe, w_mine, m_i, e_prev, xmax, wmax, bar_x, i, WG: gl.constexpr, row_s: gl.constexpr):
        """The two warpgroups' half-block maxima exchanged (block i): this half's P under the new
        running maxima, alpha (the rescale for them), the new maxima, and each row's exponent e for
        P' = P sigma 2^(8 - e) (p_exponent, from both halves' w)."""
        alpha, m_new, m_use, e = _exchanged_maxima(m_mine, m_safe, w_mine, m_i, e_prev, xmax, wmax, bar_x, i, WG, row_s)
        return gl.exp2(s - m_use[:, None]), alpha, m_new, e

    @gluon.jit
    def _exchanged_maxima(m_mine, m_safe, w_mine, m_i, e_prev, xmax, wmax, bar_x, i, WG: gl.constexpr, row_s: gl.constexpr):
        """The two warpgroups' half-block maxima exchanged (block i): alpha (the rescale to the new
        running maxima), the new maxima, the maxima P is taken under (0 for a row with no valid key
        yet), and each row's exponent e for P' = P sigma 2^(8 - e) (p_exponent, from both halves' w)."""
        OTHER: gl.constexpr = 1 - WG
        xmax.index(WG).store(m_mine)
        wmax.index(WG).store(w_mine)
        _swap_with_other(bar_x, i & 1, WG)
        m_other = xmax.index(OTHER).load(row_s)
        m_new = gl.maximum(m_i, gl.maximum(m_mine, m_other))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_use)
        w_row = gl.maximum(w_mine + (m_safe - m_use),
                           wmax.index(OTHER).load(row_s) + (gl.where(m_other == float("-inf"), 0.0, m_other) - m_use))
        e = gl.where(w_row == float("-inf"), e_prev, gl.ceil(w_row))
        e = gl.minimum(gl.maximum(e, -E_MAX), E_MAX)
        return alpha, m_new, m_use, e

    @gluon.jit
    def _consumer_fp8_mma(q8_smem, qr_smem, qs_smem, k8_ring, vt_mine, r_ring, ok_ring, sig_ring, lsig_ring, full, k_empty, v_empty,
                          xmax, wmax, p8_half, lsum, bar_x, bar_p, bar_l, OUT, LSE, stride_ot, stride_oh, stride_lt, TOPK, H,
                          sm_scale_log2, WG: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, VT_STAGES: gl.constexpr,
                          PROBE_SKIP: gl.constexpr, COPIER: gl.constexpr):
        """Scores of this warpgroup's half of each block's keys (e4m3 latent product and bf16 rope
        product), the row maxima and P' halves exchanged with the other warpgroup, then P' V (e4m3,
        all the block's keys) into this warpgroup's 256 value columns."""
        t, hb = _program_coords(H)
        HALF: gl.constexpr = BLOCK_N // 2
        OTHER: gl.constexpr = 1 - WG
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF, 32])
        sr_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF, 16])
        # COPIER=1 runs four warpgroups, so ptxas compiles at 128 registers a thread, too few for
        # one instruction's 128 accumulator registers: the 256 value columns go in two products.
        ACC_N: gl.constexpr = V_HALF // 2 if COPIER else V_HALF
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, ACC_N, 32])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

        q_log2 = qs_smem.load(row_s) * sm_scale_log2  # the Q row's scale, with the softmax scale
        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([BLOCK_H], gl.float32, row_s)
        e_prev = gl.zeros([BLOCK_H], gl.float32, row_s)  # acc holds the output / 2^(e_prev - 8)
        acc = gl.zeros([BLOCK_H, ACC_N], gl.float32, o_layout)
        if COPIER:
            acc2 = gl.zeros([BLOCK_H, ACC_N], gl.float32, o_layout)  # value columns 128 .. 255
        s_zero = gl.zeros([BLOCK_H, HALF], gl.float32, s_layout)
        sr_zero = gl.zeros([BLOCK_H, HALF], gl.float32, sr_layout)
        n_blocks = gl.cdiv(TOPK, BLOCK_N)
        for i in range(n_blocks):
            slot = i % STAGES
            s8, sr = _issue_scores(q8_smem, qr_smem, k8_ring, r_ring, full, i, s_zero, sr_zero, WG, HALF, STAGES, COPIER)
            s8, sr = warpgroup_mma_wait(0, deps=[s8, sr])
            s, sig, m_mine, m_safe, w_mine = _half_scores(s8, sr, slot, sig_ring, ok_ring, lsig_ring, q_log2, sm_scale_log2, WG, HALF,
                                                          s_layout)
            # The slot's keys, rope rows and scales are read: the producer may refill them.
            partition_barrier()
            mbarrier.arrive(k_empty.index(slot))
            # P' = P sigma 2^(8 - e) <= 256; acc carries 2^(e - 8).
            p, alpha, m_new, e = _exchanged_softmax(s, m_mine, m_safe, w_mine, m_i, e_prev, xmax, wmax, bar_x, i, WG, row_s)
            p8_half.index(WG).store((p * sig[None, :] * _exp2_int(HEADROOM_LOG2 - e)[:, None]).to(gl.float8e4nv))
            # Hand this half over first: the sum, the rescale and P' V over this half's keys then
            # run while the other warpgroup finishes its half (0.1868 -> 0.1836 ms on H200).
            fence_async_shared()
            partition_barrier()
            mbarrier.arrive(bar_p.index(WG))
            l_i = l_i * alpha + gl.sum(p, 1)
            if PROBE_SKIP != 2:
                rescale = gl.convert_layout(alpha * _exp2_int(e_prev - e), row_o)[:, None]
                acc = acc * rescale
                if COPIER:
                    acc2 = acc2 * rescale
            v_all = vt_mine.index(i % VT_STAGES)
            v_mine = v_all.slice(WG * HALF, HALF, dim=1)
            v_other = v_all.slice(OTHER * HALF, HALF, dim=1)
            if COPIER:
                acc = warpgroup_mma(p8_half.index(WG), v_mine.slice(0, ACC_N, dim=0).permute((1, 0)), acc, is_async=True)
                acc2 = warpgroup_mma(p8_half.index(WG), v_mine.slice(ACC_N, ACC_N, dim=0).permute((1, 0)), acc2, is_async=True)
            else:
                acc = warpgroup_mma(p8_half.index(WG), v_mine.permute((1, 0)), acc, is_async=True)
            mbarrier.wait(bar_p.index(OTHER), i & 1)
            if COPIER:
                acc = warpgroup_mma(p8_half.index(OTHER), v_other.slice(0, ACC_N, dim=0).permute((1, 0)), acc, is_async=True)
                acc2 = warpgroup_mma(p8_half.index(OTHER), v_other.slice(ACC_N, ACC_N, dim=0).permute((1, 0)), acc2, is_async=True)
                acc, acc2 = warpgroup_mma_wait(0, deps=[acc, acc2])
            else:
                acc = warpgroup_mma(p8_half.index(OTHER), v_other.permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=[acc])
            m_i = m_new
            e_prev = e
            partition_barrier()
            mbarrier.arrive(v_empty.index(i % VT_STAGES))

        l_i = _sum_halves(l_i, lsum, bar_l, WG, row_s)
        carry = gl.convert_layout(_exp2_int(e_prev - HEADROOM_LOG2), row_o)[:, None]
        _store_output(acc * carry, m_i, l_i, OUT, LSE, t, hb, stride_ot, stride_oh, stride_lt, H, WG * V_HALF, ACC_N, WG == 0, row_s,
                      o_layout, q8_smem, False)
        if COPIER:
            _store_output(acc2 * carry, m_i, l_i, OUT, LSE, t, hb, stride_ot, stride_oh, stride_lt, H, WG * V_HALF + ACC_N, ACC_N,
                          False, row_s, o_layout, q8_smem, False)

    @gluon.jit
    def _consumer_fp8_mma_whole(q8_smem, qr_smem, qs_smem, k8_ring, vt_mine, r_ring, ok_ring, sig_ring, lsig_ring, full, k_empty,
                                v_empty, OUT, LSE, stride_ot, stride_oh, stride_lt, TOPK, H, sm_scale_log2, WG: gl.constexpr,
                                BLOCK_N: gl.constexpr, STAGES: gl.constexpr, VT_STAGES: gl.constexpr):
        """Scores of all of each block's keys (the other warpgroup computes the same ones: e4m3
        Q K^T is cheap, and no exchange ties the two together, so one's softmax overlaps the other's
        products), then P' V from registers into this warpgroup's 256 value columns. The rope
        product accumulates onto the scaled latent scores: no second score accumulator."""
        t, hb = _program_coords(H)
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32])
        sr_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, V_HALF, 32])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        q_scale = qs_smem.load(row_s)
        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([BLOCK_H], gl.float32, row_s)
        e_prev = gl.zeros([BLOCK_H], gl.float32, row_s)  # acc holds the output / 2^(e_prev - 8)
        acc = gl.zeros([BLOCK_H, V_HALF], gl.float32, o_layout)
        s_zero = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, s_layout)
        n_blocks = gl.cdiv(TOPK, BLOCK_N)
        for i in range(n_blocks):
            slot = i % STAGES
            mbarrier.wait(full.index(slot), (i // STAGES) & 1)
            s8 = warpgroup_mma(q8_smem, k8_ring.index(slot).permute((1, 0)), s_zero, use_acc=False)
            sig = sig_ring.index(slot).load(col_s)
            lsig = lsig_ring.index(slot).load(col_s)
            valid = ok_ring.index(slot).load(col_s) != 0
            s = gl.convert_layout(s8 * (q_scale[:, None] * sig[None, :]), sr_layout)
            s = warpgroup_mma(qr_smem, r_ring.index(slot).permute((1, 0)), s)
            # The slot's keys, rope rows and scales are read: the producer may refill them.
            partition_barrier()
            mbarrier.arrive(k_empty.index(slot))
            s = gl.where(valid[None, :], gl.convert_layout(s, s_layout) * sm_scale_log2, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 1))
            p, l_i, alpha = _softmax_p_alpha(s, m_i, m_new, l_i)
            # P' = P sigma 2^(8 - e) <= 256, e per row (p_exponent) from max_j (score_j - m + log2
            # sigma_j) relative to the maximum; acc carries 2^(e - 8).
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
            w = gl.max(s - m_use[:, None] + lsig[None, :], 1)
            e = gl.where(w == float("-inf"), e_prev, gl.ceil(w))
            e = gl.minimum(gl.maximum(e, -E_MAX), E_MAX)
            p8 = (p * sig[None, :] * _exp2_int(HEADROOM_LOG2 - e)[:, None]).to(gl.float8e4nv)
            acc = acc * gl.convert_layout(alpha * _exp2_int(e_prev - e), row_o)[:, None]
            vslot = i % VT_STAGES
            acc = warpgroup_mma(gl.convert_layout(p8, p_layout), vt_mine.index(vslot).permute((1, 0)),
                                acc)
            partition_barrier()
            mbarrier.arrive(v_empty.index(vslot))
            m_i = m_new
            e_prev = e
        out = acc * gl.convert_layout(_exp2_int(e_prev - HEADROOM_LOG2), row_o)[:, None]
        _store_output(out, m_i, l_i, OUT, LSE, t, hb, stride_ot, stride_oh, stride_lt, H, WG * V_HALF, V_HALF, WG == 0, row_s, o_layout,
                      q8_smem, False)

    # TOPK == 1 would become a constant, and Triton 3.6 fails to compile the one-block loop then.
    @gluon.jit(do_not_specialize=["TOPK"])
    def _fp8_mma_fwd_kernel(
        Q, KV, KV_SCALE, KV_ROPE, IDX, OUT, LSE,
        stride_qt, stride_qh, stride_kvs, stride_ss, stride_rs, stride_it, stride_ot, stride_oh, stride_lt,
        S_KV, TOPK, H, sm_scale_log2,
        BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, PROBE_SKIP: gl.constexpr,
        VT_STAGES: gl.constexpr, AHEAD: gl.constexpr, SPLIT: gl.constexpr, COPIER: gl.constexpr, COPIER_REGS: gl.constexpr,
    ):
        t, hb = _program_coords(H)
        HALF: gl.constexpr = BLOCK_N // 2
        vec: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        q8_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_LAT], gl.float8e4nv)
        qr_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_ROPE], gl.bfloat16)
        k8_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D_LAT], gl.float8e4nv)
        vt_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([V_HALF, BLOCK_N], gl.float8e4nv)
        r_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D_ROPE], gl.bfloat16)
        p8_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, HALF], gl.float8e4nv)
        q8_smem = gl.allocate_shared_memory(gl.float8e4nv, [BLOCK_H, D_LAT], q8_layout)
        qr_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, D_ROPE], qr_layout)
        qs_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_H], vec)
        k8_ring = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, D_LAT], k8_layout)
        # The transposed tiles, one allocation per consumer warpgroup's 256 value columns.
        vt_lo = gl.allocate_shared_memory(gl.float8e4nv, [VT_STAGES, V_HALF, BLOCK_N], vt_layout)
        vt_hi = gl.allocate_shared_memory(gl.float8e4nv, [VT_STAGES, V_HALF, BLOCK_N], vt_layout)
        r_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D_ROPE], r_layout)
        ok_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N], vec)
        sig_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_N], vec)
        lsig_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_N], vec)
        xmax = gl.allocate_shared_memory(gl.float32, [2, BLOCK_H], vec)
        wmax = gl.allocate_shared_memory(gl.float32, [2, BLOCK_H], vec)
        lsum = gl.allocate_shared_memory(gl.float32, [2, BLOCK_H], vec)
        p8_half = gl.allocate_shared_memory(gl.float8e4nv, [2, BLOCK_H, HALF], p8_layout)
        full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [VT_STAGES, 1], mbarrier.MBarrierLayout())
        landed = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())  # COPIER=1 only
        bar_x = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        bar_p = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        bar_l = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(full.index(s), count=1)
            mbarrier.init(k_empty.index(s), count=2)
            mbarrier.init(landed.index(s), count=1)
        for s in gl.static_range(VT_STAGES):
            mbarrier.init(v_empty.index(s), count=2)
        for w in gl.static_range(2):
            mbarrier.init(bar_x.index(w), count=1)
            mbarrier.init(bar_p.index(w), count=1)
            mbarrier.init(bar_l.index(w), count=1)
        _quantize_q(Q, q8_smem, qr_smem, qs_smem, t, hb, stride_qt, stride_qh, H)
        fence_async_shared()
        partition_barrier()
        if COPIER:
            gl.warp_specialize(
                [
                    (_consumer_fp8_mma, (q8_smem, qr_smem, qs_smem, k8_ring, vt_lo, r_ring, ok_ring, sig_ring, lsig_ring, full,
                                         k_empty, v_empty, xmax, wmax, p8_half, lsum, bar_x, bar_p, bar_l, OUT, LSE, stride_ot, stride_oh,
                                         stride_lt, TOPK, H, sm_scale_log2, 0, BLOCK_N, STAGES, VT_STAGES, PROBE_SKIP, 1)),
                    (_consumer_fp8_mma, (q8_smem, qr_smem, qs_smem, k8_ring, vt_hi, r_ring, ok_ring, sig_ring, lsig_ring, full,
                                         k_empty, v_empty, xmax, wmax, p8_half, lsum, bar_x, bar_p, bar_l, OUT, LSE, stride_ot, stride_oh,
                                         stride_lt, TOPK, H, sm_scale_log2, 1, BLOCK_N, STAGES, VT_STAGES, PROBE_SKIP, 1)),
                    (_transposer_fp8_mma, (k8_ring, vt_lo, vt_hi, ok_ring, sig_ring, lsig_ring, landed, full, v_empty, TOPK, BLOCK_N, STAGES,
                                           VT_STAGES, PROBE_SKIP)),
                    (_copier_fp8_mma, (k8_ring, r_ring, ok_ring, sig_ring, landed, k_empty, KV, KV_SCALE, KV_ROPE, IDX, stride_kvs,
                                       stride_ss, stride_rs, stride_it, S_KV, TOPK, H, BLOCK_N, STAGES)),
                ],
                [4, 4, 4],
                [CONSUMER_REGS, PRODUCER_REGS, COPIER_REGS],
            )
        elif SPLIT:
            gl.warp_specialize(
                [
                    (_consumer_fp8_mma, (q8_smem, qr_smem, qs_smem, k8_ring, vt_lo, r_ring, ok_ring, sig_ring, lsig_ring, full,
                                         k_empty, v_empty, xmax, wmax, p8_half, lsum, bar_x, bar_p, bar_l, OUT, LSE, stride_ot, stride_oh,
                                         stride_lt, TOPK, H, sm_scale_log2, 0, BLOCK_N, STAGES, VT_STAGES, PROBE_SKIP, 0)),
                    (_consumer_fp8_mma, (q8_smem, qr_smem, qs_smem, k8_ring, vt_hi, r_ring, ok_ring, sig_ring, lsig_ring, full,
                                         k_empty, v_empty, xmax, wmax, p8_half, lsum, bar_x, bar_p, bar_l, OUT, LSE, stride_ot, stride_oh,
                                         stride_lt, TOPK, H, sm_scale_log2, 1, BLOCK_N, STAGES, VT_STAGES, PROBE_SKIP, 0)),
                    (_producer_fp8_mma, (k8_ring, vt_lo, vt_hi, r_ring, ok_ring, sig_ring, lsig_ring, full, k_empty, v_empty, KV,
                                         KV_SCALE, KV_ROPE, IDX, stride_kvs, stride_ss, stride_rs, stride_it, S_KV, TOPK, H, BLOCK_N,
                                         STAGES, VT_STAGES, AHEAD, PROBE_SKIP)),
                ],
                [4, 4],
                [CONSUMER_REGS, PRODUCER_REGS],
            )
        else:
            gl.warp_specialize(
                [
                    (_consumer_fp8_mma_whole, (q8_smem, qr_smem, qs_smem, k8_ring, vt_lo, r_ring, ok_ring, sig_ring, lsig_ring, full,
                                               k_empty, v_empty, OUT, LSE, stride_ot, stride_oh, stride_lt, TOPK, H, sm_scale_log2, 0,
                                               BLOCK_N, STAGES, VT_STAGES)),
                    (_consumer_fp8_mma_whole, (q8_smem, qr_smem, qs_smem, k8_ring, vt_hi, r_ring, ok_ring, sig_ring, lsig_ring, full,
                                               k_empty, v_empty, OUT, LSE, stride_ot, stride_oh, stride_lt, TOPK, H, sm_scale_log2, 1,
                                               BLOCK_N, STAGES, VT_STAGES)),
                    (_producer_fp8_mma, (k8_ring, vt_lo, vt_hi, r_ring, ok_ring, sig_ring, lsig_ring, full, k_empty, v_empty, KV,
                                         KV_SCALE, KV_ROPE, IDX, stride_kvs, stride_ss, stride_rs, stride_it, S_KV, TOPK, H, BLOCK_N,
                                         STAGES, VT_STAGES, AHEAD, PROBE_SKIP)),
                ],
                [4, 4],
                [CONSUMER_REGS, PRODUCER_REGS],
            )


def compile_for_hopper(launch: Optional[dict] = None):
    """The kernel compiled for sm_90 on any machine (no GPU needed): shared memory, registers, PTX."""
    cfg = dict(LAUNCH, **(launch or {}))
    check_launch(cfg)
    return compile_products_kernel(_fp8_mma_fwd_kernel, cfg, _too_much_shared)


def compile_products_kernel(kernel, cfg: dict, too_much_shared):
    """One of the FP8-products kernels compiled for sm_90 under the checked launch ``cfg``; a
    ValueError (``too_much_shared(cfg, bytes)``) where it needs more shared memory than sm_90 has."""
    compiled = compile_ws_arguments(kernel, True, cfg)
    if compiled.metadata.shared > SHARED_LIMIT:
        raise ValueError(too_much_shared(cfg, compiled.metadata.shared))
    return compiled


def _too_much_shared(cfg: dict, needed) -> str:
    return (f"launch BLOCK_N={cfg['BLOCK_N']} STAGES={cfg['STAGES']} VT_STAGES={cfg['VT_STAGES']} SPLIT={cfg['SPLIT']}: "
            f"{needed} bytes of shared memory, over sm_90's {SHARED_LIMIT}; use fewer STAGES or VT_STAGES")


def check_launch(cfg: dict) -> None:
    """Raises ValueError naming the launch setting this kernel cannot run with."""
    unknown = set(cfg) - set(LAUNCH)
    if unknown:
        raise ValueError(f"launch: unknown setting(s) {sorted(unknown)}; the settings are {sorted(LAUNCH)}")
    check_register_settings(cfg)
    if cfg["COPIER"] not in (0, 1) or (cfg["COPIER"] and not cfg["SPLIT"]):
        raise ValueError(f"launch COPIER={cfg['COPIER']} SPLIT={cfg['SPLIT']}: COPIER 0 or 1 (1 with SPLIT=1 only)")
    if cfg["COPIER"]:
        check_register_settings(dict(CONSUMER_REGS=cfg["COPIER_REGS"], PRODUCER_REGS=cfg["COPIER_REGS"]))
        regs = 2 * cfg["CONSUMER_REGS"] + cfg["PRODUCER_REGS"] + cfg["COPIER_REGS"]
        if regs > COPIER_REG_BUDGET:
            raise ValueError(f"launch COPIER=1 CONSUMER_REGS={cfg['CONSUMER_REGS']} PRODUCER_REGS={cfg['PRODUCER_REGS']} "
                             f"COPIER_REGS={cfg['COPIER_REGS']}: keep 2 * CONSUMER_REGS + PRODUCER_REGS + COPIER_REGS <= "
                             f"{COPIER_REG_BUDGET} (128 registers a thread for 512 threads)")
    elif 2 * cfg["CONSUMER_REGS"] + cfg["PRODUCER_REGS"] > REG_BUDGET:
        raise ValueError(f"launch CONSUMER_REGS={cfg['CONSUMER_REGS']} PRODUCER_REGS={cfg['PRODUCER_REGS']}: keep "
                         f"2 * CONSUMER_REGS + PRODUCER_REGS <= {REG_BUDGET} (168 registers a thread for 384 threads)")
    if cfg["PROBE_SKIP"] == 2 and not cfg["SPLIT"]:
        raise ValueError("launch PROBE_SKIP=2 SPLIT=0: the rescale probe is in the split consumers only")
    if cfg["PROBE_SKIP"] not in (0, 1, 2):
        raise ValueError(f"launch PROBE_SKIP={cfg['PROBE_SKIP']}: 0, or 1 / 2 for the timing probes without transposes / "
                         "without the value accumulator's rescale")
    if cfg["BLOCK_N"] not in (32, 64) or cfg["SPLIT"] not in (0, 1) or (cfg["SPLIT"] and cfg["BLOCK_N"] != 64):
        raise ValueError(f"launch BLOCK_N={cfg['BLOCK_N']} SPLIT={cfg['SPLIT']}: BLOCK_N 32 or 64, SPLIT 0 or 1 (1 with BLOCK_N 64 only)")
    if not 1 <= cfg["AHEAD"] < cfg["STAGES"] or cfg["VT_STAGES"] < 1:
        raise ValueError(f"launch AHEAD={cfg['AHEAD']} STAGES={cfg['STAGES']} VT_STAGES={cfg['VT_STAGES']}: keep "
                         "1 <= AHEAD < STAGES (the slot of block i + AHEAD frees after block i - 1) and VT_STAGES >= 1")


def forward(q, kv_latent, kv_scale, kv_rope, indices, sm_scale: float, launch: Optional[dict] = None):
    """out [T, H, 512] and lse [T, H] with e4m3 products (see the module docstring for the two
    extra roundings): q [T, H, 576] bf16, kv_latent e4m3 [S, 512], kv_scale float32 [S, 1], kv_rope
    bf16 [S, 64], indices [T, 1, topk] int32."""
    cfg = dict(LAUNCH, **(launch or {}))
    check_launch(cfg)
    kernel = _fp8_mma_fwd_kernel if HAVE_GLUON else None  # declined before it is needed without Gluon
    return run_products_kernel(kernel, q, kv_latent, kv_scale, kv_rope, indices, sm_scale, cfg, _too_much_shared)


def run_products_kernel(kernel, q, kv_latent, kv_scale, kv_rope, indices, sm_scale: float, cfg: dict, too_much_shared) -> tuple:
    """(out [T, H, 512], lse [T, H]) from one of the FP8-products kernels, a program a query token
    and 64 heads, under the checked launch ``cfg``: the call checked (``declines``), the outputs
    allocated, the launch (``too_much_shared(cfg, bytes)`` words the error where the compiler finds
    too little shared memory)."""
    problem = declines(q, kv_latent, kv_scale, kv_rope, _D_LAT)
    if problem is not None:
        raise ValueError(f"the FP8-MMA kernel does not take this call: {problem}")
    t, heads, _ = q.shape
    q, indices = q.contiguous(), indices.contiguous()
    out = torch.empty((t, heads, _D_LAT), dtype=q.dtype, device=q.device)
    lse = torch.empty((t, heads), dtype=torch.float32, device=q.device)
    if t == 0:
        return out, lse
    check_row_counts(kv_latent, kv_rope, kv_scale)
    try:
        kernel[(t * triton.cdiv(heads, _BLOCK_H),)](
            q, kv_latent, kv_scale, kv_rope, indices, out, lse,
            q.stride(0), q.stride(1), kv_latent.stride(0), kv_scale.stride(0), kv_rope.stride(0),
            indices.stride(0), out.stride(0), out.stride(1), lse.stride(0),
            kv_latent.shape[0], indices.shape[-1], heads, float(sm_scale) * LOG2E,
            num_warps=4, **cfg,
        )
    except OutOfResources as e:  # the compiler's count of the shared memory, not an estimate
        raise ValueError(too_much_shared(cfg, getattr(e, "required", "too many"))) from e
    return out, lse
