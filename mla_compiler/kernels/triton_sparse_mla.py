"""Triton sparse MLA, forward and backward. The pure-torch reference beside it is reference.py.

Forward: one program per (query token, key group, block of BLOCK_H heads). It walks the token's
top-k indices BLOCK_N at a time, gathers those key rows once (latent part ``D_A`` wide and the
rest, rope, ``D_B`` wide) and uses them for all BLOCK_H heads: S = Q_a K_a^T + Q_b K_b^T, online
softmax in base 2 (the scale folded with log2 e), O += P V with V the first d_v columns of the same
rows (the loaded latent tile itself when d_v == D_A). Gathering once per key block for many heads
is what keeps the kernel compute-bound. When the programs would not fill the GPU (decode at small
batch, few heads), SPLITS programs share a (token, head block)'s top-k and _combine_kernel merges
their unnormalized states (flash-decoding). The FP8-latent variant gathers the FP8 rows and
dequantizes them in registers in the form DEQUANT names (see forward_fp8).

Backward, three passes over chunks of tokens, none carrying a wide accumulator: (1) per (token,
head block) the same walk recomputes P from the saved lse, dP = dO V^T, dS = P (dP - delta), and
writes dS and P in bf16; (2) per (column block, token) dQ = scale * dS K, a gathered GEMM;
(3) per (column block, token) dK = scale * dS^T Q and dV = P^T dO summed over all heads, then
added into an fp32 dKV with one atomic add per element (several queries select the same key). Atomics make dKV's summation order, hence its last bits, vary between runs;
``MLA_COMPILER_DETERMINISTIC=1`` (or ``torch.use_deterministic_algorithms(True)``) takes a
deterministic path: pass (2) writes each (token, slot) row to a buffer and a sorted ``index_put_``
adds them in a fixed order.

Widths are parameters: d_qk is split as D_A (the largest power of two <= d_qk) + D_B (the rest,
padded to a power of two and masked), so DeepSeek's 576 = 512 + 64 and NAM56R's 128 = 128 + 0 need
no padding. Heads are padded to BLOCK_H with masks; topk needs not be a multiple of BLOCK_N.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from mla_compiler.errors import SparseAttnArgumentError
from mla_compiler.kernels.gluon_common import sm_count

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
ENV_DETERMINISTIC = "MLA_COMPILER_DETERMINISTIC"


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _prev_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _split_width(d_qk: int) -> tuple[int, int]:
    d_a = _prev_pow2(d_qk)
    rest = d_qk - d_a
    d_b = 0 if rest == 0 else max(16, triton.next_power_of_2(rest))
    return d_a, d_b


def declines(problem) -> Optional[str]:
    """Why the Triton kernel does not take ``problem``, or None when it does."""
    if problem.device_type != "cuda" and not (problem.device_type == "cpu" and interpreted()):
        return f"{problem.device_type} tensors need TRITON_INTERPRET=1"
    if problem.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {problem.dtype} (bf16, fp16 or fp32 only)"
    if problem.d_qk < 16 or problem.d_v < 1:
        return f"d_qk {problem.d_qk} below 16"
    d_a, d_b = _split_width(problem.d_qk)
    if d_a > 512 or d_b > 256 or triton.next_power_of_2(problem.d_v) > 512:
        return f"d_qk {problem.d_qk} / d_v {problem.d_v} wider than one program's tiles (512 + 256 / 512)"
    return None


def forward_member(problem) -> str:
    """Which forward of this family runs ``problem`` on a GPU, as far as its shapes tell: the Gluon
    kernels also check the GPU, row alignment, sink and ``topk_length`` when called, and fall back
    to the Triton forward (``WS_DECLINED`` / ``FEWHEAD_DECLINED`` say why; ``LAST_LAUNCH`` says what ran).
    With ``fp8_products`` (``make_backend(fp8_products=True)`` or ``"two_term"``) or
    ``MLA_COMPILER_FP8_MMA=1`` (or 2) an FP8 call tries the FP8-products kernel first
    (gluon_fp8_mma_split; ``FP8_MMA_DECLINED``)."""
    from mla_compiler.kernels import gluon_fewhead as fh
    from mla_compiler.kernels import gluon_fp8_mma as fm
    from mla_compiler.kernels import gluon_sparse_mla as ws
    from mla_compiler.kernels.gluon_common import switched_off
    from mla_compiler.lowering.dispatch import PRODUCT_TERMS_TEXT

    deepseek = problem.d_qk == 576 and problem.d_v == 512 and problem.h_kv == 1 and problem.dtype == torch.bfloat16
    if problem.fp8_layout is not None:
        deepseek = deepseek and tuple(problem.fp8_layout) in ((512, 64, 1), (512, 64, 4))
    terms = fm.product_terms(problem.fp8_products)
    products = terms > 0 and not switched_off(fm.ENV_OFF)  # =0 switches it off even when asked for
    if deepseek and problem.heads >= 64 and tuple(problem.fp8_layout or ()) == (512, 64, 1) and products:
        why = "fp8_products" if problem.fp8_products else f"MLA_COMPILER_FP8_MMA={terms}"
        return (f"forward: the FP8-products Gluon kernel on Hopper ({why}: {PRODUCT_TERMS_TEXT[terms]}) when the "
                "(token, 64-head) programs fill the SMs, else Triton")
    if deepseek and problem.heads >= 64 and not switched_off(ws.ENV_OFF):
        return "forward: the warp-specialized Gluon kernel on Hopper when the (token, 64-head) programs fill the SMs, else Triton"
    if deepseek and problem.heads <= fh.MAX_HEADS and not switched_off(fh.ENV_OFF):
        ws_form = " (warp-specialized, keys as warpgroup MMA rows, for FP8 keys)" if problem.fp8_layout is not None else ""
        return f"forward: the few-head Gluon kernel{ws_form} on Hopper with 16-byte rows, else Triton"
    return "forward: Triton"


class LaunchPolicy:
    """Candidate launch configurations per shape family, best first; a launch takes the first that
    fits the device (``OutOfResources`` moves on to the next) and remembers it per shape.

    DeepSeek (576/512) and NAM56R (128/64) differ 4x in width: the wide one is bound by the
    64x512 fp32 accumulator in registers and by shared memory for 512-wide operands (the backward
    uses Q and dO in two operand roles each), the narrow one can take more keys per step.
    """

    @staticmethod
    def heads(hpg: int, cap: int = 64) -> int:
        """Heads per program: the group's heads padded to a power of two, 16 to ``cap``."""
        return min(cap, max(16, triton.next_power_of_2(hpg)))

    @staticmethod
    def forward(d_qk: int, d_v: int, hpg: int, dtype: torch.dtype) -> list[dict]:
        block_h = LaunchPolicy.heads(hpg)
        if interpreted():
            return [dict(BLOCK_H=block_h, BLOCK_N=16, num_warps=4, num_stages=1)]
        small_h = min(block_h, 32)
        if d_qk > 256 and block_h < 64:
            # Few heads (16 a GPU: DeepSeek-V3.2 at TP 8) are bound by loads in flight, not by the
            # accumulator: H200 decode b64 h16, 32 keys x 4 warps x 3 stages, 0.116 ms vs 0.134 ms
            # for 64 x 8 x 2 (benchmarks/bench_decode_launch.py).
            return [
                dict(BLOCK_H=block_h, BLOCK_N=32, num_warps=4, num_stages=3),
                dict(BLOCK_H=block_h, BLOCK_N=64, num_warps=8, num_stages=2),
                dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1),
            ]
        if d_qk > 256:
            return [
                dict(BLOCK_H=block_h, BLOCK_N=64, num_warps=8, num_stages=2),
                dict(BLOCK_H=block_h, BLOCK_N=32, num_warps=8, num_stages=2),
                dict(BLOCK_H=small_h, BLOCK_N=32, num_warps=4, num_stages=1),
                dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1),
            ]
        return [
            dict(BLOCK_H=block_h, BLOCK_N=64, num_warps=4, num_stages=3),
            dict(BLOCK_H=block_h, BLOCK_N=32, num_warps=4, num_stages=2),
            dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1),
        ]

    @staticmethod
    def forward_fp8(d_qk: int, d_v: int, heads: int, dtype: torch.dtype, n_tiles: int) -> list[dict]:
        """The forward's launches with the FP8 latent's dequantization form (DEQUANT, PREFETCH).
        Measured on H200 (benchmarks/RESULTS.md, FP8 section): e4m3 x scale in fp32 is the fastest
        form for per-tile scales, and for one scale per row with 64-head blocks (register-bound);
        with few heads (load-bound) one scale per row folded into scores and P, with the next
        block prefetched, is."""
        per_row = n_tiles == 1
        block_h = LaunchPolicy.heads(heads)
        few_heads = block_h < 64
        launches = LaunchPolicy.forward(d_qk, d_v, heads, dtype)
        # Folding multiplies P by the row scales in the compute dtype: fp16's range would
        # underflow small scales, so only bf16 (fp32's exponent range) folds.
        fold = per_row and dtype == torch.bfloat16
        if interpreted():
            form = dict(DEQUANT=DEQUANT_FOLD if fold else DEQUANT_FP32)
        elif fold and few_heads:
            form = dict(DEQUANT=DEQUANT_FOLD, PREFETCH=True)
        else:
            form = dict(DEQUANT=DEQUANT_FP32)
            if few_heads and d_qk > 256:
                # Per-tile scales with few heads: one stage (no shared-memory ring for the gathered
                # rows) measured 0.191 ms vs 0.270 ms for three (H200, decode b64 h16).
                launches = [dict(BLOCK_H=block_h, BLOCK_N=32, num_warps=4, num_stages=1)] + launches
        return [dict(cfg, **form) for cfg in launches]

    @staticmethod
    def splits(programs: int, topk: int, block_n: int, sms: int) -> int:
        """How many programs share one (token, head block)'s top-k: enough to give every SM a
        program when the tokens alone do not (decode at small batch or with few heads), each
        getting about 8 key blocks or more (the last may get fewer), none empty (H200,
        bench_decode_launch.py: batch 2 and 8 at 128 heads measured best at 4 splits of 2048
        keys, batch 64 at 16 heads at 2)."""
        if programs >= sms:
            return 1
        wanted = max(1, min(triton.cdiv(sms, programs), topk // (8 * block_n), 16))
        # The kernel gives each split cdiv(blocks, splits) whole blocks: drop splits left empty.
        blocks = triton.cdiv(topk, block_n)
        return triton.cdiv(blocks, triton.cdiv(blocks, wanted))

    @staticmethod
    def backward(d_qk: int, d_v: int, hpg: int, dtype: torch.dtype) -> list[dict]:
        block_h = LaunchPolicy.heads(hpg)
        if interpreted():
            return [dict(BLOCK_H=block_h, BLOCK_N=16, num_warps=4, num_stages=1)]
        small_h = min(block_h, 32)
        if d_qk > 256:
            # Measured on H200 (benchmarks/RESULTS.md): 64 heads x 32 keys, 4 warps, 3 stages.
            return [
                dict(BLOCK_H=block_h, BLOCK_N=32, num_warps=4, num_stages=3),
                dict(BLOCK_H=block_h, BLOCK_N=64, num_warps=8, num_stages=1),
                dict(BLOCK_H=small_h, BLOCK_N=32, num_warps=8, num_stages=1),
                dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1),
            ]
        return [
            dict(BLOCK_H=block_h, BLOCK_N=64, num_warps=4, num_stages=2),
            dict(BLOCK_H=small_h, BLOCK_N=32, num_warps=4, num_stages=1),
            dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1),
        ]

    @staticmethod
    def backward_dq(d_qk: int, d_v: int, hpg: int, dtype: torch.dtype) -> list[dict]:
        # All of a group's heads per program (each gathered key row serves them all), up to 128.
        block_h = LaunchPolicy.heads(hpg, 128)
        if interpreted():
            return [dict(BLOCK_H=min(block_h, 32), BLOCK_N=16, BLOCK_C=32, num_warps=4, num_stages=1)]
        return [
            dict(BLOCK_H=block_h, BLOCK_N=64, BLOCK_C=128, num_warps=8, num_stages=3),
            dict(BLOCK_H=min(block_h, 64), BLOCK_N=64, BLOCK_C=64, num_warps=4, num_stages=2),
            dict(BLOCK_H=16, BLOCK_N=32, BLOCK_C=64, num_warps=4, num_stages=1),
        ]

    @staticmethod
    def backward_dkv(d_qk: int, d_v: int, hpg: int, dtype: torch.dtype) -> list[dict]:
        # All of a group's heads in one block (one atomic per element) up to 128 heads.
        block_hh = LaunchPolicy.heads(hpg, 128)
        if interpreted():
            return [dict(BLOCK_N=16, BLOCK_C=32, BLOCK_HH=min(block_hh, 32), num_warps=4, num_stages=1)]
        # Measured on H200 for both families: 64 slots x 64 columns, 4 warps, 3 stages.
        return [
            dict(BLOCK_N=64, BLOCK_C=64, BLOCK_HH=block_hh, num_warps=4, num_stages=3),
            dict(BLOCK_N=64, BLOCK_C=128, BLOCK_HH=block_hh, num_warps=8, num_stages=2),
            dict(BLOCK_N=32, BLOCK_C=64, BLOCK_HH=min(block_hh, 32), num_warps=4, num_stages=1),
        ]


