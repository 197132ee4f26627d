"""True Inductor end-to-end (slow on CPU: a few only)."""

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import rel_err
from mla_compiler.models import TinyMLAModel, nam56r_small


@pytest.mark.inductor
def test_training_step_bf16_under_inductor():
    torch.manual_seed(0)
    cfg = nam56r_small(n_layers=1)
    model = TinyMLAModel(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 48))
    ref = model(tokens)
    params = list(model.parameters())
    g_ref = torch.autograd.grad(ref.square().mean(), params, allow_unused=True)
    model = model.to(torch.bfloat16)
    compiled = torch.compile(model, backend="sparse_mla")
    got = compiled(tokens)
    want = model(tokens)
    assert counters["sparse_mla"]["matched"] == 1
    assert rel_err(got, ref) <= 1.5 * rel_err(want, ref) + 1e-3
    g_got = torch.autograd.grad(got.float().square().mean(), params, allow_unused=True)
    g_want = torch.autograd.grad(want.float().square().mean(), params, allow_unused=True)
    for a, b, r in zip(g_got, g_want, g_ref):
        if r is not None:
            assert rel_err(a, r) <= 1.5 * rel_err(b, r) + 1e-3
