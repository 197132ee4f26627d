"""Triton's Gluon dialect for Hopper, as the warp-specialized sparse MLA kernels use it: the
imports (with the names Triton renamed after 3.6), the shapes the kernels are written for, and the
program's coordinates shared by every partition."""

from __future__ import annotations

from typing import Optional

import torch

try:  # Gluon: Triton >= 3.5; its Hopper API is what these kernels are written against (3.6).
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language._core import builtin
    from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: F401 (used by the partitions' modules)
        async_copy,
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    # Renamed after Triton 3.6: one barrier over a partition's warps; cp.async into shared memory;
    # a shared-memory view as another dtype.
    partition_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    async_rows = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared

    @builtin
    def smem_view(desc, dtype, shape, layout, _semantic=None):
        """``desc`` reinterpreted as ``dtype`` / ``shape`` / ``layout`` (the same bytes)."""
        view = getattr(desc, "reinterpret", None) or desc._reinterpret
        return view(dtype, shape, layout, _semantic=_semantic)

    HAVE_GLUON = True
except (ImportError, AttributeError):  # pragma: no cover - older Triton
    HAVE_GLUON = False

_D_LAT, _D_ROPE, _BLOCK_H = 512, 64, 64
if HAVE_GLUON:  # kernels read module globals only as constexpr
    D_LAT, D_ROPE, BLOCK_H, V_HALF = gl.constexpr(_D_LAT), gl.constexpr(_D_ROPE), gl.constexpr(_BLOCK_H), gl.constexpr(_D_LAT // 2)

    @gluon.jit
    def _unhoisted(i):
        """0 for the index i of a block of 64 or more keys of an int32 top-k (i < 2^25), which the
        compiler cannot prove. Q's shared-memory descriptors indexed by it (Q allocated as a ring
        of one) are computed in the loop instead of hoisted out of it into a register pair per K
        step, which a consumer partition's uniform registers then spill and reload every block."""
        return i >> 25

    @gluon.jit
    def _swap_with_other(bars, phase, WG: gl.constexpr):
        """Two consumer warpgroups' hand-off: once this warpgroup's threads have written what the
        other reads, tells it (``bars[WG]``) and waits for the other's (``bars[1 - WG]`` at
        ``phase``)."""
        partition_barrier()
        mbarrier.arrive(bars.index(WG))
        mbarrier.wait(bars.index(1 - WG), phase)

    @gluon.jit
    def _program_coords(H):
        """(query token as int64, block of heads) of this program. Head blocks vary fastest: the
        programs that gather the same token's key rows run side by side, so one of them reads the
        rows from L2 instead of HBM (token-major order re-read them from HBM a wave later)."""
        pid = gl.program_id(0)
        n_hb = gl.cdiv(H, BLOCK_H)
        return (pid // n_hb).to(gl.int64), pid % n_hb

    @gluon.jit
    def _chunk(c: gl.constexpr, k0, k1, k2, k3):
        """The buffer of 128-column chunk c of the tiles."""
        if c == 0:
            buf = k0
        elif c == 1:
            buf = k1
        elif c == 2:
            buf = k2
        else:
            buf = k3
        return buf

    @gluon.jit
    def _four_buffers(SEPARATE: gl.constexpr, dtype: gl.constexpr, shape: gl.constexpr, layout: gl.constexpr):
        """Four shared-memory buffers of ``shape``: separate allocations, or (not SEPARATE) one
        allocation four times. A step that stores into several parts of one buffer gets a barrier
        between the stores (the compiler cannot tell the parts apart); into separate ones, none."""
        b0 = gl.allocate_shared_memory(dtype, shape, layout)
        if SEPARATE:
            b1 = gl.allocate_shared_memory(dtype, shape, layout)
            b2 = gl.allocate_shared_memory(dtype, shape, layout)
            b3 = gl.allocate_shared_memory(dtype, shape, layout)
        else:
            b1 = b0
            b2 = b0
            b3 = b0
        return b0, b1, b2, b3

    @gluon.jit
    def _slot_chunk(k0, k1, k2, k3, slot, c: gl.constexpr, CHUNK_BUFFERS: gl.constexpr):
        """128-column chunk c of ring slot ``slot``: its own buffer (CHUNK_BUFFERS: the ring is four
        rings of [slots, keys, 128]) or a slice of the one ring [slots, keys, 512] (k0)."""
        if CHUNK_BUFFERS:
            view = _chunk(c, k0, k1, k2, k3).index(slot)
        else:
            view = k0.index(slot).slice(c * 128, 128, dim=1)
        return view


def key_operands_problem(kv_latent: torch.Tensor, kv_scale: Optional[torch.Tensor], kv_rope: torch.Tensor) -> Optional[str]:
    """Why the Gluon kernels cannot read these key operands (None when they can): bf16 keys, or an
    e4m3 latent with float32 scales (one a row or one per 128 columns, contiguous), and a bf16 rope."""
    if kv_rope.dtype != torch.bfloat16:
        return f"rope dtype {kv_rope.dtype} (bf16 only)"
    if kv_scale is None and kv_latent.dtype != torch.bfloat16:
        return f"key dtype {kv_latent.dtype} without scales (bf16 keys or an e4m3 latent with scales)"
    if kv_scale is not None:
        if kv_latent.dtype != torch.float8_e4m3fn:
            return f"latent dtype {kv_latent.dtype} (float8_e4m3fn)"
        if kv_scale.dim() != 2 or kv_scale.dtype != torch.float32 or kv_scale.stride(1) != 1:
            return "kv_scale not a float32 [rows, scales] tensor with contiguous scales"
        if kv_scale.shape[1] not in (1, 4):
            return f"{kv_scale.shape[1]} scales a row (one, or one per 128 columns)"
    return None


def switched_off(env_off: str) -> bool:
    """A Gluon kernel's switch: ``env_off``=0 (or empty) turns it off."""
    import os

    return os.environ.get(env_off, "1") in ("0", "")


def sm_count(device: torch.device) -> int:
    """The device's SMs; 1 off CUDA (under the interpreter splitting buys nothing)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def too_few_programs(q: torch.Tensor) -> Optional[str]:
    """Why one program per (token, 64 heads) would leave SMs idle (None when the programs fill
    them): the Triton kernel splits the top-k there."""
    programs = q.shape[0] * -(-q.shape[1] // _BLOCK_H)
    sms = sm_count(q.device)
    return f"{programs} programs for {sms} SMs (the Triton kernel splits the top-k there)" if programs < sms else None


def platform_problem(q: torch.Tensor, env_off: str, hopper_why: str, h_kv: int) -> Optional[str]:
    """Why a Gluon kernel cannot run this call on this machine (None when it can): switched off by
    ``env_off``=0, no Gluon, not a CUDA tensor, not a Hopper GPU (``hopper_why`` says why that
    kernel needs one), a query dtype other than bf16, several key groups."""
    if switched_off(env_off):
        return f"{env_off}=0"
    if not HAVE_GLUON:
        return "this Triton has no Gluon dialect"
    if q.device.type != "cuda":
        return "not a CUDA tensor"
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return f"not a Hopper GPU ({hopper_why})"
    if q.dtype != torch.bfloat16:
        return f"query dtype {q.dtype} (bf16 only)"
    if h_kv != 1:
        return f"{h_kv} key groups (one only)"
    return None
