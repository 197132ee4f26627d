"""``python -m mla_compiler.demo``: compile a reference MLA model with ``backend="sparse_mla"``.

Shows what matched (and one near miss that was rejected, with its reason), checks the compiled
model against eager (outputs and gradients), times a training step against
``backend="inductor"`` and eager, with peak memory on CUDA, and decodes with an FP8 KV cache
(FlashMLA's 656-byte layout) that stays FP8 through the compiled model.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

import mla_compiler
from mla_compiler.models import TinyMLAModel, deepseek_v32_small, nam56r_small, spellings

CONFIGS = {"deepseek": deepseek_v32_small, "nam56r": nam56r_small}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_step(step: Callable[[], None], device: torch.device, repeats: int) -> tuple[float, float]:
    """(median seconds per call, peak MiB on CUDA or nan) after one warm-up call (the compile)."""
    step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    times.sort()
    return times[len(times) // 2], peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="deepseek")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-inductor", action="store_true", help="do not time backend='inductor'")
    parser.add_argument("--skip-fp8", action="store_true", help="do not run the FP8 KV-cache decode")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cfg = CONFIGS[args.config](n_layers=args.layers)
    torch.manual_seed(0)
    model = TinyMLAModel(cfg).to(device=device, dtype=dtype)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    print(f"mla_compiler {mla_compiler.__version__} | torch {torch.__version__} | device {device} | {args.dtype}")
    print(f"model: {args.config} ({cfg.n_layers} layers, {cfg.n_heads} heads, d_qk {cfg.d_qk}, d_v {cfg.d_v}, top-k {cfg.index_topk}), batch {args.batch}, seq {args.seq}\n")

    # 1. What the backend matched in the model, and why it turned down a near miss.
    print(mla_compiler.explain(model, tokens))
    x = spellings.make_inputs()
    near_miss = mla_compiler.explain(spellings.module_for("value_not_latent"), *x.args(), x.scale)
    print("\nA near miss (values are not the key latent):")
    for r in near_miss.rejections:
        print(f"  {r.source}\n    check '{r.check}': {r.reason}")

    # 2. Compiled against eager, both measured against the same model in fp32.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="sparse_mla")
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return logits.float().square().mean()

    def run(fn: Callable, m: torch.nn.Module) -> tuple[torch.Tensor, list]:
        out = fn(tokens)
        grads = torch.autograd.grad(loss_of(out), [p for p in m.parameters() if p.requires_grad], allow_unused=True)
        return out, grads

    got, g_got = run(compiled, model)
    want, g_want = run(model, model)
    ref_model = TinyMLAModel(cfg).to(device=device)
    ref_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ref, g_ref = run(ref_model, ref_model)

    def worst(grads: list) -> float:
        return max(_rel(a, b) for a, b in zip(grads, g_ref) if a is not None and b is not None)

    print(f"\n{'vs the fp32 model':<22} {'logits':>10} {'worst grad':>11}   (relative error)")
    print(f"{'sparse_mla, ' + args.dtype:<22} {_rel(got, ref):>10.2e} {worst(g_got):>11.2e}")
    print(f"{'eager, ' + args.dtype:<22} {_rel(want, ref):>10.2e} {worst(g_want):>11.2e}")
    counts = torch._dynamo.utils.counters["sparse_mla"]
    print(f"counters: matched {counts['matched']}, rejected {counts['rejected']}")
    del params

    # 3. A training step (forward + backward), timed against the alternatives.
    def step_with(fn: Callable) -> Callable[[], None]:
        def step() -> None:
            model.zero_grad(set_to_none=True)
            loss_of(fn(tokens)).backward()

        return step

    rows = [("sparse_mla", step_with(compiled))]
    if not args.skip_inductor:
        rows.append(("inductor", step_with(torch.compile(model, backend="inductor"))))
    rows.append(("eager", step_with(model)))
    print(f"\n{'backend':<12} {'step ms':>10} {'peak MiB':>10}")
    for name, step in rows:
        sec, peak = _time_step(step, device, args.repeats)
        print(f"{name:<12} {sec * 1e3:>10.1f} {peak:>10.0f}")
    if not args.skip_fp8 and args.config == "deepseek":
        fp8_decode(model, cfg, args, device)
    if device.type != "cuda":
        print("\n(on CPU the op runs its pure-torch reference: timings show the pipeline, not kernel speed;\n"
              " run on a CUDA device for the Triton kernels)")
    return 0


def fp8_decode(model: TinyMLAModel, cfg, args, device: torch.device) -> None:
    """4. Prefill and decode steps with the latent cache in FlashMLA's FP8 layout: the compiled
    model reads the FP8 bytes (counter fp8_preserved), never a dequantized copy (fp8_dequantized)."""
    warmup, steps = 2, 3  # the first decode steps compile (a new length, then a dynamic position)
    dtype = next(model.parameters()).dtype
    eager, twin = (TinyMLAModel(cfg).to(device=device, dtype=dtype).eval() for _ in range(2))
    for m in (eager, twin):
        m.load_state_dict(model.state_dict())
        m.allocate_cache(args.batch, args.seq + warmup + steps, device=device, kv_format="flashmla")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(twin, backend="sparse_mla")
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    with torch.no_grad():
        worst = _rel(compiled(prompt).float(), eager(prompt).float())
        times = []
        for pos in range(args.seq, args.seq + warmup + steps):
            tok = torch.randint(0, cfg.vocab_size, (args.batch, 1), device=device)
            want = eager(tok, start_pos=pos)
            _sync(device)
            t0 = time.perf_counter()
            got = compiled(tok, start_pos=pos)
            _sync(device)
            if pos >= args.seq + warmup:
                times.append(time.perf_counter() - t0)
            worst = max(worst, _rel(got.float(), want.float()))
    counts = torch._dynamo.utils.counters["sparse_mla"]
    per_token = cfg.n_layers * (cfg.kv_lora_rank + 4 * (cfg.kv_lora_rank // 128) + 2 * cfg.qk_rope_head_dim)
    print(f"\nFP8 KV cache (FlashMLA layout, {per_token} bytes a token over {cfg.n_layers} layers; bf16 would take "
          f"{cfg.n_layers * 2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)}): prefill {args.seq} tokens, then {warmup + steps} decode steps")
    print(f"  counters: fp8_preserved {counts['fp8_preserved']}, fp8_dequantized {counts['fp8_dequantized']}")
    print(f"  worst relative error against eager on the same FP8 cache: {worst:.2e}")
    print(f"  decode step (median of the last {steps}, after the compiles): {sorted(times)[len(times) // 2] * 1e3:.1f} ms")


if __name__ == "__main__":
    raise SystemExit(main())
