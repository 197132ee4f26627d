"""FSDP2 + torchao FP8 training of the reference MLA model, compiled with the sparse_mla backend.

    torchrun --nproc_per_node 2 benchmarks/fsdp_fp8.py --out results.json          # 2 GPUs, NCCL
    torchrun --nproc_per_node 2 benchmarks/fsdp_fp8.py --device cpu --small        # gloo smoke run

Three runs from the same initial weights and data: bf16 (no FP8), FP8 compute with bf16
all-gather, FP8 compute with FP8 all-gather (``enable_fsdp_float8_all_gather``, scales
precomputed after each optimizer step). Each is prepared in the right order
(``prepare_fp8_fsdp``: convert, then shard). Reported per run: the dtype and bytes the all-gathers
send (counted by wrapping ``all_gather_into_tensor``), the losses, and the median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

SENT: list = []


def _count_all_gathers() -> None:
    """Count what FSDP2's all-gathers send: bytes of the flat input (whatever the collective's name
    in this torch) and the dtypes of the parameter shards packed into it."""
    for name in ("all_gather_into_tensor", "all_gather_single"):
        real = getattr(dist, name, None)
        if real is None:
            continue

        def counting(output_tensor, input_tensor, *args, _real=real, **kwargs):
            SENT.append(("bytes", input_tensor.numel() * input_tensor.element_size()))
            return _real(output_tensor, input_tensor, *args, **kwargs)

        setattr(dist, name, counting)
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as coll

    real_meta = coll._get_all_gather_input_metadatas

    def recording(param_all_gather_inputs):
        for inputs in param_all_gather_inputs:
            for t in inputs:
                SENT.append((str(t.dtype).replace("torch.", ""), 0))
        return real_meta(param_all_gather_inputs)

    coll._get_all_gather_input_metadatas = recording


def run(mode: str, args, device, mesh) -> dict:
    import mla_compiler
    from mla_compiler.distributed import precompute_fp8_scales, prepare_fp8_fsdp
    from mla_compiler.models import TinyMLAModel, deepseek_v32_small
    from torch.distributed.fsdp import fully_shard
    from torchao.float8 import Float8LinearConfig

    torch.manual_seed(0)
    small = dict(dim=256, n_heads=4, q_lora_rank=128, inter_dim=512, index_topk=32) if args.small else dict(dim=2048, n_heads=16, q_lora_rank=512, inter_dim=4096, index_topk=512)
    cfg = deepseek_v32_small(n_layers=args.layers, vocab_size=4096, max_seq_len=4096, **small)
    model = TinyMLAModel(cfg).to(device=device, dtype=torch.bfloat16)
    if mode == "bf16":
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=(mode == "fp8-allgather"), emulate=(device.type == "cpu"))
        prepare_fp8_fsdp(model, mesh, float8_config=config)
    compiled = torch.compile(model, backend=mla_compiler.make_backend(inner=args.inner))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
    losses, times = [], []
    SENT.clear()
    for step in range(args.steps):
        if step == args.warmup:
            SENT.clear()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = compiled(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if mode == "fp8-allgather":
            precompute_fp8_scales(model)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    measured = args.steps - args.warmup
    sent_bytes = sum(b for kind, b in SENT if kind == "bytes") / max(1, measured)
    dtypes = sorted({d for d, _ in SENT if d != "bytes"})
    matched = torch._dynamo.utils.counters["sparse_mla"]["matched"]
    del compiled, model, opt
    torch._dynamo.reset()
    return dict(mode=mode, losses=losses, step_ms=1e3 * statistics.median(times[args.warmup:]), allgather_bytes_per_step=sent_bytes,
                allgather_dtypes=dtypes, sites=matched)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--inner", default="inductor")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "fsdp_fp8.json"))
    args = p.parse_args()
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, rank if args.device == "cuda" else 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,))
    _count_all_gathers()
    modes = ("bf16", "fp8-bf16-allgather") if device.type == "cpu" else ("bf16", "fp8-bf16-allgather", "fp8-allgather")
    results = [run(m, args, device, mesh) for m in modes]
    if rank == 0:
        base = results[0]
        for r in results:
            r["bytes_vs_bf16"] = r["allgather_bytes_per_step"] / base["allgather_bytes_per_step"]
            r["final_loss_rel_diff_vs_bf16"] = abs(r["losses"][-1] - base["losses"][-1]) / abs(base["losses"][-1])
        env = dict(world=world, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", torch=torch.__version__, date=time.strftime("%Y-%m-%d"), args=vars(args))
        with open(args.out, "w") as f:
            json.dump(dict(env=env, results=results), f, indent=1)
        print(env)
        print(f"{'run':<20} {'step ms':>9} {'AG MB/step':>11} {'vs bf16':>8} {'AG dtypes':<26} {'loss first -> last':<22} {'|dloss| vs bf16':>15}")
        for r in results:
            print(f"{r['mode']:<20} {r['step_ms']:>9.1f} {r['allgather_bytes_per_step'] / 2**20:>11.1f} {r['bytes_vs_bf16']:>8.2f} {','.join(r['allgather_dtypes']):<26} "
                  f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}     {r['final_loss_rel_diff_vs_bf16']:>15.2e}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
