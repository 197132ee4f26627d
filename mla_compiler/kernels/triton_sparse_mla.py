"""Triton sparse MLA, forward and backward. The pure-torch reference beside it is reference.py.

Forward: one program per (query token, key group, block of BLOCK_H heads). It walks the token's
top-k indices BLOCK_N at a time, gathers those key rows once (latent part ``D_A`` wide and the
rest, rope, ``D_B`` wide) and uses them for all BLOCK_H heads: S = Q_a K_a^T + Q_b K_b^T, online
softmax in base 2 (the scale folded with log2 e), O += P V with V the first d_v columns of the same
rows (the loaded latent tile itself when d_v == D_A). Gathering once per key block for many heads
is what keeps the kernel compute-bound.

Backward: the same walk, recomputing P from the saved lse: dP = dO V^T, dS = P (dP - delta),
dQ += dS K, and dK = dS^T Q (+ P^T dO for the value columns) scattered into an fp32 dKV buffer
with atomic adds (several queries select the same key). Atomics make dKV's summation order, hence
its last bits, vary between runs; ``MLA_COMPILER_DETERMINISTIC=1`` (or
``torch.use_deterministic_algorithms(True)``) takes a deterministic path instead: the kernel writes
each (query, slot) contribution to a buffer and a sorted ``index_put_`` sums them in a fixed order.

Widths are parameters: d_qk is split as D_A (the largest power of two <= d_qk) + D_B (the rest,
padded to a power of two and masked), so DeepSeek's 576 = 512 + 64 and NAM56R's 128 = 128 + 0 need
no padding. Heads are padded to BLOCK_H with masks; topk needs not be a multiple of BLOCK_N.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

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


class LaunchPolicy:
    """Tile sizes and warps per shape family. DeepSeek (576/512) and NAM56R (128/64) differ 4x in
    width: the wide one is register-bound (a 64x512 fp32 accumulator), the narrow one can take
    more keys per step."""

    @staticmethod
    def forward(d_qk: int, d_v: int, hpg: int, dtype: torch.dtype) -> dict:
        block_h = min(64, max(16, triton.next_power_of_2(hpg)))
        if interpreted():
            return dict(BLOCK_H=block_h, BLOCK_N=16, num_warps=4, num_stages=1)
        wide = d_qk > 256
        if wide:
            return dict(BLOCK_H=block_h, BLOCK_N=64, num_warps=8, num_stages=2)
        return dict(BLOCK_H=block_h, BLOCK_N=64, num_warps=4, num_stages=3)

    @staticmethod
    def backward(d_qk: int, d_v: int, hpg: int, dtype: torch.dtype) -> dict:
        block_h = min(64, max(16, triton.next_power_of_2(hpg)))
        if interpreted():
            return dict(BLOCK_H=block_h, BLOCK_N=16, num_warps=4, num_stages=1)
        wide = d_qk > 256
        if wide:
            return dict(BLOCK_H=block_h, BLOCK_N=32, num_warps=8, num_stages=1)
        return dict(BLOCK_H=block_h, BLOCK_N=64, num_warps=4, num_stages=2)


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
def _fwd_kernel(
    Q, KV, IDX, OUT, LSE, SINK, TOPK_LEN,
    stride_qt, stride_qh,
    stride_kvs, stride_kvg,
    stride_it, stride_ig,
    stride_ot, stride_oh,
    stride_lt,
    S_KV, TOPK, HPG, D_QK, sm_scale_log2,
    D_A: tl.constexpr, D_B: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr,
    V_IS_A: tl.constexpr, HAS_SINK: tl.constexpr, HAS_TOPK_LEN: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0)
    g = tl.program_id(1)
    hb = tl.program_id(2)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < HPG
    heads = g * HPG + offs_h
    offs_a = tl.arange(0, D_A)
    q_row = Q + t * stride_qt + heads[:, None] * stride_qh
    q_a = tl.load(q_row + offs_a[None, :], mask=h_ok[:, None], other=0.0)
    if D_B > 0:
        offs_b = D_A + tl.arange(0, D_B)
        q_b = tl.load(q_row + offs_b[None, :], mask=h_ok[:, None] & (offs_b[None, :] < D_QK), other=0.0)
    if not V_IS_A:
        offs_v = tl.arange(0, DV_P)
    topk = TOPK
    if HAS_TOPK_LEN:
        topk = tl.minimum(tl.load(TOPK_LEN + t), TOPK)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, DV_P], dtype=tl.float32)
    idx_row = IDX + t * stride_it + g * stride_ig
    kv_grp = KV + g * stride_kvg
    for n0 in range(0, TOPK, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        idx = tl.load(idx_row + offs_n, mask=offs_n < topk, other=-1)
        valid = (idx >= 0) & (idx < S_KV)
        k_rows = kv_grp + idx.to(tl.int64)[:, None] * stride_kvs
        k_a = tl.load(k_rows + offs_a[None, :], mask=valid[:, None], other=0.0)
        s = _mm(q_a, tl.trans(k_a), IEEE, UPCAST)
        if D_B > 0:
            k_b = tl.load(k_rows + offs_b[None, :], mask=valid[:, None] & (offs_b[None, :] < D_QK), other=0.0)
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
        acc += _mm(p.to(v.dtype), v, IEEE, UPCAST)
        m_i = m_new

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
    o_ptr = OUT + t * stride_ot + heads[:, None] * stride_oh + offs_o[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=h_ok[:, None] & (offs_o[None, :] < DV))
    tl.store(LSE + t * stride_lt + heads, lse, mask=h_ok)


@triton.jit
def _bwd_kernel(
    Q, KV, IDX, DO, LSE2, DELTA, DQ, DKV, TOPK_LEN,
    stride_qt, stride_qh,
    stride_kvs, stride_kvg,
    stride_it, stride_ig,
    stride_dot, stride_doh,
    stride_lt,
    stride_dkvs, stride_dkvg,
    S_KV, TOPK, HPG, D_QK, sm_scale, sm_scale_log2,
    D_A: tl.constexpr, D_B: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr,
    V_IS_A: tl.constexpr, HAS_TOPK_LEN: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, PER_SLOT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0)
    g = tl.program_id(1)
    hb = tl.program_id(2)
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

    dq_a = tl.zeros([BLOCK_H, D_A], dtype=tl.float32)
    if D_B > 0:
        dq_b = tl.zeros([BLOCK_H, D_B], dtype=tl.float32)
    idx_row = IDX + t * stride_it + g * stride_ig
    kv_grp = KV + g * stride_kvg
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
        ds_lo = ds.to(k_a.dtype)
        p_lo = p.to(k_a.dtype)
        dq_a += _mm(ds_lo, k_a, IEEE, UPCAST)
        dk_a = _mm(tl.trans(ds_lo), q_a, IEEE, UPCAST) * sm_scale
        dv = _mm(tl.trans(p_lo), do, IEEE, UPCAST)
        if PER_SLOT:
            # Deterministic path: one row per (token, slot, head block), summed later in order.
            dst = DKV + ((t * tl.num_programs(1) + g) * tl.num_programs(2) + hb) * stride_dkvg + offs_n[:, None] * stride_dkvs
            row_ok = offs_n[:, None] < TOPK
        else:
            dst = DKV + g * stride_dkvg + idx.to(tl.int64)[:, None] * stride_dkvs
            row_ok = valid[:, None]
        if V_IS_A:
            dk_a += dv
        else:
            if PER_SLOT:
                tl.store(dst + (D_A + D_B + offs_v)[None, :], dv, mask=row_ok & (offs_v[None, :] < DV))
            else:
                tl.atomic_add(dst + offs_v[None, :], dv, mask=row_ok & (offs_v[None, :] < DV), sem="relaxed")
        if PER_SLOT:
            tl.store(dst + offs_a[None, :], dk_a, mask=row_ok)
        else:
            tl.atomic_add(dst + offs_a[None, :], dk_a, mask=row_ok, sem="relaxed")
        if D_B > 0:
            dq_b += _mm(ds_lo, k_b, IEEE, UPCAST)
            dk_b = _mm(tl.trans(ds_lo), q_b, IEEE, UPCAST) * sm_scale
            if PER_SLOT:
                tl.store(dst + offs_b[None, :], dk_b, mask=row_ok & b_ok[None, :])
            else:
                tl.atomic_add(dst + offs_b[None, :], dk_b, mask=row_ok & b_ok[None, :], sem="relaxed")

    dq_row = DQ + t * stride_qt + heads[:, None] * stride_qh
    tl.store(dq_row + offs_a[None, :], (dq_a * sm_scale).to(DQ.dtype.element_ty), mask=h_ok[:, None])
    if D_B > 0:
        tl.store(dq_row + offs_b[None, :], (dq_b * sm_scale).to(DQ.dtype.element_ty), mask=h_ok[:, None] & b_ok[None, :])


def _geometry(q: torch.Tensor, kv: torch.Tensor, d_v: int):
    t, heads, d_qk = q.shape
    h_kv = kv.shape[1]
    hpg = heads // h_kv
    d_a, d_b = _split_width(d_qk)
    return t, heads, d_qk, h_kv, hpg, d_a, d_b, triton.next_power_of_2(d_v)


# Resource use of the last compiled launch per kernel: registers, spills, shared memory (for tuning).
LAST_LAUNCH: dict = {}


def _record(name: str, compiled) -> None:
    try:
        LAST_LAUNCH[name] = dict(n_regs=compiled.n_regs, n_spills=compiled.n_spills, shared=compiled.metadata.shared)
    except AttributeError:  # the interpreter compiles nothing
        pass


def forward(q, kv, indices, sm_scale, d_v, attn_sink=None, topk_length=None, launch: Optional[dict] = None):
    q, kv, indices = q.contiguous(), kv.contiguous(), indices.contiguous()
    t, heads, d_qk, h_kv, hpg, d_a, d_b, dv_p = _geometry(q, kv, d_v)
    out = torch.empty((t, heads, d_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((t, heads), dtype=torch.float32, device=q.device)
    if t == 0:
        return out, lse
    cfg = launch or LaunchPolicy.forward(d_qk, d_v, hpg, q.dtype)
    grid = (t, h_kv, triton.cdiv(hpg, cfg["BLOCK_H"]))
    dummy = lse
    compiled = _fwd_kernel[grid](
        q, kv, indices, out, lse,
        attn_sink if attn_sink is not None else dummy,
        topk_length if topk_length is not None else dummy,
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), indices.stride(0), indices.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        kv.shape[0], indices.shape[-1], hpg, d_qk, float(sm_scale) * LOG2E,
        D_A=d_a, D_B=d_b, DV=d_v, DV_P=dv_p, V_IS_A=(d_v == d_a),
        HAS_SINK=attn_sink is not None, HAS_TOPK_LEN=topk_length is not None, IEEE=q.dtype == torch.float32,
        UPCAST=interpreted() and q.dtype != torch.float32,
        **cfg,
    )
    _record("forward", compiled)
    return out, lse


def deterministic() -> bool:
    return os.environ.get(ENV_DETERMINISTIC, "0") not in ("", "0") or torch.are_deterministic_algorithms_enabled()


def backward(dout, dlse, q, kv, out, lse, indices, sm_scale, d_v, attn_sink=None, topk_length=None, launch: Optional[dict] = None):
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
    dq = torch.empty_like(q)
    cfg = launch or LaunchPolicy.backward(d_qk, d_v, hpg, q.dtype)
    n_hb = triton.cdiv(hpg, cfg["BLOCK_H"])
    per_slot = deterministic()
    if per_slot:
        # Row layout: dK in [0, D_A + D_B); dV after it unless V is the latent tile itself.
        width = d_a + d_b + (0 if d_v == d_a else dv_p)
        dkv_buf = torch.zeros((t * h_kv * n_hb, topk, width), dtype=torch.float32, device=q.device)
        stride_s, stride_g = dkv_buf.stride(1), dkv_buf.stride(0)
    else:
        dkv_buf = torch.zeros((s_kv, h_kv, d_qk), dtype=torch.float32, device=q.device)
        stride_s, stride_g = dkv_buf.stride(0), dkv_buf.stride(1)
    if t > 0:
        compiled = _bwd_kernel[(t, h_kv, n_hb)](
            q, kv, indices, dout, (lse_used * LOG2E).contiguous(), delta_eff.contiguous(), dq, dkv_buf,
            topk_length if topk_length is not None else lse,
            q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), indices.stride(0), indices.stride(1),
            dout.stride(0), dout.stride(1), lse.stride(0), stride_s, stride_g,
            s_kv, topk, hpg, d_qk, float(sm_scale), float(sm_scale) * LOG2E,
            D_A=d_a, D_B=d_b, DV=d_v, DV_P=dv_p, V_IS_A=(d_v == d_a),
            HAS_TOPK_LEN=topk_length is not None, IEEE=q.dtype == torch.float32,
            UPCAST=interpreted() and q.dtype != torch.float32, PER_SLOT=per_slot,
            **cfg,
        )
        _record("backward", compiled)
    if per_slot:
        dkv = _sum_per_slot(dkv_buf, indices, topk_length, s_kv, h_kv, n_hb, d_qk, d_a + d_b, d_v, d_v == d_a)
    else:
        dkv = dkv_buf
    dsink = torch.zeros((heads if attn_sink is not None else 0,), dtype=torch.float32, device=q.device)
    if attn_sink is not None:
        w = torch.where(torch.isneginf(lse_norm), torch.zeros_like(lse_norm), torch.exp(attn_sink.view(1, heads) - lse_norm))
        dsink = -(w * delta).sum(0)
    return dq, dkv.to(kv.dtype), dsink


def _sum_per_slot(buf, indices, topk_length, s_kv, h_kv, n_hb, d_qk, v_offset, d_v, v_in_k):
    """Sum per-(token, slot) dKV rows into dKV in a fixed order (sorted index_put_)."""
    t, _, topk = indices.shape
    rows = buf.view(t, h_kv, n_hb, topk, -1).sum(2)  # fixed-order sum over head blocks
    grad = rows[..., :d_qk]
    if not v_in_k:
        grad = grad.clone()
        grad[..., :d_v] += rows[..., v_offset: v_offset + d_v]
    idx = indices.long()
    valid = (idx >= 0) & (idx < s_kv)
    if topk_length is not None:
        valid &= torch.arange(topk, device=idx.device).view(1, 1, -1) < topk_length.view(-1, 1, 1)
    group = torch.arange(h_kv, device=idx.device).view(1, -1, 1).expand_as(idx)
    dkv = torch.zeros((s_kv, h_kv, d_qk), dtype=torch.float32, device=buf.device)
    with _deterministic():
        dkv.index_put_((idx[valid], group[valid]), grad[valid], accumulate=True)
    return dkv


class _deterministic:
    def __enter__(self):
        self.prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.prev)
        return False
