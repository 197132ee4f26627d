"""The memory system's state before timing: copy bandwidth, and random-row gather bandwidth from a
small and from a large region (the decode benchmarks gather 1152-byte rows at random from 2.4 GB;
a gather much slower from the large region than from the small one points at address translation,
not at the kernels). Prints one line a probe.

    python benchmarks/device_probe.py
"""

from __future__ import annotations

import torch
import triton


def _ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_gbps(n_bytes: int = 1 << 30) -> float:
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n_bytes / _ms(lambda: dst.copy_(src)) / 1e6


def gather_ms(n_rows: int, rows: int, seed: int = 0) -> float:
    """Milliseconds to gather ``rows`` random 1152-byte rows out of ``n_rows``."""
    kv = torch.empty(n_rows, 576, dtype=torch.bfloat16, device="cuda")
    idx = torch.randint(0, n_rows, (rows,), device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed))
    return _ms(lambda: kv.index_select(0, idx))


def main() -> int:
    print(f"probe copy 1 GiB: {copy_gbps():.0f} GB/s (read + write)", flush=True)
    rows = 128 * 2048  # the b64 decode's rows: 128 tokens x top-k 2048
    for label, n_rows in (("256 MiB", 1 << 17), ("2.4 GB", 64 * 32768)):
        ms = gather_ms(n_rows, rows)
        print(f"probe gather {rows} rows of 1152 B from {label}: {rows * 1152 / ms / 1e6:.0f} GB/s, {ms:.4f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
