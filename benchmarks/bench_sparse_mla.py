"""Sparse MLA kernels and the compiled MLA layer, timed side by side on one GPU.

    python benchmarks/bench_sparse_mla.py --out results.json            # everything
    python benchmarks/bench_sparse_mla.py --only kernels --sweep        # launch-config sweep

Rows (bf16):
  * our Triton forward and backward at the DeepSeek-V3.2 prefill shape (s_q 4096 at positions
    4096..8191, s_kv 8192, 128 heads, d_qk 576, d_v 512, topk 2048, all indices valid), a decode
    shape (batch 64, s_q 2, s_kv 32768, topk 2048) and a NAM56R-style shape (d_qk 128, d_v 64);
  * what a user would otherwise compile with plain Inductor at the prefill shape: the
    gather-then-attend form and DeepSeek's dense-masked form;
  * one reference MLA layer (DeepSeek-V3.2 dims, 128 heads), forward + backward at s = 4096,
    compiled with backend="sparse_mla" and with backend="inductor", with peak memory.
TFLOPS as FlashMLA counts them: forward 2 * valid indices * heads * (d_qk + d_v); backward 2.5x.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import triton  # noqa: E402

from mla_compiler import make_backend  # noqa: E402
from mla_compiler.kernels import reference  # noqa: E402
from mla_compiler.kernels import triton_sparse_mla as tk  # noqa: E402

ROWS: list[dict] = []


def bench(fn, warmup_ms=100, rep_ms=400) -> float:
    """Median milliseconds (CUDA events, triton.testing.do_bench)."""
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def graphed(fn):
    """``fn`` captured in a CUDA graph (run once outside it first, for compilation), as a callable
    that replays it. Timed through ``bench``, a replay measures the GPU's time alone: a kernel
    shorter than its host-side launch (a decode step: dispatch checks, the JIT's argument
    handling) timed eagerly measures the host whenever the host is the slower, and decode serves
    from CUDA graphs anyway."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def graphed_rounds(fns: dict, rounds: int) -> dict:
    """{name: [ms a round]} of each callable in ``fns``, captured in a CUDA graph once and timed in
    ``rounds`` interleaved rounds (every callable once a round, so a drifting clock hits all)."""
    graphs = {name: graphed(fn) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, replay in graphs.items():
            times[name].append(bench(replay))
    return times


def rel(a, b) -> float:
    """Relative L2 error of ``a`` against ``b``."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def write_results(path: str, **fields) -> None:
    """A benchmark's raw results as JSON at ``path``: the device and torch version, then ``fields``."""
    with open(path, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, **fields), f, indent=1)


def row(**kw):
    ROWS.append(kw)
    print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items()), flush=True)


