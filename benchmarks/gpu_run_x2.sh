#!/usr/bin/env bash
# One call on a 2-GPU machine: FSDP2 + FP8 all-gather training (NCCL, both GPUs), then on GPU 0 the
# CUDA-graph checks and compute-sanitizer over every kernel. Logs under $OUT.
set -o pipefail
OUT=${OUT:-.}
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
timeout 300 torchrun --nproc_per_node 2 benchmarks/fsdp_fp8.py --layers 2 --seq 2048 --steps 8 --warmup 3 --inner aot_eager --out "$OUT/fsdp_fp8.json" 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/fsdp.log" | tail -8
CUDA_VISIBLE_DEVICES=0 timeout 150 python3 benchmarks/cuda_graphs_check.py 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/cudagraphs.log" | tail -5
for tool in memcheck initcheck racecheck; do
  CUDA_VISIBLE_DEVICES=0 timeout 100 compute-sanitizer --tool $tool --error-exitcode 9 python3 benchmarks/sanitize_kernels.py > "$OUT/sanitize_$tool.log" 2>&1
  echo "compute-sanitizer $tool: exit $? ; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|SANITIZE LAUNCHES DONE' "$OUT/sanitize_$tool.log" | tr '\n' ' ')"
done | tee "$OUT/sanitize.log"
