"""CUDA graphs: compiled models capture and replay, outputs equal to the uncaptured run.

    python benchmarks/cuda_graphs_check.py

1. ``make_backend(mode="reduce-overhead")`` (Inductor's CUDA graph trees) on a training step and
   on decode steps of the reference model.
2. ``torch.cuda.graph`` around a compiled decode step, replayed with new tokens.
3. ``torch.cuda.graph`` around the op's forward and backward, default and deterministic dKV.
Prints one line per check; exits non-zero if a check fails.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import mla_compiler  # noqa: E402
from mla_compiler.models import TinyMLAModel, nam56r_small  # noqa: E402


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def twins(cfg, decode: bool = False):
    """Two bf16 models with the same weights; ``decode``: in eval mode with KV caches."""
    torch.manual_seed(0)
    a, b = TinyMLAModel(cfg).cuda().bfloat16(), TinyMLAModel(cfg).cuda().bfloat16()
    b.load_state_dict(a.state_dict())
    if decode:
        for m in (a, b):
            m.eval()
            m.allocate_cache(2, 128, dtype=torch.bfloat16, device="cuda")
    return a, b


def capture(fn):
    """Warm ``fn`` up on a side stream (compile, pick launch configurations, allocate), then
    capture one call. Returns the graph and the call's static output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def capture_op_step() -> float:
    """Capture sparse_attn + sparse_attn_bwd on static inputs with invalid indices; replay on new
    values; compare with the uncaptured call on the same values."""
    g = torch.Generator(device="cuda").manual_seed(1)
    t, heads, d_qk, d_v, s_kv, topk = 96, 16, 576, 512, 300, 40
    q = torch.randn(t, heads, d_qk, device="cuda", generator=g).bfloat16()
    kv = torch.randn(s_kv, 1, d_qk, device="cuda", generator=g).bfloat16()
    idx = torch.randint(-20, s_kv + 20, (t, 1, topk), device="cuda", generator=g, dtype=torch.int32)
    dout = torch.randn(t, heads, d_v, device="cuda", generator=g).bfloat16()
    ops = torch.ops.sparse_mla

    def step():
        out, lse = ops.sparse_attn(q, kv, idx, 0.05, d_v)
        return ops.sparse_attn_bwd(dout, None, q, kv, out, lse, idx, 0.05, d_v)[1]

    graph, static_dkv = capture(step)
    q.copy_(torch.randn(q.shape, device="cuda", generator=g))
    kv.copy_(torch.randn(kv.shape, device="cuda", generator=g))
    graph.replay()
    torch.cuda.synchronize()
    return rel(static_dkv.float(), step().float())


def main() -> int:
    ok = True
    cfg = nam56r_small(n_layers=2)
    # 1a. reduce-overhead, training: forward and backward run from CUDA graphs
    model, twin = twins(cfg)
    compiled = torch.compile(model, backend=mla_compiler.make_backend(mode="reduce-overhead"))
    tokens = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")
    for _ in range(3):  # warm up, record, then replay
        model.zero_grad(set_to_none=True)
        got = compiled(tokens)
        got.float().square().mean().backward()
    want = twin(tokens)
    want.float().square().mean().backward()
    err = rel(got, want)
    gerr = rel(model.layers[0].attn.wq_b.weight.grad, twin.layers[0].attn.wq_b.weight.grad)
    print(f"reduce-overhead training step: logits rel err {err:.2e}, wq_b grad rel err {gerr:.2e}, sites {torch._dynamo.utils.counters['sparse_mla']['matched']}")
    ok &= err < 2e-2 and gerr < 5e-2
    torch._dynamo.reset()
    # 1b. reduce-overhead, decode steps with a cache
    model, twin = twins(cfg, decode=True)
    compiled = torch.compile(model, backend=mla_compiler.make_backend(mode="reduce-overhead"))
    with torch.no_grad():
        prompt = torch.randint(0, cfg.vocab_size, (2, 32), device="cuda")
        compiled(prompt), twin(prompt)
        worst = 0.0
        for pos in range(32, 40):
            tok = torch.randint(0, cfg.vocab_size, (2, 1), device="cuda")
            worst = max(worst, rel(compiled(tok, start_pos=pos), twin(tok, start_pos=pos)))
    print(f"reduce-overhead decode, 8 steps: worst logits rel err {worst:.2e}")
    ok &= worst < 2e-2
    torch._dynamo.reset()
    # 2. torch.cuda.graph around a compiled decode step (fixed position), replayed with new tokens
    model, twin = twins(cfg, decode=True)
    step = torch.compile(model, backend=mla_compiler.make_backend(inner="aot_eager"))
    with torch.no_grad():
        prompt = torch.randint(0, cfg.vocab_size, (2, 32), device="cuda")
        step(prompt), twin(prompt)
        static_tok = torch.randint(0, cfg.vocab_size, (2, 1), device="cuda")
        graph, static_out = capture(lambda: step(static_tok, start_pos=32))
        new_tok = torch.randint(0, cfg.vocab_size, (2, 1), device="cuda")
        static_tok.copy_(new_tok)
        graph.replay()
        torch.cuda.synchronize()
        err = rel(static_out, twin(new_tok, start_pos=32))
    print(f"torch.cuda.graph capture of a compiled decode step, replayed with new tokens: logits rel err {err:.2e}")
    ok &= err < 2e-2
    # 3. the op's forward + backward captured directly, both dKV paths
    for deterministic in ("0", "1"):
        os.environ["MLA_COMPILER_DETERMINISTIC"] = deterministic
        err = capture_op_step()
        print(f"torch.cuda.graph capture of sparse_attn fwd+bwd (deterministic={deterministic}): dkv rel err vs uncaptured {err:.2e}")
        # The default dKV adds with fp32 atomics (order varies run to run); the deterministic one
        # must match bit for bit.
        ok &= err == 0.0 if deterministic == "1" else err < 1e-3
    os.environ.pop("MLA_COMPILER_DETERMINISTIC")
    print("CUDA GRAPHS: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