_FITTED: dict = {}


def _launch(kernel, name: str, key: tuple, candidates: list[dict], grid_of, args: tuple, constexprs: dict):
    """Launch with the first candidate that fits the device; remember it for ``key``."""
    from triton.runtime.errors import OutOfResources

    tried = [_FITTED[key]] if key in _FITTED else candidates
    last = None
    for cfg in tried:
        try:
            compiled = kernel[grid_of(cfg)](*args, **{**constexprs, **cfg})
        except OutOfResources as exc:
            last = exc
            continue
        _FITTED[key] = cfg
        _record(name, compiled, cfg)
        return cfg
    raise RuntimeError(f"sparse_mla {name}: no launch configuration fits this device ({last}); tried {tried}")


@triton.jit
def _mm(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. IEEE: exact fp32 products (no tf32) for fp32 inputs. UPCAST:
    operands in fp32, used only by the CPU interpreter, whose bf16/fp16 dot is wrong."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _row_starts(base, rows, stride_bytes):
    """Pointers to the given rows of a table whose row pitch is given in bytes. FP8 caches pack
    a row's parts at a pitch that is a multiple of 16 bytes but not of 16 elements (FlashMLA's 656
    bytes: 328 bf16 rope values, 164 fp32 scales); counted in bytes, the launch's specialization
    sees the 16-byte rows and the loads stay 16 bytes wide."""
    row_bytes = base.to(tl.pointer_type(tl.uint8), bitcast=True) + rows * stride_bytes
    return row_bytes.to(tl.pointer_type(base.dtype.element_ty), bitcast=True)


@triton.jit
def _gather_block(
    kv_grp, idx_row, n0, n_end, S_KV, offs_a, stride_kvs, KV_SCALE, stride_ss, KV_ROPE, stride_rs,
    D_A: tl.constexpr, D_B: tl.constexpr, D_QK: tl.constexpr, FP8: tl.constexpr, N_TILES: tl.constexpr,
    BLOCK_N: tl.constexpr, DEQUANT: tl.constexpr, WITH_ROPE: tl.constexpr,
):
    """Memory side of one key block: its indices, which are valid, the gathered latent rows (bf16
    [BLOCK_N, D_A]; FP8 [BLOCK_N, D_A], or [BLOCK_N, N_TILES, D_A / N_TILES] with per-tile scales),
    the FP8 scales ([BLOCK_N] per row for DEQUANT_FOLD, [BLOCK_N, N_TILES] otherwise) and the rope
    part ([BLOCK_N, D_B] with WITH_ROPE; the latent again otherwise). FP8 scale and rope pitches
    (stride_ss, stride_rs) are in bytes."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    idx = tl.load(idx_row + offs_n, mask=offs_n < n_end, other=-1)
    valid = (idx >= 0) & (idx < S_KV)
    rows = idx.to(tl.int64)
    if FP8 and DEQUANT < 2:
        tile: tl.constexpr = D_A // N_TILES
        offs_t = tl.arange(0, N_TILES)
        p3 = kv_grp + rows[:, None, None] * stride_kvs + offs_t[None, :, None] * tile + tl.arange(0, tile)[None, None, :]
        raw = tl.load(p3, mask=valid[:, None, None], other=0.0)
        sc = tl.load(_row_starts(KV_SCALE, rows, stride_ss)[:, None] + offs_t[None, :], mask=valid[:, None], other=0.0)
    else:
        raw = tl.load(kv_grp + rows[:, None] * stride_kvs + offs_a[None, :], mask=valid[:, None], other=0.0)
        if FP8:
            sc = tl.load(_row_starts(KV_SCALE, rows, stride_ss), mask=valid, other=0.0)
        else:
            sc = tl.full([BLOCK_N], 1.0, tl.float32)
    if WITH_ROPE:
        k_b = _gather_rope(kv_grp, rows, valid, stride_kvs, KV_ROPE, stride_rs, D_A, D_B, D_QK, FP8)
    else:
        k_b = raw
    return idx, valid, raw, sc, k_b


@triton.jit
def _gather_rope(kv_grp, rows, valid, stride_kvs, KV_ROPE, stride_rs, D_A: tl.constexpr, D_B: tl.constexpr, D_QK: tl.constexpr, FP8: tl.constexpr):
    """The rope part of a key block's rows, [BLOCK_N, D_B]: the columns after the latent in bf16
    keys, KV_ROPE's rows (pitch in bytes) beside an FP8 latent."""
    if D_B > 0:
        offs_kb = D_A + tl.arange(0, D_B)
        # A rope part that fills its padded width needs no column mask: the row mask alone keeps
        # the loads 16 bytes wide (a column mask splits them into 2-byte loads).
        b_mask = valid[:, None] if D_A + D_B == D_QK else valid[:, None] & (offs_kb[None, :] < D_QK)
        if FP8:
            k_b = tl.load(_row_starts(KV_ROPE, rows, stride_rs)[:, None] + (offs_kb - D_A)[None, :], mask=b_mask, other=0.0)
        else:
            k_b = tl.load(kv_grp + rows[:, None] * stride_kvs + offs_kb[None, :], mask=b_mask, other=0.0)
    else:
        k_b = valid  # no rope part: never read
    return k_b


@triton.jit
def _latent_operand(raw, sc, D_A: tl.constexpr, FP8: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_N: tl.constexpr, DEQUANT: tl.constexpr):
    """The latent block as the MMA takes it, in registers: FP8 is dequantized as DEQUANT says (see
    forward_fp8); with DEQUANT_FOLD it stays unscaled and the caller applies the row scales."""
    if not FP8 or DEQUANT == 4:
        return raw
    elif DEQUANT >= 2:
        return raw.to(COMPUTE)  # e4m3 -> bf16 is exact
    elif DEQUANT == 1:
        # In the compute dtype (bf16): exact for power-of-two scales, half the registers of fp32.
        return tl.reshape(raw.to(COMPUTE) * sc.to(COMPUTE)[:, :, None], (BLOCK_N, D_A))
    else:
        return tl.reshape((raw.to(tl.float32) * sc[:, :, None]).to(COMPUTE), (BLOCK_N, D_A))


@triton.jit
def _finish(acc, m_i, l_i, heads, h_ok, o_row, lse_row, SINK, stride_oh, DV: tl.constexpr, DV_P: tl.constexpr, HAS_SINK: tl.constexpr):
    """Normalize one block of heads' accumulator (m in base 2) and store the output and lse."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    out = acc / l_safe[:, None]
    if HAS_SINK:
        sink = tl.load(SINK + heads, mask=h_ok, other=0.0)
        # out * exp(lse) / (exp(lse) + exp(sink)) = out * sigmoid(lse - sink); an empty row stays 0.
        w = tl.where(empty, 0.0, 1.0 / (1.0 + tl.exp(sink - tl.where(empty, 0.0, lse))))
        out = out * w[:, None]
    offs_o = tl.arange(0, DV_P)
    o_ptr = o_row + heads[:, None] * stride_oh + offs_o[None, :]
    tl.store(o_ptr, out.to(o_row.dtype.element_ty), mask=h_ok[:, None] & (offs_o[None, :] < DV))
    tl.store(lse_row + heads, lse, mask=h_ok)


@triton.jit
def _fwd_kernel(
    Q, KV, IDX, OUT, LSE, SINK, TOPK_LEN,
    stride_qt, stride_qh,
    stride_kvs, stride_kvg,
    stride_it, stride_ig,
    stride_ot, stride_oh,
    stride_lt,
    S_KV, TOPK, HPG, D_QK: tl.constexpr, sm_scale_log2,
    D_A: tl.constexpr, D_B: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr,
    V_IS_A: tl.constexpr, HAS_SINK: tl.constexpr, HAS_TOPK_LEN: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, RELOAD_Q: tl.constexpr = False, WARP_SPECIALIZE: tl.constexpr = False,
    KV_SCALE=None, KV_ROPE=None, stride_ss=0, stride_rs=0, FP8: tl.constexpr = False, N_TILES: tl.constexpr = 1,
    DEQUANT: tl.constexpr = 0, SPLITS: tl.constexpr = 1, PARTIAL=None, PREFETCH: tl.constexpr = False,
):
    # Axis 0 is (token, head block, split) with the split and then the head block varying fastest:
    # a token's programs run side by side, so they share its gathered rows in L2.
    per_token = tl.cdiv(HPG, BLOCK_H) * SPLITS
    t = (tl.program_id(0) // per_token).to(tl.int64)  # t * stride passes 2^31 at large T
    g = tl.program_id(1)
    hb = (tl.program_id(0) % per_token) // SPLITS
    split = tl.program_id(0) % SPLITS
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < HPG
    heads = g * HPG + offs_h
    offs_a = tl.arange(0, D_A)
    q_row = Q + t * stride_qt + heads[:, None] * stride_qh
    q_a = tl.load(q_row + offs_a[None, :], mask=h_ok[:, None], other=0.0)
    if D_B > 0:
        offs_b = D_A + tl.arange(0, D_B)
        q_b_mask = h_ok[:, None] if D_A + D_B == D_QK else h_ok[:, None] & (offs_b[None, :] < D_QK)
        q_b = tl.load(q_row + offs_b[None, :], mask=q_b_mask, other=0.0)
    if not V_IS_A:
        offs_v = tl.arange(0, DV_P)
    if DEQUANT >= 3:
        # FP8 tensor cores for Q K^T: Q's latent part quantized to e4m3 once, one scale per head.
        q_scale = tl.maximum(tl.max(tl.abs(q_a.to(tl.float32)), 1), 1e-30) / 448.0
        q8 = (q_a.to(tl.float32) / q_scale[:, None]).to(KV.dtype.element_ty)
    topk = TOPK
    if HAS_TOPK_LEN:
        topk = tl.minimum(tl.load(TOPK_LEN + t), TOPK)
    # This program's share of the top-k: all of it, or one of SPLITS whole-block chunks (decode
    # with few tokens: more programs in flight, merged by _combine_kernel).
    chunk = tl.cdiv(tl.cdiv(TOPK, SPLITS), BLOCK_N) * BLOCK_N
    n_lo = split * chunk
    n_hi = tl.minimum(n_lo + chunk, TOPK)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, DV_P], dtype=tl.float32)
    idx_row = IDX + t * stride_it + g * stride_ig
    kv_grp = KV + g * stride_kvg
    n_end = tl.minimum(topk, n_hi)
    if PREFETCH:
        # The next block's latent and scales are loaded into registers while this one is used,
        # instead of the compiler's shared-memory ring (which the dequantization reads back into
        # registers): a gain with few heads, where registers are free (benchmarks/RESULTS.md). The
        # rope stays a load of the step itself: prefetched too, its registers cost spills.
        idx_nx, valid_nx, raw_nx, sc_nx, _ = _gather_block(kv_grp, idx_row, n_lo, n_end, S_KV, offs_a, stride_kvs, KV_SCALE, stride_ss, KV_ROPE, stride_rs, D_A, D_B, D_QK, FP8, N_TILES, BLOCK_N, DEQUANT, False)
    for n0 in tl.range(n_lo, n_hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        if PREFETCH:
            idx, valid, raw, sc = idx_nx, valid_nx, raw_nx, sc_nx
            idx_nx, valid_nx, raw_nx, sc_nx, _ = _gather_block(kv_grp, idx_row, n0 + BLOCK_N, n_end, S_KV, offs_a, stride_kvs, KV_SCALE, stride_ss, KV_ROPE, stride_rs, D_A, D_B, D_QK, FP8, N_TILES, BLOCK_N, DEQUANT, False)
            k_b = _gather_rope(kv_grp, idx.to(tl.int64), valid, stride_kvs, KV_ROPE, stride_rs, D_A, D_B, D_QK, FP8)
        else:
            idx, valid, raw, sc, k_b = _gather_block(kv_grp, idx_row, n0, n_end, S_KV, offs_a, stride_kvs, KV_SCALE, stride_ss, KV_ROPE, stride_rs, D_A, D_B, D_QK, FP8, N_TILES, BLOCK_N, DEQUANT, True)
        k_rows = kv_grp + idx.to(tl.int64)[:, None] * stride_kvs
        k_a = _latent_operand(raw, sc, D_A, FP8, Q.dtype.element_ty, BLOCK_N, DEQUANT)
        if RELOAD_Q:
            # Q read from L1/L2 each step instead of held in registers: frees them for the accumulator.
            q_a = tl.load(q_row + offs_a[None, :], mask=h_ok[:, None], other=0.0)
        if DEQUANT >= 3:
            s = _mm(q8, tl.trans(raw), IEEE, UPCAST) * (q_scale[:, None] * sc[None, :])
        else:
            s = _mm(q_a, tl.trans(k_a), IEEE, UPCAST)
            if DEQUANT == 2:
                s = s * sc[None, :]
        if D_B > 0:
            if RELOAD_Q:
                q_b = tl.load(q_row + offs_b[None, :], mask=q_b_mask, other=0.0)
            s += _mm(q_b, tl.trans(k_b), IEEE, UPCAST)
        s = tl.where(valid[None, :], s * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if V_IS_A:
            v = k_a
        else:
            v = tl.load(k_rows + offs_v[None, :], mask=valid[:, None] & (offs_v[None, :] < DV), other=0.0)
        if DEQUANT == 4:
            # P V on FP8 tensor cores too: P times the row scales over their block maximum, in e4m3.
            c = tl.max(sc, 0)
            c = tl.where(c > 0.0, c, 1.0)
            p8 = (p * (sc / c)[None, :]).to(raw.dtype)
            acc += _mm(p8, raw, IEEE, UPCAST) * c
        else:
            if DEQUANT >= 2:
                p = p * sc[None, :]
            acc += _mm(p.to(v.dtype), v, IEEE, UPCAST)
        m_i = m_new

    if SPLITS == 1:
        _finish(acc, m_i, l_i, heads, h_ok, OUT + t * stride_ot, LSE + t * stride_lt, SINK, stride_oh, DV, DV_P, HAS_SINK)
    else:
        # Unnormalized partial: acc [DV_P], then m (base 2) and l, per (split, token, head).
        n_heads = HPG * tl.num_programs(1)
        part = ((split * (tl.num_programs(0) // per_token) + t) * n_heads + heads).to(tl.int64)
        offs_o = tl.arange(0, DV_P)
        tl.store(PARTIAL + part[:, None] * (DV_P + 2) + offs_o[None, :], acc, mask=h_ok[:, None])
        tl.store(PARTIAL + part * (DV_P + 2) + DV_P, m_i, mask=h_ok)
        tl.store(PARTIAL + part * (DV_P + 2) + DV_P + 1, l_i, mask=h_ok)


@triton.jit
def _combine_kernel(
    PARTIAL, OUT, LSE, SINK, stride_ot, stride_oh, stride_lt, N_HEADS,
    DV: tl.constexpr, DV_P: tl.constexpr, HAS_SINK: tl.constexpr, SPLITS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Merge the SPLITS partial softmax states of one token's block of heads (flash-decoding)."""
    t = tl.program_id(0).to(tl.int64)  # t * stride passes 2^31 at large T
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < N_HEADS
    offs_o = tl.arange(0, DV_P)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, DV_P], dtype=tl.float32)
    for split in tl.static_range(SPLITS):
        part = ((split * tl.num_programs(0) + t) * N_HEADS + heads).to(tl.int64)
        m_s = tl.load(PARTIAL + part * (DV_P + 2) + DV_P, mask=h_ok, other=float("-inf"))
        l_s = tl.load(PARTIAL + part * (DV_P + 2) + DV_P + 1, mask=h_ok, other=0.0)
        a_s = tl.load(PARTIAL + part[:, None] * (DV_P + 2) + offs_o[None, :], mask=h_ok[:, None], other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        w_old = tl.exp2(m_i - m_use)
        w_s = tl.exp2(m_s - m_use)
        l_i = l_i * w_old + l_s * w_s
        acc = acc * w_old[:, None] + a_s * w_s[:, None]
        m_i = m_new
    _finish(acc, m_i, l_i, heads, h_ok, OUT + t * stride_ot, LSE + t * stride_lt, SINK, stride_oh, DV, DV_P, HAS_SINK)


@triton.jit
def _bwd_ds_kernel(
    Q, KV, IDX, DO, LSE2, DELTA, DS, P, TOPK_LEN,
    stride_qt, stride_qh,
    stride_kvs, stride_kvg,
    stride_it, stride_ig,
    stride_dot, stride_doh,
    stride_lt,
    stride_st, stride_sh,
    t0, S_KV, TOPK, HPG, D_QK, sm_scale_log2,
    D_A: tl.constexpr, D_B: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr,
    V_IS_A: tl.constexpr, HAS_TOPK_LEN: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Pass 1 of the backward, for one (token, key group, head block): recompute P from the saved
    lse, dP = dO V^T, dS = P (dP - delta); write dS and P (bf16). No accumulator is carried
    across key blocks, so the tiles can be large. Head blocks vary fastest on axis 0: a token's
    head blocks run side by side and gather its key rows once from HBM, the others from L2 (as
    in the forward)."""
    n_hb = tl.cdiv(HPG, BLOCK_H)
    r = (tl.program_id(0) // n_hb).to(tl.int64)  # row offsets pass 2^31 at large T
    hb = tl.program_id(0) % n_hb
    t = t0 + r
    g = tl.program_id(1)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < HPG
    heads = g * HPG + offs_h
    offs_a = tl.arange(0, D_A)
    offs_v = tl.arange(0, DV_P)
    q_row = Q + t * stride_qt + heads[:, None] * stride_qh
    q_a = tl.load(q_row + offs_a[None, :], mask=h_ok[:, None], other=0.0)
    if D_B > 0:
        offs_b = D_A + tl.arange(0, D_B)
        b_ok = offs_b < D_QK
        q_b = tl.load(q_row + offs_b[None, :], mask=h_ok[:, None] & b_ok[None, :], other=0.0)
    do = tl.load(DO + t * stride_dot + heads[:, None] * stride_doh + offs_v[None, :], mask=h_ok[:, None] & (offs_v[None, :] < DV), other=0.0)
    # lse in base 2, +inf for rows with nothing to attend: P = exp2(s - lse2) is then 0.
    lse2 = tl.load(LSE2 + t * stride_lt + heads, mask=h_ok, other=float("inf"))
    delta = tl.load(DELTA + t * stride_lt + heads, mask=h_ok, other=0.0)
    topk = TOPK
    if HAS_TOPK_LEN:
        topk = tl.minimum(tl.load(TOPK_LEN + t), TOPK)
    idx_row = IDX + t * stride_it + g * stride_ig
    kv_grp = KV + g * stride_kvg
    s_row = r * stride_st + heads[:, None] * stride_sh
    for n0 in range(0, TOPK, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        idx = tl.load(idx_row + offs_n, mask=offs_n < topk, other=-1)
        valid = (idx >= 0) & (idx < S_KV)
        k_rows = kv_grp + idx.to(tl.int64)[:, None] * stride_kvs
        k_a = tl.load(k_rows + offs_a[None, :], mask=valid[:, None], other=0.0)
        s = _mm(q_a, tl.trans(k_a), IEEE, UPCAST)
        if D_B > 0:
            k_b = tl.load(k_rows + offs_b[None, :], mask=valid[:, None] & b_ok[None, :], other=0.0)
            s += _mm(q_b, tl.trans(k_b), IEEE, UPCAST)
        p = tl.exp2(tl.where(valid[None, :], s * sm_scale_log2, float("-inf")) - lse2[:, None])
        if V_IS_A:
            v = k_a
        else:
            v = tl.load(k_rows + offs_v[None, :], mask=valid[:, None] & (offs_v[None, :] < DV), other=0.0)
        dp = _mm(do, tl.trans(v), IEEE, UPCAST)
        ds = p * (dp - delta[:, None])
        st_mask = h_ok[:, None] & (offs_n[None, :] < TOPK)
        tl.store(DS + s_row + offs_n[None, :], ds.to(DS.dtype.element_ty), mask=st_mask)
        tl.store(P + s_row + offs_n[None, :], p.to(P.dtype.element_ty), mask=st_mask)


@triton.jit
def _bwd_dq_kernel(
    KV, IDX, DS, DQ, TOPK_LEN,
    stride_kvs, stride_kvg,
    stride_it, stride_ig,
    stride_st, stride_sh,
    stride_qt, stride_qh,
    t0, S_KV, TOPK, HPG, H_KV, D_QK, sm_scale,
    HAS_TOPK_LEN: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Pass 2: dQ = scale * dS K for one (column block, token, key group, head block): a gathered
    GEMM whose accumulator is only BLOCK_H x BLOCK_C. The column blocks of a token are adjacent
    programs, so they read the token's dS from L2."""
    c = tl.program_id(0)
    rg = tl.program_id(1)
    r = (rg // H_KV).to(tl.int64)  # row offsets pass 2^31 at large T
    g = rg % H_KV
    t = t0 + r
    hb = tl.program_id(2)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < HPG
    heads = g * HPG + offs_h
    cols = c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < D_QK
    topk = TOPK
    if HAS_TOPK_LEN:
        topk = tl.minimum(tl.load(TOPK_LEN + t), TOPK)
    idx_row = IDX + t * stride_it + g * stride_ig
    kv_grp = KV + g * stride_kvg
    s_row = r * stride_st + heads[:, None] * stride_sh
    acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    for n0 in range(0, TOPK, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        idx = tl.load(idx_row + offs_n, mask=offs_n < topk, other=-1)
        valid = (idx >= 0) & (idx < S_KV)
        k = tl.load(kv_grp + idx.to(tl.int64)[:, None] * stride_kvs + cols[None, :], mask=valid[:, None] & col_ok[None, :], other=0.0)
        ds = tl.load(DS + s_row + offs_n[None, :], mask=h_ok[:, None] & (offs_n[None, :] < TOPK), other=0.0)
        acc += _mm(ds.to(k.dtype), k, IEEE, UPCAST)
    dq = DQ + t * stride_qt + heads[:, None] * stride_qh + cols[None, :]
    tl.store(dq, (acc * sm_scale).to(DQ.dtype.element_ty), mask=h_ok[:, None] & col_ok[None, :])


@triton.jit
def _bwd_dkv_kernel(
    Q, DO, IDX, DS, P, DKV,
    stride_qt, stride_qh,
    stride_dot, stride_doh,
    stride_it, stride_ig,
    stride_st, stride_sh,
    stride_dkv_row, stride_dkvg, stride_dkvs,
    t0, S_KV, TOPK, HPG, H_KV, D_QK, sm_scale,
    DV: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, PER_SLOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HH: tl.constexpr,
):
    """dKV for one (column block, token, key group): dK = scale * dS^T Q and dV = P^T dO (first
    d_v columns), summed over the heads of the block before one atomic add per element (per-slot
    rows in the deterministic path). Q and dO of the token's heads stay resident while the
    program walks all the token's slots; the column blocks of a token are adjacent programs, so
    they read dS and P from L2."""
    c = tl.program_id(0)
    rg = tl.program_id(1)
    r = (rg // H_KV).to(tl.int64)  # row offsets pass 2^31 at large T
    g = rg % H_KV
    t = t0 + r
    cols = c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < D_QK
    with_v = c * BLOCK_C < DV
    idx_row = IDX + t * stride_it + g * stride_ig
    for h0 in range(0, HPG, BLOCK_HH):
        offs_h = h0 + tl.arange(0, BLOCK_HH)
        h_ok = offs_h < HPG
        heads = g * HPG + offs_h
        q = tl.load(Q + t * stride_qt + heads[:, None] * stride_qh + cols[None, :], mask=h_ok[:, None] & col_ok[None, :], other=0.0)
        # (all-masked, so free, in column blocks past d_v)
        do = tl.load(DO + t * stride_dot + heads[:, None] * stride_doh + cols[None, :], mask=h_ok[:, None] & (cols[None, :] < DV), other=0.0)
        for n0 in range(0, TOPK, BLOCK_N):
            # Slots past topk_length hold dS = P = 0 (the dQ pass wrote zeros): adding them is harmless.
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < TOPK
            s_ptr = r * stride_st + heads[None, :] * stride_sh + offs_n[:, None]
            s_mask = n_ok[:, None] & h_ok[None, :]
            ds_t = tl.load(DS + s_ptr, mask=s_mask, other=0.0)  # [BLOCK_N, BLOCK_HH]
            acc = _mm(ds_t, q, IEEE, UPCAST) * sm_scale
            if with_v:
                p_t = tl.load(P + s_ptr, mask=s_mask, other=0.0)
                acc += _mm(p_t, do, IEEE, UPCAST)
            if PER_SLOT:
                dst = DKV + (r * H_KV + g) * stride_dkvg + offs_n[:, None] * stride_dkvs + cols[None, :]
                if h0 == 0:
                    tl.store(dst, acc, mask=n_ok[:, None] & col_ok[None, :])
                else:
                    tl.store(dst, tl.load(dst, mask=n_ok[:, None] & col_ok[None, :], other=0.0) + acc, mask=n_ok[:, None] & col_ok[None, :])
            else:
                idx = tl.load(idx_row + offs_n, mask=n_ok, other=-1)
                valid = (idx >= 0) & (idx < S_KV)
                dst = DKV + g * stride_dkvg + idx.to(tl.int64)[:, None] * stride_dkv_row + cols[None, :]
                tl.atomic_add(dst, acc, mask=valid[:, None] & col_ok[None, :], sem="relaxed")


def _geometry(q: torch.Tensor, kv: torch.Tensor, d_v: int):
    t, heads, d_qk = q.shape
    h_kv = kv.shape[1]
    hpg = heads // h_kv
    d_a, d_b = _split_width(d_qk)
    # tl.dot needs every tile dimension >= 16
    return t, heads, d_qk, h_kv, hpg, d_a, d_b, max(16, triton.next_power_of_2(d_v))


# Resource use of the last compiled launch per kernel: registers, spills, shared memory (for tuning).
LAST_LAUNCH: dict = {}


def _record(name: str, compiled, cfg: dict) -> None:
    info = dict(cfg)
    for field in ("n_regs", "n_spills"):
        if hasattr(compiled, field):  # the interpreter compiles nothing
            info[field] = getattr(compiled, field)
    if hasattr(compiled, "metadata"):
        info["shared"] = getattr(compiled.metadata, "shared", None)
    LAST_LAUNCH[name] = info


def forward(q, kv, indices, sm_scale, d_v, attn_sink=None, topk_length=None, launch: Optional[dict] = None):
    q, kv, indices = q.contiguous(), kv.contiguous(), indices.contiguous()
    t, heads, d_qk, h_kv, hpg, d_a, d_b, dv_p = _geometry(q, kv, d_v)
    constexprs = dict(
        D_A=d_a, D_B=d_b, DV=d_v, DV_P=dv_p, V_IS_A=(d_v == d_a),
        IEEE=q.dtype == torch.float32, UPCAST=interpreted() and q.dtype != torch.float32,
    )
    if launch is None and d_a == 512 and d_b == 64 and d_qk == 576:
        # Hopper, DeepSeek widths: a Gluon kernel (warp-specialized or few-head) where one applies.
        out = _gluon_forward(q, kv[:, 0, :512], None, kv[:, 0, 512:], indices, sm_scale, d_v, attn_sink, topk_length, h_kv)
        if out is not None:
            return out
    key = ("fwd", q.device.index, q.dtype, d_qk, d_v, hpg)
    candidates = [dict(launch)] if launch else LaunchPolicy.forward(d_qk, d_v, hpg, q.dtype)
    return _forward_launch("forward", key, q, kv, kv.stride(1), h_kv, indices, sm_scale, d_v, constexprs, attn_sink, topk_length, candidates, bool(launch))


# FP8 latent dequantization (DEQUANT): 0 = e4m3 x scale in fp32; 1 = in the compute dtype (bf16:
# exact for power-of-two scales, FlashMLA's rule; any other scale is rounded to bf16's 8 significant
# bits, 2^-9 relative, far below e4m3's own 2^-4); 2 = one scale per row folded into the scores and P.
DEQUANT_FP32, DEQUANT_COMPUTE, DEQUANT_FOLD = 0, 1, 2
# One scale per row, FP8 tensor cores (Q quantized to e4m3 per head): 3 = Q K^T in FP8, P V in bf16;
# 4 = both in FP8 (P quantized too). Not chosen by default: they add Q's (and P's) e4m3 rounding.
MMA_FP8_QK, MMA_FP8_QK_PV = 3, 4


def _gluon_forward(q, kv_latent, kv_scale, kv_rope, indices, sm_scale, d_v, attn_sink, topk_length, h_kv, products: int = 0):
    """(out, lse) from a Gluon forward where one takes the call: the warp-specialized kernel (64
    heads a key group or more) or the few-head kernel (32 or fewer), after the FP8-products kernel
    where ``products`` (its e4m3 terms of Q and P) or MLA_COMPILER_FP8_MMA=1 / 2 asks for it; None
    where all decline (their reasons recorded)."""
    if interpreted() or q.device.type != "cuda":
        return None
    from mla_compiler.kernels import gluon_fewhead as fh
    from mla_compiler.kernels import gluon_fp8_mma as fm
    from mla_compiler.kernels import gluon_fp8_mma_split as fs
    from mla_compiler.kernels import gluon_sparse_mla as ws

    name = "forward_fp8" if kv_scale is not None else "forward"
    index_reason = None if indices.dtype == torch.int32 else f"indices dtype {indices.dtype} (int32 only)"
    # (module, its declines, label, its reasons, its launch, the launch passed: None for its default)
    kernels = [
        (ws, ws.declines, "gluon warp-specialized", WS_DECLINED,
         ws.default_launch(kv_scale is not None, 1 if kv_scale is None else kv_scale.shape[1]), None),
        (fh, fh.declines, "gluon few-head", FEWHEAD_DECLINED,
         fh.default_launch(kv_scale is not None, 4 if kv_scale is None else kv_scale.shape[1]), None),
    ]
    terms = fm.product_terms(products)
    if kv_scale is not None and terms:  # tried first, only when asked for
        # Scores and values in separate warpgroups, V^T from registers: 0.1177 against 0.1193 ms for
        # gluon_fp8_mma_vregs and 0.1833 for gluon_fp8_mma on H200 at the V3.2 decode shape; two
        # terms 0.1622 (RESULTS.md).
        launch = fs.launch_settings(fs.RESIDUAL_LAUNCH if terms == 2 else None)
        kernels.insert(0, (fs, fm.dispatch_declines, "gluon FP8 products", FP8_MMA_DECLINED, launch, launch))
    else:
        FP8_MMA_DECLINED.pop(name, None)  # not consulted: an earlier call's reason no longer applies
    for k, (module, module_declines, label, declined, launch, passed) in enumerate(kernels):
        reason = index_reason or module_declines(q, kv_latent, kv_scale, kv_rope, d_v, attn_sink, topk_length, h_kv)
        if reason is not None:
            declined[name] = reason
            continue
        out = module.forward(q, kv_latent, kv_scale, kv_rope, indices, sm_scale, launch=passed)
        # Reasons from earlier calls no longer describe this one: the kernel that ran and those
        # after it, not consulted, have none.
        for *_, later_declined, _, _ in kernels[k:]:
            later_declined.pop(name, None)
        LAST_LAUNCH[name] = dict(kernel=label, **getattr(module, "LAST_LAUNCH", None) or launch)
        return out
    return None


# Why the last forward call did not take the warp-specialized / the few-head kernel, per entry
# point (for reports).
WS_DECLINED: dict = {}
FEWHEAD_DECLINED: dict = {}
FP8_MMA_DECLINED: dict = {}  # only where fp8_products or MLA_COMPILER_FP8_MMA=1 / 2 asked for that kernel


def _unit_columns(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` itself when its last axis is unit-stride (or of length 1: a per-row scale, possibly a
    stride-0 view of one per-tensor scale), else a contiguous copy."""
    return t if t is None or t.shape[-1] == 1 or t.stride(-1) == 1 else t.contiguous()


def forward_fp8(q, kv_latent, kv_scale, kv_rope, indices, sm_scale, d_v, attn_sink=None, topk_length=None, launch: Optional[dict] = None,
                products: int = 0):
    """Sparse MLA over an FP8 latent (see fp8_reference.py for the operands): the latent rows are
    gathered as FP8 (half the bytes of bf16) and dequantized in registers, per tile of
    ``d_lat / n_tiles`` columns; the rope part is read as is. On Hopper at DeepSeek's widths a
    Gluon kernel (gluon_sparse_mla.py, gluon_fewhead.py) takes the call where one applies; with
    ``products`` the FP8-products kernel first (gluon_fp8_mma_split: Q and P in ``products`` e4m3
    terms each). A ``launch``
    (the Triton kernel's settings) runs the Triton kernel, whatever ``products`` asks."""
    q, indices = q.contiguous(), indices.contiguous()
    # The kernels read a row's columns (latent, scales, rope) at unit stride; any row stride works.
    kv_latent, kv_scale, kv_rope = (_unit_columns(t) for t in (kv_latent, kv_scale, kv_rope))
    if launch is None:
        out = _gluon_forward(q, kv_latent, kv_scale, kv_rope, indices, sm_scale, d_v, attn_sink, topk_length, 1, products)
        if out is not None:
            return out
    d_qk = q.shape[2]
    d_lat, n_tiles = kv_latent.shape[1], kv_scale.shape[1]
    d_rope = kv_rope.shape[1] if kv_rope is not None else 0
    d_b = 0 if d_rope == 0 else max(16, triton.next_power_of_2(d_rope))
    constexprs = dict(
        D_A=d_lat, D_B=d_b, DV=d_v, DV_P=max(16, triton.next_power_of_2(d_v)), V_IS_A=True, IEEE=False,
        UPCAST=interpreted(), KV_SCALE=kv_scale, KV_ROPE=kv_rope if kv_rope is not None else kv_scale,
        # Row pitches of the scales and the rope in bytes (see _row_starts).
        stride_ss=kv_scale.stride(0) * kv_scale.element_size(),
        stride_rs=kv_rope.stride(0) * kv_rope.element_size() if kv_rope is not None else 0,
        FP8=True, N_TILES=n_tiles,
    )
    key = ("fwd-fp8", q.device.index, q.dtype, d_lat, d_rope, n_tiles, q.shape[1])
    if launch is None:
        candidates = LaunchPolicy.forward_fp8(d_qk, d_v, q.shape[1], q.dtype, n_tiles)
    else:
        candidates = [dict(launch)]
        candidates[0].setdefault("DEQUANT", DEQUANT_FOLD if n_tiles == 1 and q.dtype == torch.bfloat16 else DEQUANT_FP32)
        if candidates[0]["DEQUANT"] >= DEQUANT_FOLD and n_tiles != 1:
            raise SparseAttnArgumentError(
                f"forward_fp8: argument 'launch' asks for DEQUANT={candidates[0]['DEQUANT']}, a form for one scale per row, "
                f"but kv_scale has {n_tiles} scales a row; use DEQUANT={DEQUANT_FP32} or {DEQUANT_COMPUTE} for per-tile scales"
            )
    # One key group: the group stride is never used.
    return _forward_launch("forward_fp8", key, q, kv_latent, 0, 1, indices, sm_scale, d_v, constexprs, attn_sink, topk_length, candidates, launch is not None)


def _forward_launch(name, key, q, kv, stride_kvg, h_kv, indices, sm_scale, d_v, constexprs, attn_sink, topk_length, candidates, overridden):
    """Launch _fwd_kernel (and _combine_kernel when the top-k is split) for the bf16 or FP8 keys
    (``kv`` is the keys or the FP8 latent, rows first). ``candidates``: launches, best first;
    ``overridden``: they are the caller's, not the policy's (part of the cache key)."""
    t, heads, d_qk = q.shape
    hpg = heads // h_kv
    topk = indices.shape[-1]
    dv_p = constexprs["DV_P"]
    out = torch.empty((t, heads, d_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((t, heads), dtype=torch.float32, device=q.device)
    if t == 0:
        return out, lse
    first = candidates[0]
    splits = first.get("SPLITS") or LaunchPolicy.splits(t * h_kv * triton.cdiv(hpg, first["BLOCK_H"]), topk, first["BLOCK_N"], sm_count(q.device))
    for cfg in candidates:
        cfg["SPLITS"] = splits
    # Per (split, token, head): the unnormalized accumulator, then m and l.
    partial = torch.empty((splits, t, heads, dv_p + 2), dtype=torch.float32, device=q.device) if splits > 1 else None
    full_args = (
        q, kv, indices, out, lse,
        attn_sink if attn_sink is not None else lse,
        topk_length if topk_length is not None else lse,
        q.stride(0), q.stride(1), kv.stride(0), stride_kvg, indices.stride(0), indices.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        kv.shape[0], topk, hpg, d_qk, float(sm_scale) * LOG2E,
    )
    full_constexprs = dict(constexprs, HAS_SINK=attn_sink is not None, HAS_TOPK_LEN=topk_length is not None, PARTIAL=partial)
    key = key + (splits, tuple(tuple(sorted(c.items())) for c in candidates) if overridden else None)
    _launch(_fwd_kernel, name, key, candidates, lambda cfg: (t * triton.cdiv(hpg, cfg["BLOCK_H"]) * splits, h_kv), full_args, full_constexprs)
    if splits > 1:
        combine_partials(partial, out, lse, attn_sink, splits, d_v, dv_p)
    return out, lse


def combine_partials(partial, out, lse, attn_sink, splits: int, d_v: int, dv_p: int) -> None:
    """Merges the top-k splits' partial softmax states (``partial`` [splits, T, H, dv_p + 2]:
    unnormalized accumulator, m in base 2, l) into ``out`` and ``lse``."""
    t, heads = out.shape[0], out.shape[1]
    block_h = 16 if interpreted() else 32
    _combine_kernel[(t, triton.cdiv(heads, block_h))](
        partial, out, lse, attn_sink if attn_sink is not None else lse, out.stride(0), out.stride(1), lse.stride(0), heads,
        DV=d_v, DV_P=dv_p, HAS_SINK=attn_sink is not None, SPLITS=splits, BLOCK_H=block_h, num_warps=4,
    )


def declines_fp8(problem) -> Optional[str]:
    """Why the FP8-latent kernel does not take ``problem`` (its d_parts: latent, rope), or None."""
    base = declines(problem)
    if base is not None and not base.startswith("d_qk"):
        return base
    d_lat, d_rope, n_tiles = problem.fp8_layout
    if problem.h_kv != 1:
        return "FP8 latent with several key groups"
    if d_lat & (d_lat - 1) or not 16 <= d_lat <= 512:
        return f"FP8 latent width {d_lat} (a power of two, 16..512)"
    if n_tiles & (n_tiles - 1) or d_lat % n_tiles:
        return f"{n_tiles} scale tiles over {d_lat} columns (a power of two dividing the width)"
    if problem.d_v != d_lat:
        return f"d_v {problem.d_v} differs from the FP8 latent width {d_lat} (V must be the whole latent)"
    if d_rope > 256:
        return f"rope width {d_rope} above 256"
    return None


def deterministic() -> bool:
    return os.environ.get(ENV_DETERMINISTIC, "0") not in ("", "0") or torch.are_deterministic_algorithms_enabled()


SCRATCH_BYTES = 1 << 30  # dS and P (bf16) of one token chunk, together


def backward(dout, dlse, q, kv, out, lse, indices, sm_scale, d_v, attn_sink=None, topk_length=None, launch: Optional[dict] = None):
    """Three passes over token chunks (see the module docstring): dS and P, dQ, dKV. dKV is summed
    over all heads of a key block before one atomic add: n_heads/BLOCK_H times fewer atomics than
    adding per head block. ``launch`` overrides pass 1's configuration (benchmark sweeps)."""
    q, kv, indices, dout = q.contiguous(), kv.contiguous(), indices.contiguous(), dout.contiguous()
    t, heads, d_qk, h_kv, hpg, d_a, d_b, dv_p = _geometry(q, kv, d_v)
    s_kv, topk = kv.shape[0], indices.shape[-1]
    # Row statistics in torch (small): the lse P is normalized by, and delta = rowsum(dO * O),
    # adjusted for a gradient on the returned (sink-free) lse: dS = P'(dP - delta) + P dlse.
    lse_raw = torch.where(torch.isposinf(lse), torch.full_like(lse, float("-inf")), lse)
    lse_norm = torch.logaddexp(lse_raw, attn_sink.view(1, heads)) if attn_sink is not None else lse_raw
    lse_used = torch.where(torch.isneginf(lse_norm), torch.full_like(lse_norm, float("inf")), lse_norm)
    delta = (dout.float() * out.float()).sum(-1)
    delta_eff = delta
    if dlse is not None:
        ratio = torch.where(torch.isfinite(lse_raw), torch.exp(lse_norm - lse_raw), torch.zeros_like(lse_raw))
        delta_eff = delta - dlse.float() * ratio
    lse2 = (lse_used * LOG2E).contiguous()
    delta_eff = delta_eff.contiguous()
    dq = torch.empty_like(q)
    per_slot = deterministic()
    dkv = torch.zeros((s_kv, h_kv, d_qk), dtype=torch.float32, device=q.device)
    ds_dtype = q.dtype  # dS and P as the dot operands of passes 2 and 3 take them
    chunk = max(1, min(t, SCRATCH_BYTES // max(1, 2 * heads * topk * torch.finfo(ds_dtype).bits // 8)))
    if per_slot:
        chunk = max(1, min(chunk, SCRATCH_BYTES // max(1, h_kv * topk * d_qk * 4)))
    if t == 0:
        return dq, dkv.to(kv.dtype), torch.zeros((heads if attn_sink is not None else 0,), dtype=torch.float32, device=q.device)
    ds_buf = torch.empty((chunk, heads, topk), dtype=ds_dtype, device=q.device)
    p_buf = torch.empty_like(ds_buf)
    slot_buf = torch.empty((chunk, h_kv, topk, d_qk), dtype=torch.float32, device=q.device) if per_slot else None
    upcast = interpreted() and q.dtype != torch.float32
    ieee = q.dtype == torch.float32
    tl_arg = topk_length if topk_length is not None else lse
    ds_candidates = [launch] if launch else LaunchPolicy.backward(d_qk, d_v, hpg, q.dtype)
    ds_key = ("bwd-ds", q.device.index, q.dtype, d_qk, d_v, hpg, launch and tuple(sorted(launch.items())))
    dq_cfg = LaunchPolicy.backward_dq(d_qk, d_v, hpg, q.dtype)
    dq_key = ("bwd-dq", q.device.index, q.dtype, d_qk, d_v, hpg)
    dkv_cfg = LaunchPolicy.backward_dkv(d_qk, d_v, hpg, q.dtype)
    dkv_key = ("bwd-dkv", q.device.index, q.dtype, d_qk, d_v, hpg, per_slot)
    for t0 in range(0, t, chunk):
        n = min(chunk, t - t0)
        args = (
            q, kv, indices, dout, lse2, delta_eff, ds_buf, p_buf, tl_arg,
            q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), indices.stride(0), indices.stride(1),
            dout.stride(0), dout.stride(1), lse.stride(0), ds_buf.stride(0), ds_buf.stride(1),
            t0, s_kv, topk, hpg, d_qk, float(sm_scale) * LOG2E,
        )
        constexprs = dict(
            D_A=d_a, D_B=d_b, DV=d_v, DV_P=dv_p, V_IS_A=(d_v == d_a),
            HAS_TOPK_LEN=topk_length is not None, IEEE=ieee, UPCAST=upcast,
        )
        _launch(_bwd_ds_kernel, "backward_ds", ds_key, ds_candidates, lambda c, n=n: (n * triton.cdiv(hpg, c["BLOCK_H"]), h_kv), args, constexprs)
        args = (
            kv, indices, ds_buf, dq, tl_arg,
            kv.stride(0), kv.stride(1), indices.stride(0), indices.stride(1),
            ds_buf.stride(0), ds_buf.stride(1), q.stride(0), q.stride(1),
            t0, s_kv, topk, hpg, h_kv, d_qk, float(sm_scale),
        )
        constexprs = dict(HAS_TOPK_LEN=topk_length is not None, IEEE=ieee, UPCAST=upcast)
        _launch(
            _bwd_dq_kernel, "backward_dq", dq_key, dq_cfg,
            lambda c, n=n: (triton.cdiv(d_qk, c["BLOCK_C"]), n * h_kv, triton.cdiv(hpg, c["BLOCK_H"])), args, constexprs,
        )
        target = slot_buf if per_slot else dkv
        if per_slot:
            strides = (0, slot_buf.stride(1), slot_buf.stride(2))
        else:
            strides = (dkv.stride(0), dkv.stride(1), 0)
        args = (
            q, dout, indices, ds_buf, p_buf, target,
            q.stride(0), q.stride(1), dout.stride(0), dout.stride(1), indices.stride(0), indices.stride(1),
            ds_buf.stride(0), ds_buf.stride(1), *strides,
            t0, s_kv, topk, hpg, h_kv, d_qk, float(sm_scale),
        )
        constexprs = dict(DV=d_v, IEEE=ieee, UPCAST=upcast, PER_SLOT=per_slot)
        _launch(
            _bwd_dkv_kernel, "backward_dkv", dkv_key, dkv_cfg,
            lambda c, n=n: (triton.cdiv(d_qk, c["BLOCK_C"]), n * h_kv), args, constexprs,
        )
        if per_slot:
            _add_per_slot(dkv, slot_buf[:n], indices[t0:t0 + n], topk_length[t0:t0 + n] if topk_length is not None else None)
    dsink = torch.zeros((heads if attn_sink is not None else 0,), dtype=torch.float32, device=q.device)
    if attn_sink is not None:
        w = torch.where(torch.isneginf(lse_norm), torch.zeros_like(lse_norm), torch.exp(attn_sink.view(1, heads) - lse_norm))
        dsink = -(w * delta).sum(0)
    return dq, dkv.to(kv.dtype), dsink


def _add_per_slot(dkv, rows, indices, topk_length):
    """Add per-(token, slot) dKV rows into dKV in a fixed order (sorted ``index_put_``). Invalid
    slots add zeros to row 0 rather than being filtered out: boolean indexing would synchronize
    with the host and break CUDA-graph capture."""
    s_kv, h_kv, _ = dkv.shape
    idx = indices.long()
    valid = (idx >= 0) & (idx < s_kv)
    if topk_length is not None:
        valid &= torch.arange(idx.shape[-1], device=idx.device).view(1, 1, -1) < topk_length.view(-1, 1, 1)
    group = torch.arange(h_kv, device=idx.device).view(1, -1, 1).expand_as(idx)
    safe = torch.where(valid, idx, 0)
    contribution = torch.where(valid.unsqueeze(-1), rows, 0)
    with _deterministic():
        dkv.index_put_((safe, group), contribution, accumulate=True)


class _deterministic:
    def __enter__(self):
        self.prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.prev)
        return False
