#!/usr/bin/env bash
# compute-sanitizer (memcheck, initcheck, racecheck) over every kernel, one GPU. Logs under $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-.}
cd "$(dirname "$0")/.."
for tool in memcheck initcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --error-exitcode 9 python3 benchmarks/sanitize_kernels.py > "$OUT/sanitize_$tool.log" 2>&1
  echo "compute-sanitizer $tool: exit $? ; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|SANITIZE LAUNCHES DONE' "$OUT/sanitize_$tool.log" | tr '\n' ' ')"
done | tee "$OUT/sanitize.log"
