"""Which loads of the forward kernel the compiler turns into asynchronous copies into shared memory
(software-pipelined) and which stay synchronous loads into registers, for bf16 keys and each FP8
dequantization form. Reads the Triton GPU IR of the launches the policy (or a form) compiles.

    python3 benchmarks/inspect_pipelining.py
"""

from __future__ import annotations

import os
import re
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_sparse_mla import fp8_key_sets  # noqa: E402
from mla_compiler.kernels import triton_sparse_mla as tk  # noqa: E402

OPS = {
    "async copies": r"ttg\.async_copy_global_to_local",
    "sync loads": r"= tt\.load ",
    "local_alloc": r"ttg\.local_alloc",
    "wgmma": r"ttng\.warp_group_dot ",
    "mma v2": r"tt\.dot ",
    "fp8 -> bf16/fp32": r"tt\.fp_to_fp .*f8E4M3FN",
}


def main() -> int:
    captured = {}
    original = tk._record

    def record(name, compiled, cfg):
        captured[name] = compiled
        original(name, compiled, cfg)

    tk._record = record
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for heads in (128, 16):
        q = torch.randn(8, heads, 576, device="cuda", dtype=torch.bfloat16, generator=g)
        kv = torch.randn(4096, 1, 576, device="cuda", dtype=torch.bfloat16, generator=g)
        idx = torch.randint(0, 4096, (8, 1, 2048), device="cuda", dtype=torch.int32, generator=g)
        fp8 = fp8_key_sets(kv)
        flashmla, row = fp8["flashmla"], fp8["row"]
        base = tk.LaunchPolicy.forward(576, 512, heads, torch.bfloat16)[0]
        cases = [
            ("bf16 keys", lambda: tk.forward(q, kv, idx, 0.1, 512, launch=dict(base, SPLITS=1)), "forward"),
            ("FlashMLA, fp32 dequant", lambda: tk.forward_fp8(q, *flashmla, idx, 0.1, 512, launch=dict(base, SPLITS=1, DEQUANT=0)), "forward_fp8"),
            ("row, fp32 dequant", lambda: tk.forward_fp8(q, *row, idx, 0.1, 512, launch=dict(base, SPLITS=1, DEQUANT=0)), "forward_fp8"),
            ("row, folded", lambda: tk.forward_fp8(q, *row, idx, 0.1, 512, launch=dict(base, SPLITS=1, DEQUANT=2)), "forward_fp8"),
            ("row, folded + prefetch", lambda: tk.forward_fp8(q, *row, idx, 0.1, 512, launch=dict(base, SPLITS=1, DEQUANT=2, PREFETCH=True)), "forward_fp8"),
            ("row, FP8 Q K^T", lambda: tk.forward_fp8(q, *row, idx, 0.1, 512, launch=dict(base, SPLITS=1, DEQUANT=3)), "forward_fp8"),
        ]
        for label, fn, name in cases:
            fn()
            torch.cuda.synchronize()
            ir = captured[name].asm["ttgir"]
            if os.environ.get("OUT"):  # the IR itself, to read what the counts summarize
                with open(os.path.join(os.environ["OUT"], f"ttgir_h{heads}_{re.sub('[^a-z0-9]+', '_', label.lower())}.mlir"), "w") as f:
                    f.write(ir)
            counts = {k: len(re.findall(p, ir)) for k, p in OPS.items()}
            rows.append((heads, label, counts, tk.LAST_LAUNCH[name].get("n_spills")))
    print(f"{'heads':>5} {'keys / form':<26} " + " ".join(f"{k:>16}" for k in OPS) + "   spills")
    for heads, label, counts, spills in rows:
        print(f"{heads:>5} {label:<26} " + " ".join(f"{counts[k]:>16}" for k in OPS) + f"   {spills}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
