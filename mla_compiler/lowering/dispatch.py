"""Kernel choice for the canonical op: a registry of implementations, each with a checker.

Like an executor that claims an op, every implementation says whether it takes a problem and, if
not, why. The choice reads only device, dtypes and shapes (never values), so it is the same at
compile time (what ``explain`` reports) and at run time, and needs no host synchronization.

``MLA_COMPILER_KERNEL`` = ``auto`` (default: Triton on CUDA, reference elsewhere), ``triton`` (force
Triton, an error where it cannot run; with ``TRITON_INTERPRET=1`` it runs on CPU tensors) or
``reference`` (force the pure-torch reference).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from mla_compiler.sites import KernelChoice

log = logging.getLogger("mla_compiler")

ENV_KERNEL = "MLA_COMPILER_KERNEL"
KERNEL_MODES = ("auto", "triton", "reference")


# make_backend(fp8_products=...) -> the e4m3 terms of Q and P that the FP8-products kernel is
# asked for (0: it is not asked for). 0 and 1 are False and True; 2 as the op takes it.
PRODUCT_TERMS = {False: 0, True: 1, 2: 2, "two_term": 2}
# What the FP8-products kernel rounds, by its terms (for reports).
PRODUCT_TERMS_TEXT = {1: "e4m3 Q and P", 2: "Q and P as two e4m3 terms each"}


@dataclass(frozen=True)
class Problem:
    """What a kernel checker may look at."""

    device_type: str
    dtype: torch.dtype
    d_qk: int
    d_v: int
    heads: int
    h_kv: int
    topk: int
    fp8_layout: Optional[tuple] = None  # (d_latent, d_rope, n_scale_tiles) when the latent is FP8
    fp8_products: int = 0  # FP8 latent: the FP8-products kernel asked for, Q and P in this many e4m3 terms (0: not asked)


@dataclass(frozen=True)
class KernelImpl:
    name: str
    forward: Callable
    backward: Callable
    declines: Callable[[Problem], Optional[str]]  # None when it takes the problem, else the reason
    forward_fp8: Optional[Callable] = None  # FP8 latent (forward only)
    declines_fp8: Optional[Callable[[Problem], Optional[str]]] = None
    describe: Optional[Callable[[Problem], str]] = None  # which member of a kernel family runs the problem


_REGISTRY: dict[str, KernelImpl] = {}
_fallbacks_logged: set = set()


def register_kernel(impl: KernelImpl) -> None:
    _REGISTRY[impl.name] = impl


def kernel_mode() -> str:
    mode = os.environ.get(ENV_KERNEL, "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"{ENV_KERNEL}={mode!r} is not one of {', '.join(KERNEL_MODES)}")
    return mode


def _ensure_registered() -> None:
    if "reference" not in _REGISTRY:
        from mla_compiler.kernels import fp8_reference, reference

        register_kernel(
            KernelImpl(
                "reference", reference.sparse_attn_reference, reference.sparse_attn_backward_reference, lambda p: None,
                fp8_reference.sparse_attn_fp8kv_reference, lambda p: None,
            )
        )
    if "triton" not in _REGISTRY:
        try:
            from mla_compiler.kernels import triton_sparse_mla
        except ImportError as exc:  # triton not installed: the checker says so
            reason = f"triton is not importable ({exc})"
            register_kernel(KernelImpl("triton", None, None, lambda p, r=reason: r))
        else:
            register_kernel(
                KernelImpl(
                    "triton", triton_sparse_mla.forward, triton_sparse_mla.backward, triton_sparse_mla.declines,
                    triton_sparse_mla.forward_fp8, triton_sparse_mla.declines_fp8, triton_sparse_mla.forward_member,
                )
            )


def choose_kernel(problem: Problem) -> KernelChoice:
    """Pick the implementation for ``problem`` under the current ``MLA_COMPILER_KERNEL`` mode."""
    _ensure_registered()
    mode = kernel_mode()
    if mode == "reference":
        return KernelChoice("reference", f"{ENV_KERNEL}=reference")
    triton = _REGISTRY["triton"]
    if problem.fp8_layout is not None:
        triton_reason = triton.declines_fp8(problem) if triton.declines_fp8 else triton.declines(problem)
    else:
        triton_reason = triton.declines(problem)
    if mode == "triton":
        if triton_reason is not None:
            raise RuntimeError(f"{ENV_KERNEL}=triton, but the Triton kernel cannot run this problem: {triton_reason}")
        return KernelChoice("triton", f"{ENV_KERNEL}=triton")
    if problem.device_type != "cuda":
        return KernelChoice("reference", f"{problem.device_type} tensors take the reference")
    if triton_reason is None:
        member = f" ({triton.describe(problem)})" if triton.describe else ""
        return KernelChoice("triton", f"CUDA tensors take the Triton kernel family{member}")
    return KernelChoice("reference", f"fallback: Triton declined ({triton_reason})")


def kernel_for(problem: Problem) -> KernelImpl:
    choice = choose_kernel(problem)
    if choice.reason.startswith("fallback"):
        _count_fallback(problem, choice.reason)
    return _REGISTRY[choice.name]


def _count_fallback(problem: Problem, reason: str) -> None:
    from torch._dynamo.utils import counters

    counters["sparse_mla"]["kernel_fallback"] += 1
    if problem not in _fallbacks_logged:
        _fallbacks_logged.add(problem)
        log.warning("sparse_mla: %s for %s", reason, problem)


def problem_of(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, d_v: int, fp8_layout: Optional[tuple] = None,
               fp8_products: int = 0) -> Problem:
    return Problem(
        device_type=q.device.type,
        dtype=q.dtype,
        d_qk=int(q.shape[-1]),
        d_v=int(d_v),
        heads=int(q.shape[1]),
        h_kv=int(kv.shape[1]) if kv.dim() == 3 else 1,
        topk=int(indices.shape[-1]),
        fp8_layout=fp8_layout,
        fp8_products=int(fp8_products),
    )
