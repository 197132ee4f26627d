#!/usr/bin/env bash
# Nsight Compute counters of the few-head FP8 forward, one launch each (LAUNCHES, a Python list of
# launch dicts; default: the kernel without warp specialization, the mma.sync warp-specialized one
# with Q read from shared memory and with Q held, and the default launch) per key layout (LAYOUTS,
# default "flashmla"), batch 64, s_q 2, 16 heads, top-k 2048. Writes $OUT/ncu_fewhead_ws.txt and
# prints the lines that say what bounds them (pipes, stalls, shared-memory bank conflicts); the
# file also has the source lines with the most stall samples (SourceCounters; NCU_DETAILS=1: every
# section's tables, e.g. which source lines make the excessive global sectors).
OUT=${OUT:-.}
cd "$(dirname "$0")/.."
cat > /tmp/fewhead_ws_driver.py <<'PY'
import os, sys
sys.path.insert(0, "benchmarks")
from bench_sparse_mla import decode_inputs, fp8_key_sets
from mla_compiler.kernels import gluon_fewhead as fh
q, kv, idx = decode_inputs(heads=16)
launches = eval(os.environ.get("LAUNCHES") or "[dict(WS=False), dict(WS=True, Q_HELD=False), dict(WS=True), None]")
for layout in os.environ.get("LAYOUTS", "flashmla").split():
    latent, scale, rope = fp8_key_sets(kv)[layout]
    for launch in launches:
        fh.forward(q, latent, scale, rope, idx, 576 ** -0.5, launch=launch)
PY
COUNT=$(python3 -c "import os; print(len(eval(os.environ.get('LAUNCHES') or '[1, 2, 3, 4]')) * len(os.environ.get('LAYOUTS', 'flashmla').split()))")
timeout 240 ncu --clock-control none -k regex:fewhead -c "$COUNT" ${NCU_DETAILS:+--print-details all} \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section SchedulerStats \
  --section WarpStateStats --section ComputeWorkloadAnalysis --section InstructionStats --section SourceCounters \
  python3 /tmp/fewhead_ws_driver.py > "$OUT/ncu_fewhead_ws.txt" 2>&1
echo "ncu exit $?"
grep -E "fewhead|Duration|DRAM Throughput|Compute \(SM\) Throughput|Issue Slots Busy|No Eligible|Bank Conflicts|Shared Load|Shared Store|Stall|Warp Cycles Per Issued|Executed Ipc|Pipe|L1/TEX Hit|Mem Busy|Max Bandwidth" "$OUT/ncu_fewhead_ws.txt" | head -80
