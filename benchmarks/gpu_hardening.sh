#!/usr/bin/env bash
# One GPU call for the hardening checks: CUDA graphs, opcheck on CUDA (reference and Triton),
# export and AOTInductor packaging on CUDA tensors. Logs under $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-.}
cd "$(dirname "$0")/.."
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$OUT/env.log"
timeout 110 python3 benchmarks/cuda_graphs_check.py 2>&1 | grep -v Warning | tee "$OUT/cuda_graphs.log"
timeout 140 python3 -m pytest -q -x -p no:cacheprovider tests/test_op_contracts.py tests/test_export.py 2>&1 | tail -15 | tee "$OUT/pytest_hardening.log"
