"""The split FP8-products kernel, one term and two (RESIDUAL_LAUNCH, the residual terms' products
first or last), against its emulation (``reference_fp8_mma`` under ``reference_settings``), the
same emulation with the tensor cores' accumulation modelled (``tensor_core_model``, at several
bit counts) and the exact FP8 reference; and the default FP8 path (the warp-specialized
kernel's FP8 rows, f16 products) against the exact FP8 reference. Inputs: the GPU tests'
(tests/test_gluon_fp8_mma.py's ``_row_keys``: awkward indices, poisoned unselected rows) with
random and with extreme scales (heads 1e-2 .. 10, key rows 2^-20 .. 2^4: scores in the
hundreds). Prints the output's relative error and the lse's largest difference, and writes them
as JSON with ``--out``. Hopper only.

    python benchmarks/fp8_products_accuracy.py [--out accuracy.json]
"""

import argparse
import json
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

LAUNCHES = {
    "one term": None,
    "two terms, residuals last": dict(fs.RESIDUAL_LAUNCH, RESIDUALS_FIRST=0),
    "two terms, residuals first": dict(fs.RESIDUAL_LAUNCH, RESIDUALS_FIRST=1),
}
MODEL_BITS = (None, 13, 14, 15, 16)  # None: fp32 accumulation


def lse_gap(a, b, finite) -> float:
    """The largest lse difference where the reference's is finite (rows with a valid key)."""
    return (a[finite] - b[finite]).abs().max().item()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    for heads, topk, extreme in ((80, 200, True), (128, 2048, True), (80, 200, False), (128, 2048, False)):
        inputs = "%d heads, top-k %d, %s" % (heads, topk, "extreme" if extreme else "random")
        q, latent, scale, rope, idx = _row_keys(heads, topk, "cuda", extreme=extreme)
        exact, exact_lse = fr.sparse_attn_fp8kv_reference(q, latent, scale, rope, idx, SCALE, fr.LATENT, exact_keys=True)
        fin = torch.isfinite(exact_lse)
        for name, launch in LAUNCHES.items():
            out, lse = fs.forward(q, latent, scale, rope, idx, SCALE, launch=launch)
            row = dict(inputs=inputs, path=name, out_vs_exact=rel_err(out, exact), lse_vs_exact=lse_gap(lse, exact_lse, fin), models={})
            for bits in MODEL_BITS:
                em, em_lse = fm.reference_fp8_mma(q, latent, scale, rope, idx, SCALE, tc_bits=bits, **fs.reference_settings(launch))
                row["models"]["fp32" if bits is None else str(bits)] = dict(
                    out_vs_kernel=rel_err(out, em), lse_vs_kernel=lse_gap(lse, em_lse, fin),
                    out_vs_exact=rel_err(em, exact), lse_vs_exact=lse_gap(em_lse, exact_lse, fin))
            rows.append(row)
            print(inputs, "|", name, "| kernel vs exact: out %.2e lse %.3f" % (row["out_vs_exact"], row["lse_vs_exact"]), flush=True)
            for key, m in row["models"].items():
                print("    model %-4s vs kernel: out %.2e lse %.3f | model vs exact: out %.2e lse %.3f"
                      % (key, m["out_vs_kernel"], m["lse_vs_kernel"], m["out_vs_exact"], m["lse_vs_exact"]), flush=True)
        out, lse = ws.forward(q, latent, scale, rope, idx, SCALE)
        rows.append(dict(inputs=inputs, path="default FP8 path (warp-specialized, f16 products)", out_vs_exact=rel_err(out, exact),
                         lse_vs_exact=lse_gap(lse, exact_lse, fin)))
        print(inputs, "| default FP8 path (warp-specialized, f16 products) | kernel vs exact: out %.2e lse %.3f"
              % (rows[-1]["out_vs_exact"], rows[-1]["lse_vs_exact"]), flush=True)
    print("\n| inputs | path | out vs exact | lse vs exact |\n| --- | --- | ---: | ---: |")
    for r in rows:
        print("| %s | %s | %.2e | %.3f |" % (r["inputs"], r["path"], r["out_vs_exact"], r["lse_vs_exact"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
