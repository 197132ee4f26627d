"""Two launches of one sparse MLA forward at batch 64, s_q 2, top-k 2048 (the first compiles and
warms up; Nsight Compute profiles the second), for the profile_*.sh scripts.

Environment: HEADS (16 default: the few-head kernel; 128: the warp-specialized one), LAYOUT
(flashmla or row, FP8 keys; bf16: bf16 keys, warp-specialized or few-head kernel), KERNEL (fp8mma
/ vregs / split: the FP8-products kernel with transposed keys / V^T from registers / scores and
values in separate warpgroups, row scales), LAUNCH (a
Python dict of launch settings, or None for the kernel's default)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_sparse_mla import decode_inputs, fp8_key_sets  # noqa: E402

from mla_compiler.kernels import gluon_fewhead as fh  # noqa: E402
from mla_compiler.kernels import gluon_fp8_mma as fm  # noqa: E402
from mla_compiler.kernels import gluon_fp8_mma_split as fs  # noqa: E402
from mla_compiler.kernels import gluon_fp8_mma_vregs as fv  # noqa: E402
from mla_compiler.kernels import gluon_sparse_mla as gk  # noqa: E402

heads = int(os.environ.get("HEADS", "16"))
q, kv, idx = decode_inputs(heads=heads)
layout = os.environ.get("LAYOUT", "flashmla")
if layout == "bf16":
    keys = (kv[:, 0, :512], None, kv[:, 0, 512:])
else:
    keys = fp8_key_sets(kv)[layout]
kernel = dict(fp8mma=fm, vregs=fv, split=fs).get(os.environ.get("KERNEL", "")) or (fh if heads <= fh.MAX_HEADS else gk)
launch = eval(os.environ.get("LAUNCH") or "None")
for _ in range(2):
    kernel.forward(q, *keys, idx, 576**-0.5, launch=launch)
