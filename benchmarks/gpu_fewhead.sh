#!/usr/bin/env bash
# One GPU call for the few-head decode (16 heads a GPU, DeepSeek-V3.2 at TP 8): CUDA tests (TESTS,
# default the few-head, Triton-kernel and FP8 tests; none with SKIP_TESTS), the launch sweep in interleaved rounds (bf16 keys, FP8
# FlashMLA layout, FP8 row scale), the FP8 benchmark table at that shape (HBM fraction, errors),
# and Nsight Compute counters of the policy's launches (unless SKIP_NCU). Logs and JSON under $OUT.
# Usage: bash benchmarks/gpu_fewhead.sh [rounds]
set -o pipefail
OUT=${OUT:-.}
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 400 python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_gluon_fewhead.py tests/test_triton_kernels.py tests/test_fp8.py} 2>&1 | tail -25 | tee "$OUT/pytest.log"
fi
timeout 300 python3 benchmarks/bench_decode_launch.py --rounds "${1:-3}" --shapes "b64 h16" --out "$OUT/decode_launch_h16.json" 2>&1 | tail -60 | tee "$OUT/decode_launch_h16.log"
[ -n "${SKIP_FP8_TABLE:-}" ] || MLA_BENCH_FP8_SHAPES="v32-decode b64 h16" timeout 200 python3 benchmarks/bench_sparse_mla.py --only fp8 --out "$OUT/bench_fp8_h16.json" 2>&1 | tail -12 | tee "$OUT/bench_fp8_h16.log"
if [ -z "${SKIP_NCU:-}" ]; then
  cat > /tmp/fewhead_profile_driver.py <<'PY'
import sys
sys.path.insert(0, "benchmarks")
from bench_sparse_mla import decode_inputs, fp8_key_sets
from mla_compiler.kernels import triton_sparse_mla as tk
q, kv, idx = decode_inputs(heads=16)
fp8 = fp8_key_sets(kv)
scale = 576 ** -0.5
tk.forward(q, kv, idx, scale, 512)
tk.forward_fp8(q, *fp8["flashmla"], idx, scale, 512)
tk.forward_fp8(q, *fp8["row"], idx, scale, 512)
PY
  timeout 200 ncu --clock-control none -k regex:_fwd_kernel -c 3 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section SchedulerStats --section WarpStateStats \
    --section LaunchStats --section Occupancy \
    python3 /tmp/fewhead_profile_driver.py > "$OUT/ncu_fewhead.txt" 2>&1
  echo "ncu exit $?"
  grep -E "_fwd_kernel|Duration|Memory Throughput|DRAM Throughput|L2 Hit|Issue Slots Busy|No Eligible|Registers Per|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|Block Limit|Stall" "$OUT/ncu_fewhead.txt" | head -70
fi
