#!/usr/bin/env bash
# One GPU call: environment, kernel tests on CUDA, then the benchmark (arguments pass through).
# Logs and JSON go to $OUT. Usage: bash benchmarks/gpu_run.sh [--only kernels|inductor|layer] [--sweep]
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-.}
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total --format=csv 2>&1 | tee "$OUT/env.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$OUT/env.log"
# Wheels the image lacks (torchao), carried in .whl (see the README's contributor section).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
if [ -z "${SKIP_TESTS:-}" ]; then
  python3 -m pytest -q -x -p no:cacheprovider tests/test_triton_kernels.py tests/test_fp8.py 2>&1 | tail -20 | tee "$OUT/pytest.log"
fi
python3 benchmarks/bench_sparse_mla.py --out "$OUT/bench_sparse_mla.json" "$@" 2>&1 | tee "$OUT/bench.log"
