#!/usr/bin/env bash
# Nsight Compute counters of the warp-specialized forward at the V3.2 decode shape (bf16 keys,
# FP8 FlashMLA layout, FP8 row scale: one launch each), for locating its bottleneck: tensor and
# shared-memory pipe use, issue slots, warp stalls. Needs a runtime where ncu reads counters.
# Usage: bash benchmarks/profile_ws_decode.sh   (report under $OUT/ncu_ws_decode.txt)
set -o pipefail
OUT=${OUT:-.}
cd "$(dirname "$0")/.."
cat > /tmp/ws_profile_driver.py <<'PY'
import sys
sys.path.insert(0, "benchmarks")
from bench_sparse_mla import decode_inputs, fp8_key_sets
from mla_compiler.kernels import gluon_sparse_mla as gk
q, kv, idx = decode_inputs()
fp8 = fp8_key_sets(kv)
scale = 576 ** -0.5
gk.forward(q, kv[:, 0, :512], None, kv[:, 0, 512:], idx, scale)
gk.forward(q, *fp8["flashmla"], idx, scale)
gk.forward(q, *fp8["row"], idx, scale)
PY
timeout 500 ncu --clock-control none -k regex:_ws_fwd_kernel -c 3 \
  --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  --section MemoryWorkloadAnalysis_Tables --section SchedulerStats --section WarpStateStats --section LaunchStats \
  python3 /tmp/ws_profile_driver.py > "$OUT/ncu_ws_decode.txt" 2>&1
echo "ncu exit $?"
grep -E "_ws_fwd_kernel|Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|L1/TEX Hit|L2 Hit|Issue Slots Busy|Executed Ipc A|No Eligible|Shared Memory|Stall|Registers Per|Warp Cycles Per Issued|Tensor|pipe|bank conflict" "$OUT/ncu_ws_decode.txt" | head -120
