"""One warp-specialized few-head FP8 launch against the FP8 reference, before anything slower
runs (a hang here is the hand-over's barriers): prints the error and the time of one call."""
import time

import torch

from mla_compiler.kernels import fp8_reference as fr
from mla_compiler.kernels import gluon_fewhead as fh
from mla_compiler.kernels.awkward_inputs import awkward_inputs

q, kv, idx = awkward_inputs(heads=16, topk=2048)
for layout in ("flashmla", "row"):
    latent, scale, rope = fr.quantize_keys(kv, layout)
    t0 = time.time()
    out, lse = fh.forward(q, latent, scale, rope, idx, 576**-0.5, launch=dict(WS=True))
    torch.cuda.synchronize()
    ref, ref_lse = fr.sparse_attn_fp8kv_reference(q, latent, scale, rope, idx, 576**-0.5, 512)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"WS {layout}: rel err {err:.2e}, first call {time.time() - t0:.1f} s, launch {fh.LAST_LAUNCH}")
