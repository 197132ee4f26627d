"""Small launches of every kernel for compute-sanitizer (memcheck, racecheck, initcheck).

    compute-sanitizer --tool memcheck python3 benchmarks/sanitize_kernels.py [triton,ws,fewhead]

Shapes include every invalid-index kind (-1, >= S_kv, large negatives, INT32_MAX), a row with no
valid index, duplicates, odd heads, topk not a multiple of the block, and a paged FP8 cache; the
warp-specialized forward (bf16 keys, both FP8 latents, split and unsplit scores) on Hopper, and
the few-head forward (bf16 keys, both FP8 latents, split and unsplit top-k).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mla_compiler.kernels import fp8_reference as fr  # noqa: E402
from mla_compiler.kernels import gluon_sparse_mla as ws  # noqa: E402
from mla_compiler.kernels import triton_sparse_mla as tk  # noqa: E402


KERNEL_GROUPS = ("triton", "ws", "fewhead")


def main(argv: list[str]) -> int:
    groups = set(argv[0].split(",")) if argv else set(KERNEL_GROUPS)
    if not groups <= set(KERNEL_GROUPS):
        raise SystemExit(f"kernel groups {sorted(groups - set(KERNEL_GROUPS))}: choose from {KERNEL_GROUPS}")
    torch.manual_seed(0)
    dev = "cuda"
    fill = torch.tensor([-1, 40, -(2**31), 2**31 - 1, -123456], device=dev, dtype=torch.int32)
    if "triton" in groups:
        for d_qk, d_v, heads, topk in ((576, 512, 5, 19), (128, 64, 6, 33)):
            t, s_kv = 7, 40
            q = torch.randn(t, heads, d_qk, device=dev, dtype=torch.bfloat16)
            kv = torch.randn(s_kv, 1, d_qk, device=dev, dtype=torch.bfloat16)
            idx = torch.randint(0, s_kv, (t, 1, topk), device=dev, dtype=torch.int32)
            idx[0, 0, ::2] = fill[torch.arange(0, topk, 2, device=dev) % 5]
            idx[1] = -1
            idx[2, 0, 1] = idx[2, 0, 0]
            out, lse = tk.forward(q, kv, idx, 0.1, d_v)
            dout = torch.randn_like(out)
            tk.backward(dout, torch.randn_like(lse), q, kv, out, lse, idx, 0.1, d_v, torch.randn(heads, device=dev), torch.full((t,), topk - 3, device=dev, dtype=torch.int32))
            os.environ[tk.ENV_DETERMINISTIC] = "1"
            tk.backward(dout, None, q, kv, out, lse, idx, 0.1, d_v)
            os.environ[tk.ENV_DETERMINISTIC] = "0"
            if d_qk == 576:
                cache = fr.quantize_flashmla(kv[:, 0, :512].float(), kv[:, 0, 512:]).view(5, 8, 656)
                tk.forward_fp8(q, *fr.flashmla_views(cache.view(40, 656)), idx, 0.1, 512)
    # The warp-specialized forward, called directly (the dispatch takes it only at many programs):
    # 80 heads (a padded head block), topk 19 (one partial key block), every invalid-index kind.
    t, s_kv, heads, topk = 7, 40, 80, 19
    q = torch.randn(t, heads, 576, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(s_kv, 1, 576, device=dev, dtype=torch.bfloat16)
    idx = torch.randint(0, s_kv, (t, 1, topk), device=dev, dtype=torch.int32)
    idx[0, 0, ::2] = fill[torch.arange(0, topk, 2, device=dev) % 5]
    idx[1] = -1
    latent, scale = fr.quantize_rowwise(kv[:, 0, :512])
    for launch in (dict(SPLIT_S=True), dict(FOLD_SCALE=False), dict(CHUNK_BUFFERS=False, FOLD_SCALE=False),
                   dict(SPLIT_S=False, CHUNKED=False, CHUNK_BUFFERS=False, FOLD_SCALE=False)) if "ws" in groups else ():
        ws.forward(q, kv[:, 0, :512], None, kv[:, 0, 512:], idx, 0.1, launch=launch)
        ws.forward(q, *fr.flashmla_views(fr.quantize_flashmla(kv[:, 0, :512].float(), kv[:, 0, 512:])), idx, 0.1, launch=launch)
        ws.forward(q, latent, scale, kv[:, 0, 512:].contiguous(), idx, 0.1, launch=launch)
    # The few-head forward, called directly: 20 heads (a padded 16-head block), the same indices,
    # unsplit and split top-k, bf16 keys and both FP8 latents; FP8 through both kernels (WS: the
    # partitions' mbarrier hand-over, for racecheck and synccheck).
    from mla_compiler.kernels import gluon_fewhead as fh

    q20 = q[:, :20].contiguous()
    flashmla = fr.flashmla_views(fr.quantize_flashmla(kv[:, 0, :512].float(), kv[:, 0, 512:]))
    fewhead_launches = (dict(SPLITS=1, BLOCK_N=32), dict(SPLITS=2, BLOCK_N=32, STAGES=3))
    for launch in fewhead_launches if "fewhead" in groups else ():
        fh.forward(q20, kv[:, 0, :512], None, kv[:, 0, 512:], idx, 0.1, launch=launch)
        for fp8_launch in (dict(launch, WS=False), dict(launch, WS=True), dict(launch, WS=True, Q_HELD=False), dict(SPLITS=launch["SPLITS"], WGMMA=True),
                           dict(SPLITS=launch["SPLITS"], WGMMA=True, TILES=1, STAGES=5), dict(SPLITS=launch["SPLITS"], WGMMA=True, F16=False)):
            fh.forward(q20, *flashmla, idx, 0.1, launch=fp8_launch)
            fh.forward(q20, latent, scale, kv[:, 0, 512:].contiguous(), idx, 0.1, launch=fp8_launch)
    torch.cuda.synchronize()
    print("SANITIZE LAUNCHES DONE")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
