"""Where the FP8-MMA kernel's time goes, at the V3.2 decode shape (128 heads): the kernel timed
with and without the producer's transposes (launch PROBE_SKIP=1: the output is then wrong, only
the time counts), beside the dequantizing kernel (row
scale) and bf16 keys, and the kernel under other register splits. CUDA graphs, interleaved
rounds, medians.

    python benchmarks/probe_fp8_mma.py
"""

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_sparse_mla import decode_inputs, fp8_key_sets, graphed_rounds  # noqa: E402

from mla_compiler.kernels import gluon_fp8_mma as fm  # noqa: E402
from mla_compiler.kernels import gluon_sparse_mla as ws  # noqa: E402


def main() -> int:
    q, kv, idx = decode_inputs()
    fp8 = fp8_key_sets(kv)
    scale = 576**-0.5
    cands = {f"fp8-mma PROBE_SKIP={skip}": (lambda skip=skip: fm.forward(q, *fp8["row"], idx, scale, launch=dict(PROBE_SKIP=skip)))
             for skip in (0, 1)}
    cands["ws FP8 row (dequantized)"] = lambda: ws.forward(q, *fp8["row"], idx, scale)
    cands["ws bf16 keys"] = lambda: ws.forward(q, kv[:, 0, :512], None, kv[:, 0, 512:], idx, scale)
    for regs in ((224, 56), (208, 88)):
        cands[f"fp8-mma {regs[0]}/{regs[1]}"] = lambda r=regs: fm.forward(q, *fp8["row"], idx, scale,
                                                                          launch=dict(CONSUMER_REGS=r[0], PRODUCER_REGS=r[1]))
    times = graphed_rounds(cands, 3)
    for name in cands:
        print(f"{name:40s} {statistics.median(times[name]):.4f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
