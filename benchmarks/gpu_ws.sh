#!/usr/bin/env bash
# One GPU call for the warp-specialized forward: CUDA tests (unless SKIP_TESTS), then interleaved
# timings against the Triton forward at the V3.2 decode shape, and at prefill when PREFILL names
# launches; STRESS=n back-to-back repeatability, MEMCHECK=1 compute-sanitizer memcheck. Logs and
# JSON under $OUT.
# Usage: bash benchmarks/gpu_ws.sh ["consumer/producer/BLOCK_N/STAGES/IN_SLOT[/SPLIT_S[/PRODUCER_DEFAULT[/CHUNKED[/CHUNK_BUFFERS]]]],..."] [rounds]
set -o pipefail
OUT=${OUT:-.}
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
if [ -n "${CHECK:-}" ]; then
  timeout 200 python3 benchmarks/bench_ws_decode.py check 2>&1 | tail -20 | tee "$OUT/ws_check.log"
fi
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 540 python3 -m pytest -q -p no:cacheprovider tests/test_gluon_kernel.py tests/test_triton_kernels.py tests/test_fp8.py 2>&1 | tail -15 | tee "$OUT/pytest.log"
fi
timeout 420 python3 benchmarks/bench_ws_decode.py time --rounds "${2:-3}" --launches "${1:-216/72/64/2/1,224/56/64/2/1}" --out "$OUT/ws_decode.json" 2>&1 | tail -40 | tee "$OUT/ws_decode.log"
if [ -n "${STRESS:-}" ]; then
  timeout 200 python3 benchmarks/bench_ws_decode.py stress --repeats "$STRESS" 2>&1 | tail -8 | tee "$OUT/ws_stress.log"
fi
if [ -n "${MEMCHECK:-}" ]; then
  timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 python3 benchmarks/sanitize_kernels.py > "$OUT/sanitize_memcheck.log" 2>&1
  echo "compute-sanitizer memcheck: exit $? ; $(grep -E 'ERROR SUMMARY|SANITIZE LAUNCHES DONE' "$OUT/sanitize_memcheck.log" | tr '\n' ' ')"
fi
if [ -n "${PREFILL:-}" ]; then
  timeout 200 python3 benchmarks/bench_ws_decode.py time --shape prefill --rounds 2 --launches "$PREFILL" --out "$OUT/ws_prefill.json" 2>&1 | tail -20 | tee "$OUT/ws_prefill.log"
fi
