"""The split FP8-products kernel, one term and two (RESIDUAL_LAUNCH), against its emulation
(``reference_fp8_mma`` under ``reference_settings``) and the exact FP8 reference, and the
default FP8 path (the warp-specialized kernel's FP8 rows, f16 products) against the exact FP8
reference, on the GPU
tests' inputs (tests/test_gluon_fp8_mma.py's ``_row_keys``: awkward indices, poisoned unselected
rows) with random and with extreme scales (heads 1e-2 .. 10, key rows 2^-20 .. 2^4: scores in
the hundreds). Prints the output's relative error and the lse's largest difference. Hopper only.

    python benchmarks/fp8_products_accuracy.py
"""

import os
import sys

here = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(here, "..", "tests"))
sys.path.insert(0, os.path.join(here, ".."))

import torch  # noqa: E402
from conftest import rel_err  # noqa: E402
from test_gluon_fp8_mma import SCALE, _row_keys  # noqa: E402

from mla_compiler.kernels import fp8_reference as fr  # noqa: E402
from mla_compiler.kernels import gluon_fp8_mma as fm  # noqa: E402
from mla_compiler.kernels import gluon_fp8_mma_split as fs  # noqa: E402
from mla_compiler.kernels import gluon_sparse_mla as ws  # noqa: E402


def lse_gap(a, b, finite) -> float:
    """The largest lse difference where the reference's is finite (rows with a valid key)."""
    return (a[finite] - b[finite]).abs().max().item()


def main() -> int:
    for heads, topk, extreme in ((80, 200, True), (128, 2048, True), (80, 200, False), (128, 2048, False)):
        q, latent, scale, rope, idx = _row_keys(heads, topk, "cuda", extreme=extreme)
        exact, exact_lse = fr.sparse_attn_fp8kv_reference(q, latent, scale, rope, idx, SCALE, fr.LATENT, exact_keys=True)
        fin = torch.isfinite(exact_lse)
        for launch in (None, fs.RESIDUAL_LAUNCH):
            out, lse = fs.forward(q, latent, scale, rope, idx, SCALE, launch=launch)
            em, em_lse = fm.reference_fp8_mma(q, latent, scale, rope, idx, SCALE, **fs.reference_settings(launch))
            print(heads, topk, "extreme" if extreme else "random", "residuals" if launch else "default",
                  "out vs emul %.2e vs exact %.2e (emul vs exact %.2e)" % (rel_err(out, em), rel_err(out, exact), rel_err(em, exact)),
                  "lse vs emul %.3f vs exact %.3f (emul vs exact %.3f)" % (lse_gap(lse, em_lse, fin), lse_gap(lse, exact_lse, fin),
                                                                          lse_gap(em_lse, exact_lse, fin)), flush=True)
        out, lse = ws.forward(q, latent, scale, rope, idx, SCALE)
        print(heads, topk, "extreme" if extreme else "random", "default FP8 path (warp-specialized, f16 products)",
              "out vs exact %.2e lse vs exact %.3f" % (rel_err(out, exact), lse_gap(lse, exact_lse, fin)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
