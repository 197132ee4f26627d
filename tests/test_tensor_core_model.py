"""tensor_core_model (CPU): one instruction's truncation on hand-checked products, exactness with
enough bits, and the claim the split kernel's term order rests on: under the model, two-term
operands whose residual products go first lose less than when they go last."""

import pytest
import torch
from conftest import rel_err
from test_gluon_fp8_mma import SCALE, _row_keys

from mla_compiler.kernels import fp8_reference as fr
from mla_compiler.kernels import gluon_fp8_mma as fm
from mla_compiler.kernels import tensor_core_model as tcm


def _step(acc, products, bits):
    """One instruction over ``products`` given as (a, b) pairs, a 1 x 1 result."""
    a = torch.tensor([[x for x, _ in products]])
    b = torch.tensor([[y] for _, y in products])
    return tcm.mma_step(torch.tensor([[acc]]), a, b, bits).item()


def test_one_instruction_truncates_below_the_largest_term():
    # 16 * 16 = 2^8 leads: at 14 bits the grid is 2^-5, so 2^-6 is lost and -3 * 2^-6 goes to
    # -2^-5 (toward zero); at 16 bits the grid is 2^-7 and both are kept.
    assert _step(0.0, [(16.0, 16.0), (0.125, 0.125)], 14) == 256.0
    assert _step(0.0, [(16.0, 16.0), (-0.375, 0.125)], 14) == 256.0 - 2.0**-5
    assert _step(0.0, [(16.0, 16.0), (0.125, 0.125)], 16) == 256.0 + 2.0**-6
    # The incoming accumulator is aligned with the products: a large one swallows them, and a
    # large product swallows it.
    assert _step(256.0, [(0.125, 0.125)], 14) == 256.0
    assert _step(2.0**-6, [(16.0, 16.0)], 14) == 256.0
    assert _step(0.0, [(0.125, 0.125)], 14) == 2.0**-6


def test_with_enough_bits_it_is_the_exact_product():
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(3, 8, 96, generator=g) * 4).to(torch.float8_e4m3fn).float()
    b = (torch.randn(3, 96, 5, generator=g) * 4).to(torch.float8_e4m3fn).float()
    acc = torch.randn(3, 8, 5, generator=g)
    exact = acc
    for k0 in range(0, 96, tcm.E4M3_STEP_K):  # each instruction's sum exact, then rounded to fp32
        exact = (exact.double() + a[..., k0:k0 + 32].double() @ b[..., k0:k0 + 32, :].double()).float()
    assert torch.equal(tcm.mma_chain(acc, a, b, bits=40), exact)
    # At 14 bits it is close but not exact: each of the three instructions truncates.
    at14 = tcm.mma_chain(acc, a, b)
    assert 0 < rel_err(at14, exact) < 1e-3


def test_bits_and_modes_are_checked():
    with pytest.raises(ValueError, match="bits=1"):
        tcm.mma_step(torch.zeros(1, 1), torch.ones(1, 2), torch.ones(2, 1), bits=1)
    with pytest.raises(ValueError, match="bits=50"):
        tcm.mma_step(torch.zeros(1, 1), torch.ones(1, 32), torch.ones(32, 1), bits=50)
    q, latent, scale, rope, idx = _row_keys(64, 64, "cpu")
    with pytest.raises(ValueError, match="lazy=True"):
        fm.reference_fp8_mma(q, latent, scale, rope, idx, SCALE, tc_bits=14)


def test_residual_terms_first_lose_less_to_the_accumulation():
    # Extreme scales (scores in the hundreds): the residuals' products added onto the whole score
    # are truncated against it; added first, against their own size. (At 128 heads and top-k 2048
    # on H200, fp8_products_accuracy.py: the kernel's lse 0.81 -> 0.34 from exact FP8, and the
    # model lands within 0.02 of it. Here a CPU-sized case.)
    q, latent, scale, rope, idx = _row_keys(64, 128, "cpu", extreme=True)
    exact, exact_lse = fr.sparse_attn_fp8kv_reference(q, latent, scale, rope, idx, SCALE, fr.LATENT, exact_keys=True)
    fin = torch.isfinite(exact_lse)
    args = (q, latent, scale, rope, idx, SCALE)
    fp32, fp32_lse = fm.reference_fp8_mma(*args, block_n=64, lazy=True, terms=2)
    errors = {}
    for first in (False, True):
        out, lse = fm.reference_fp8_mma(*args, block_n=64, lazy=True, terms=2, residuals_first=first, tc_bits=tcm.HOPPER_BITS)
        errors[first] = (rel_err(out, exact), (lse[fin] - exact_lse[fin]).abs().max().item())
    fp32_lse_err = (fp32_lse[fin] - exact_lse[fin]).abs().max().item()
    # In fp32 the order does not matter (the terms are added before the product).
    other, other_lse = fm.reference_fp8_mma(*args, block_n=64, lazy=True, terms=2, residuals_first=True)
    assert torch.equal(other, fp32) and torch.equal(other_lse, fp32_lse)
    assert fp32_lse_err < 1e-2 < errors[True][1]  # the model loses what fp32 keeps
    assert errors[True][1] < 0.5 * errors[False][1], errors
    assert errors[True][0] < errors[False][0], errors