def prefill_inputs(s_q=4096, s_kv=8192, heads=128, d_qk=576, topk=2048, seed=0, dtype=torch.bfloat16):
    """Queries at positions s_kv - s_q .. s_kv - 1; each attends to topk distinct causal keys."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(s_q, heads, d_qk, device="cuda", dtype=dtype, generator=g)
    kv = torch.randn(s_kv, 1, d_qk, device="cuda", dtype=dtype, generator=g)
    pos = torch.arange(s_kv - s_q, s_kv, device="cuda")
    # topk distinct keys among the first pos+1 (all >= topk here): random scores, top-k.
    scores = torch.rand(s_q, s_kv, device="cuda", generator=g)
    scores = scores.masked_fill(torch.arange(s_kv, device="cuda")[None, :] > pos[:, None], -1.0)
    idx = scores.topk(topk, dim=-1).indices.to(torch.int32).view(s_q, 1, topk)
    return q, kv, idx


def decode_inputs(batch=64, s_q=2, s_kv=32768, heads=128, d_qk=576, topk=2048, seed=0, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch * s_q, heads, d_qk, device="cuda", dtype=dtype, generator=g)
    kv = torch.randn(batch * s_kv, 1, d_qk, device="cuda", dtype=dtype, generator=g)
    idx = torch.stack([torch.randperm(s_kv, device="cuda", generator=g)[:topk] for _ in range(batch * s_q)])
    idx = idx + (torch.arange(batch * s_q, device="cuda") // s_q * s_kv)[:, None]
    return q, kv, idx.to(torch.int32).view(batch * s_q, 1, topk)


def flops_fwd(idx, heads, d_qk, d_v, s_kv):
    valid = ((idx >= 0) & (idx < s_kv)).sum().item()
    return 2.0 * valid * heads * (d_qk + d_v)


def check_against_reference(q, kv, idx, scale, d_v, rows=256):
    """Kernel vs the pure-torch reference on the first rows of the benchmark shape."""
    sub = slice(0, rows)
    out, lse = tk.forward(q[sub], kv, idx[sub], scale, d_v)
    r_out, r_lse = reference.sparse_attn_reference(q[sub], kv, idx[sub], scale, d_v)
    err_o = ((out.float() - r_out.float()).norm() / r_out.float().norm()).item()
    err_l = (lse - r_lse).abs().max().item()
    dout = torch.randn_like(r_out)
    g = tk.backward(dout, None, q[sub], kv, r_out, r_lse, idx[sub], scale, d_v)
    rg = reference.sparse_attn_backward_reference(dout, None, q[sub], kv, r_out, r_lse, idx[sub], scale, d_v)
    err_dq = ((g[0].float() - rg[0].float()).norm() / rg[0].float().norm()).item()
    err_dkv = ((g[1].float() - rg[1].float()).norm() / rg[1].float().norm()).item()
    return dict(err_out=err_o, err_lse=err_l, err_dq=err_dq, err_dkv=err_dkv)


def kernel_rows(name, q, kv, idx, scale, d_v, sweep=False):
    t, heads, d_qk = q.shape
    s_kv = kv.shape[0]
    fl = flops_fwd(idx, heads, d_qk, d_v, s_kv)
    errs = check_against_reference(q, kv, idx, scale, d_v)
    row(section="check", shape=name, **errs)
    configs = [None]
    if sweep:
        configs += [
            dict(BLOCK_H=64, BLOCK_N=n, num_warps=w, num_stages=st)
            for n, w, st in ((64, 8, 3),)
        ] + [dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=2, WARP_SPECIALIZE=True), dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=3, WARP_SPECIALIZE=True)]
    best = None
    for cfg in configs:
        try:
            ms = bench(lambda: tk.forward(q, kv, idx, scale, d_v, launch=cfg))
        except Exception as exc:  # noqa: BLE001 - a config that does not fit shared memory
            row(section="fwd-config", shape=name, config=str(cfg), error=type(exc).__name__)
            continue
        tf = fl / ms / 1e9
        row(section="fwd" if cfg is None else "fwd-config", shape=name, impl="triton", config=str(cfg or "policy"), ms=ms, tflops=tf, **tk.LAST_LAUNCH.get("forward", {}))
        if best is None or ms < best[0]:
            best = (ms, cfg)
    out, lse = tk.forward(q, kv, idx, scale, d_v)
    dout = torch.randn_like(out)
    kernel_breakdown(name + " bwd", lambda: tk.backward(dout, None, q, kv, out, lse, idx, scale, d_v))
    os.environ[tk.ENV_DETERMINISTIC] = "1"
    try:
        ms = bench(lambda: tk.backward(dout, None, q, kv, out, lse, idx, scale, d_v))
        row(section="bwd", shape=name, impl="triton deterministic", ms=ms, tflops=2.5 * fl / ms / 1e9)
        kernel_breakdown(name + " bwd deterministic", lambda: tk.backward(dout, None, q, kv, out, lse, idx, scale, d_v))
    except Exception as exc:  # noqa: BLE001
        row(section="bwd", shape=name, impl="triton deterministic", error=f"{type(exc).__name__}: {str(exc)[:120]}")
    finally:
        os.environ[tk.ENV_DETERMINISTIC] = "0"
    if sweep:
        policy = tk.LaunchPolicy.backward_dkv
        for cfg in (
            dict(BLOCK_N=128, BLOCK_C=128, BLOCK_HH=128, num_warps=8, num_stages=2),
            dict(BLOCK_N=64, BLOCK_C=64, BLOCK_HH=128, num_warps=4, num_stages=3),
            dict(BLOCK_N=64, BLOCK_C=256, BLOCK_HH=128, num_warps=8, num_stages=1),
            dict(BLOCK_N=32, BLOCK_C=128, BLOCK_HH=128, num_warps=4, num_stages=3),
        ):
            tk.LaunchPolicy.backward_dkv = staticmethod(lambda *a, cfg=cfg: [cfg])
            tk._FITTED.clear()
            try:
                ms = bench(lambda: tk.backward(dout, None, q, kv, out, lse, idx, scale, d_v))
                row(section="bwd-config", shape=name, impl="triton dkv", config=str(cfg), ms=ms, tflops=2.5 * fl / ms / 1e9, **{f"dkv_{k}": v for k, v in tk.LAST_LAUNCH.get("backward_dkv", {}).items() if k in ("n_regs", "n_spills")})
            except Exception as exc:  # noqa: BLE001
                row(section="bwd-config", shape=name, impl="triton dkv", config=str(cfg), error=type(exc).__name__)
        tk.LaunchPolicy.backward_dkv = policy
        tk._FITTED.clear()
    bconfigs = [None]
    if sweep:
        bconfigs += [dict(BLOCK_H=h, BLOCK_N=n, num_warps=w, num_stages=st) for h, n, w, st in ((64, 64, 8, 1), (32, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 3))]
    for cfg in bconfigs:
        try:
            ms = bench(lambda: tk.backward(dout, None, q, kv, out, lse, idx, scale, d_v, launch=cfg))
        except Exception as exc:  # noqa: BLE001
            row(section="bwd-config", shape=name, config=str(cfg), error=type(exc).__name__)
            continue
        info = {f"ds_{k}": v for k, v in tk.LAST_LAUNCH.get("backward_ds", {}).items()}
        for part in ("dq", "dkv"):
            info.update({f"{part}_{k}": v for k, v in tk.LAST_LAUNCH.get(f"backward_{part}", {}).items() if k in ("n_regs", "n_spills")})
        row(section="bwd" if cfg is None else "bwd-config", shape=name, impl="triton", config=str(cfg or "policy"), ms=ms, tflops=2.5 * fl / ms / 1e9, **info)
    return best


def kernel_breakdown(name, fn):
    """CUDA time per kernel name inside one call of ``fn`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    for evt in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:5]:
        row(section="profile", shape=name, impl=evt.key[:40], ms=evt.device_time_total / 1e3)


def inductor_rows(q, kv, idx, scale, d_v, s_q, s_kv):
    """What a user compiles with plain Inductor: gather-then-attend, and the dense-masked form."""
    t, heads, d_qk = q.shape
    fl = flops_fwd(idx, heads, d_qk, d_v, s_kv)

    def gather_attend(q, kv, idx):
        g = kv[:, 0][idx[:, 0].long()]  # [T, topk, d_qk]
        s = torch.einsum("thd,tkd->thk", q, g).float() * scale
        p = s.softmax(-1)
        return torch.einsum("thk,tkd->thd", p.to(q.dtype), g[..., :d_v])

    def dense_masked(q, kv, idx):
        lat, pe = kv[:, 0, :d_v], kv[:, 0, d_v:]
        scores = (torch.einsum("shc,tc->sht", q[..., :d_v].float(), lat.float()) + torch.einsum("shr,tr->sht", q[..., d_v:].float(), pe.float())) * scale
        mask = torch.full((t, s_kv), float("-inf"), device=q.device).scatter_(-1, idx[:, 0].long(), 0)
        scores += mask.unsqueeze(1)
        p = scores.softmax(dim=-1, dtype=torch.float32)
        return torch.einsum("sht,tc->shc", p.type_as(q), lat)

    for name, fn in (("inductor gather-then-attend", gather_attend), ("inductor dense-masked", dense_masked)):
        try:
            compiled = torch.compile(fn, backend="inductor")
            compiled(q, kv, idx)
            torch.cuda.synchronize()
            ms = bench(lambda: compiled(q, kv, idx))
            row(section="fwd", shape="v32-prefill", impl=name, ms=ms, tflops=fl / ms / 1e9)
        except Exception as exc:  # noqa: BLE001 - out of memory on a smaller GPU, say
            row(section="fwd", shape="v32-prefill", impl=name, error=f"{type(exc).__name__}: {str(exc)[:120]}")
        torch.cuda.empty_cache()
    # gather-then-attend training step (forward + backward) for the backward comparison
    try:
        qg, kvg = q.detach().requires_grad_(), kv.detach().requires_grad_()
        compiled = torch.compile(gather_attend, backend="inductor")
        dout = torch.randn(t, heads, d_v, device="cuda", dtype=q.dtype)

        def step():
            o = compiled(qg, kvg, idx)
            torch.autograd.grad(o, (qg, kvg), dout)

        step()
        ms_total = bench(step)
        ms_fwd = bench(lambda: compiled(qg.detach(), kvg.detach(), idx))
        row(section="bwd", shape="v32-prefill", impl="inductor gather-then-attend", ms=ms_total - ms_fwd, tflops=2.5 * fl / (ms_total - ms_fwd) / 1e9)
    except Exception as exc:  # noqa: BLE001
        row(section="bwd", shape="v32-prefill", impl="inductor gather-then-attend", error=f"{type(exc).__name__}: {str(exc)[:120]}")
    torch.cuda.empty_cache()


def layer_rows(seqlen=4096, heads=128):
    """One reference MLA layer (DeepSeek dims, 128 heads), forward + backward, compiled two ways."""
    from mla_compiler.models import attention_layer, causal_mask, deepseek_v32_small

    cfg = deepseek_v32_small(dim=2048, n_heads=heads, q_lora_rank=1536, index_n_heads=64, index_head_dim=128, index_topk=2048, max_seq_len=8192, original_seq_len=4096)
    torch.manual_seed(0)
    layer = attention_layer(cfg).cuda().to(torch.bfloat16)
    x = torch.randn(1, seqlen, cfg.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cos, sin = layer.rope_cos[:seqlen], layer.rope_sin[:seqlen]
    mask = causal_mask(seqlen, device="cuda")
    results = {}
    for name, backend in (("sparse_mla", make_backend()), ("inductor", "inductor")):
        torch._dynamo.reset()
        try:
            compiled = torch.compile(layer, backend=backend)

            def step():
                out = compiled(x, cos, sin, mask)
                out.float().square().mean().backward()

            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            ms = bench(step, warmup_ms=50, rep_ms=500)
            results[name] = (ms, peak)
            row(section="layer", shape=f"mla layer s={seqlen} h={heads}", impl=name, ms=ms, peak_gib=peak)
        except Exception as exc:  # noqa: BLE001
            row(section="layer", shape=f"mla layer s={seqlen} h={heads}", impl=name, error=f"{type(exc).__name__}: {str(exc)[:160]}")
        layer.zero_grad(set_to_none=True)
        x.grad = None
        torch.cuda.empty_cache()
    if len(results) == 2:
        row(section="layer", shape=f"mla layer s={seqlen} h={heads}", impl="speedup", x=results["inductor"][0] / results["sparse_mla"][0], memory_ratio=results["inductor"][1] / max(results["sparse_mla"][1], 1e-9))


FP8_SHAPES = (
    # (name, inputs, sweep here?) the decode shape first
    ("v32-decode b64", lambda: decode_inputs(), True),
    ("v32-decode b64 h16", lambda: decode_inputs(heads=16), True),  # 16 heads a GPU: DeepSeek-V3.2 at TP 8
    ("v32-decode b2", lambda: decode_inputs(batch=2), False),  # latency: 4 tokens
    ("v32-prefill", lambda: prefill_inputs(), False),
)


def fp8_rows(sweep=False):
    """FP8 latent (FlashMLA's 656-byte layout, and float8 + per-row scale) against bf16 keys, same
    kernel family, decode and prefill shapes; bytes and FlashMLA-unit TFLOPS."""
    scale = 192**-0.5 * (0.1 * math.log(40) + 1) ** 2
    copy_bw = next((r["tb_per_s"] for r in ROWS if r.get("impl") == "d2d copy 1 GiB"), float("nan"))
    only = [n for n in os.environ.get("MLA_BENCH_FP8_SHAPES", "").split(",") if n]
    for name, make, sweep_here in FP8_SHAPES:
        if only and name not in only:
            continue
        _fp8_case_rows(name, make, scale, copy_bw, sweep and sweep_here)
        torch.cuda.empty_cache()


def fp8_sweep_configs(block_h: int) -> list[dict]:
    """Launches tried per shape: many heads are bound by registers (8 warps); few heads by loads
    in flight (more stages, more programs per token)."""
    if block_h >= 64:
        return [dict(BLOCK_H=block_h, BLOCK_N=n, num_warps=8, num_stages=st, SPLITS=1) for n, st in ((64, 2), (32, 2), (64, 1))]
    return [dict(BLOCK_H=block_h, BLOCK_N=n, num_warps=w, num_stages=st, SPLITS=sp) for n, w, st, sp in ((64, 8, 2, 2), (32, 8, 2, 2), (64, 8, 2, 4), (32, 4, 3, 2))]


def fp8_sweep_forms(n_tiles: int) -> list[dict]:
    """Dequantization forms tried: per-tile scales (fp32, bf16); one scale per row (fp32, folded,
    folded with the next block prefetched, FP8 tensor cores for Q K^T or for both products)."""
    if n_tiles > 1:
        return [dict(DEQUANT=tk.DEQUANT_FP32), dict(DEQUANT=tk.DEQUANT_COMPUTE)]
    return [dict(DEQUANT=tk.DEQUANT_FP32), dict(DEQUANT=tk.DEQUANT_FOLD, PREFETCH=True)] + [
        dict(DEQUANT=form, PREFETCH=prefetch) for form in (tk.MMA_FP8_QK, tk.MMA_FP8_QK_PV) for prefetch in (False, True)
    ]


def fp8_key_sets(kv: torch.Tensor) -> dict:
    """The bf16 keys [S, 1, 576] as the two FP8 latents benchmarked, each (latent, scale, rope) as
    forward_fp8 takes them: FlashMLA's 656-byte layout, and e4m3 with one scale a row."""
    from mla_compiler.kernels import fp8_reference as fr

    return {layout: fr.quantize_keys(kv, layout) for layout in fr.KEY_LAYOUTS}


def _fp8_case_rows(name, make, scale, copy_bw, sweep=False):
    """One shape's FP8 rows; its tensors are freed when it returns."""
    from mla_compiler.kernels import fp8_reference as fr

    q, kv, idx = make()
    t, heads, d_qk = q.shape
    fl = flops_fwd(idx, heads, d_qk, 512, kv.shape[0])
    valid = ((idx >= 0) & (idx < kv.shape[0])).sum().item()
    fp8 = fp8_key_sets(kv)
    out_bf16, _ = tk.forward(q, kv, idx, scale, 512)
    qo_bytes = t * heads * (576 + 512) * 2
    sub = slice(0, min(t, 32))  # the FP8 reference on the first tokens: the kernel's own error
    cases = (
        ("triton bf16 KV", lambda cfg=None: tk.forward(q, kv, idx, scale, 512, launch=cfg), valid * 1152 + qo_bytes, None),
        ("triton FP8 KV (FlashMLA 656 B)", lambda cfg=None: tk.forward_fp8(q, *fp8["flashmla"], idx, scale, 512, launch=cfg), valid * 656 + qo_bytes, fp8["flashmla"]),
        ("triton FP8 KV (e4m3 + row scale)", lambda cfg=None: tk.forward_fp8(q, *fp8["row"], idx, scale, 512, launch=cfg), valid * (512 + 4 + 128) + qo_bytes, fp8["row"]),
    )
    base = None
    for impl, fn, nbytes, fp8_parts in cases:
        out, _ = fn()
        err = ((out.float() - out_bf16.float()).norm() / out_bf16.float().norm()).item()
        extra = {}
        if fp8_parts is not None:
            r_out, _ = fr.sparse_attn_fp8kv_reference(q[sub], *fp8_parts, idx[sub], scale, 512)
            extra["err_vs_fp8_ref"] = ((out[sub].float() - r_out.float()).norm() / r_out.float().norm()).item()
        ms = bench(fn)
        base = base or ms
        launch = tk.LAST_LAUNCH.get("forward_fp8" if fp8_parts is not None else "forward", {})
        row(section="fp8", shape=name, impl=impl, ms=ms, tflops=fl / ms / 1e9, gb_needed=nbytes / 1e9,
            hbm_fraction=nbytes / (ms * 1e-3) / (copy_bw * 1e12) if copy_bw == copy_bw else float("nan"),
            speedup_vs_bf16=base / ms, rel_err_vs_bf16=err, **extra,
            **{k: v for k, v in launch.items() if k in ("n_regs", "n_spills", "SPLITS", "DEQUANT", "PREFETCH")})
        if launch.get("SPLITS", 1) > 1:  # what the split buys: the same launch, one program per head block
            one = {k: launch[k] for k in ("BLOCK_H", "BLOCK_N", "num_warps", "num_stages", "DEQUANT", "PREFETCH") if k in launch}
            ms_one = bench(lambda: fn(dict(one, SPLITS=1)))
            row(section="fp8", shape=name, impl=impl + ", no split", ms=ms_one, tflops=fl / ms_one / 1e9, split_speedup=ms_one / ms)
        if not sweep:
            continue
        forms = [{}] if fp8_parts is None else fp8_sweep_forms(fp8_parts[1].shape[1])
        r_sub = out_bf16[sub] if fp8_parts is None else r_out
        for form in forms:
            for cfg in fp8_sweep_configs(tk.LaunchPolicy.heads(heads)):
                full = dict(cfg, **form)
                try:
                    out_c, _ = fn(full)
                    ms_c = bench(lambda: fn(full))
                except Exception as exc:  # noqa: BLE001 - a config that does not fit is a row, not a stop
                    row(section="fp8-config", shape=name, impl=impl, config=str(full), error=type(exc).__name__)
                    continue
                info = tk.LAST_LAUNCH.get("forward_fp8" if fp8_parts is not None else "forward", {})
                err_c = ((out_c[sub].float() - r_sub.float()).norm() / r_sub.float().norm()).item()
                row(section="fp8-config", shape=name, impl=impl, config=str(full), ms=ms_c, tflops=fl / ms_c / 1e9,
                    speedup_vs_bf16_policy=base / ms_c, err_vs_ref=err_c, **{k: v for k, v in info.items() if k in ("n_regs", "n_spills")})


def ceilings() -> dict:
    """Measured ceilings: bf16 matmul rate (8192^3, TFLOPS) and device-to-device copy bandwidth
    (1 GiB read and written, TB/s)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    matmul_ms = bench(lambda: a @ b)
    x = torch.empty(2**30 // 2, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    copy_ms = bench(lambda: y.copy_(x))
    return dict(bf16_tflops=2 * 8192**3 / matmul_ms / 1e9, bf16_matmul_ms=matmul_ms, copy_tb_s=2 * 2**30 / copy_ms / 1e9,
                copy_ms=copy_ms)


def roofline():
    """Measured ceilings: bf16 matmul rate and device-to-device copy bandwidth."""
    c = ceilings()
    row(section="roofline", impl="bf16 matmul 8192^3", ms=c["bf16_matmul_ms"], tflops=c["bf16_tflops"])
    row(section="roofline", impl="d2d copy 1 GiB", ms=c["copy_ms"], tb_per_s=c["copy_tb_s"])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_sparse_mla.json"))
    parser.add_argument("--only", choices=["kernels", "inductor", "layer", "fp8", "all"], default="all")
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    # The baselines' fp32 matmuls (DeepSeek's .float() scores) run on TF32 tensor cores, as a user
    # chasing speed would set; our kernels do not use fp32 matmuls.
    torch.set_float32_matmul_precision("high")
    props = torch.cuda.get_device_properties(0)
    env = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__, date=time.strftime("%Y-%m-%d"))
    print(env, flush=True)
    sections = []
    if args.only in ("all", "kernels", "inductor", "fp8"):
        sections.append("roofline")
    if args.only in ("all", "kernels"):
        sections.append("kernels")
    if args.only in ("all", "inductor"):
        sections.append("inductor")
    if args.only in ("all", "fp8"):
        sections.append("fp8")
    if args.only in ("all", "layer"):
        sections.append("layer")
    for section in sections:
        print(f"== {section}", flush=True)
        try:
            if section == "roofline":
                roofline()
            elif section == "kernels":
                scale = 192**-0.5 * (0.1 * math.log(40) + 1) ** 2
                q, kv, idx = prefill_inputs()
                kernel_rows("v32-prefill", q, kv, idx, scale, 512, sweep=args.sweep)
                del q, kv, idx
                q, kv, idx = decode_inputs()
                kernel_rows("v32-decode b64", q, kv, idx, scale, 512, sweep=args.sweep)
                del q, kv, idx
                q, kv, idx = prefill_inputs(heads=64, d_qk=128)
                kernel_rows("nam56r h64 128/64", q, kv, idx, 128**-0.5, 64, sweep=args.sweep)
                del q, kv, idx
            elif section == "inductor":
                q, kv, idx = prefill_inputs()
                inductor_rows(q, kv, idx, 192**-0.5, 512, 4096, 8192)
                del q, kv, idx
            elif section == "fp8":
                fp8_rows(sweep=args.sweep)
            elif section == "layer":
                layer_rows()
        except Exception:  # noqa: BLE001 - report and go on to the next section
            traceback.print_exc()
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(dict(env=env, rows=ROWS), f, indent=1)
    print("\n" + table(ROWS, env))
    return 0


def table(rows, env) -> str:
    lines = [f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']}", f"{'section':<9} {'shape':<20} {'impl':<30} {'ms':>9} {'TFLOPS':>8}  other"]
    for r in rows:
        if r.get("section", "").endswith("-config"):
            continue
        other = {k: v for k, v in r.items() if k not in ("section", "shape", "impl", "ms", "tflops", "config")}
        other_s = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in other.items())
        ms = f"{r['ms']:.3f}" if "ms" in r else ""
        tf = f"{r['tflops']:.0f}" if "tflops" in r else ""
        lines.append(f"{r.get('section', ''):<9} {r.get('shape', ''):<20} {r.get('impl', ''):<30} {ms:>9} {tf:>8}  {other_s}")
    best: dict = {}
    for r in rows:  # sweeps: the fastest configuration per (section, shape, impl)
        if r.get("section", "").endswith("-config") and "ms" in r:
            k = (r["section"], r.get("shape", ""), r.get("impl", ""))
            if k not in best or r["ms"] < best[k]["ms"]:
                best[k] = r
    for (sec, shape, impl), r in best.items():
        lines.append(f"best {sec:<14} {shape:<20} {impl:<30} {r['ms']:>9.3f} {r.get('tflops', 0):>8.0f}  {r['config']}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
