#!/usr/bin/env bash
# One GPU call: environment, kernel tests on CUDA, then the benchmark (arguments pass through).
# Logs and JSON go to $OUT. Usage: bash benchmarks/gpu_run.sh [--only kernels|inductor|layer] [--sweep]
set -o pipefail
OUT=${OUT:-.}
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
if [ -z "${SKIP_TESTS:-}" ]; then
  python3 -m pytest -q -x -p no:cacheprovider tests/test_triton_kernels.py tests/test_fp8.py 2>&1 | tail -20 | tee "$OUT/pytest.log"
fi
python3 benchmarks/bench_sparse_mla.py --out "$OUT/bench_sparse_mla.json" "$@" 2>&1 | tee "$OUT/bench.log"
