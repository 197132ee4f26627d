# One GPU call for the FP8-products kernels: their GPU tests, the side-by-side benchmark (BENCH=1),
# then the launch-setting probe (timings; each setting checked against its reference first).
# Logs under $OUT.
#   OUT=... [BENCH=1] [TESTS_K=expr] [TEST_FILES=...] bash benchmarks/gpu_fp8_mma.sh [probe args...]
set -u
source benchmarks/gpu_env.sh >/dev/null 2>&1
export PYTHONPATH=.:${PYTHONPATH:-}
timeout ${TEST_LIMIT:-240} python3 -m pytest -q -p no:cacheprovider ${TEST_FILES:-tests/test_gluon_fp8_mma.py tests/test_gluon_fp8_mma_split.py tests/test_gluon_fp8_mma_vregs.py} ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT/tests.log" | tail -6
if [ "${BENCH:-0}" = 1 ]; then
  timeout ${BENCH_LIMIT:-200} python3 benchmarks/bench_fp8_mma.py --rounds 5 --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -12
fi
timeout ${PROBE_LIMIT:-200} python3 benchmarks/probe_fp8_mma.py --out "$OUT/probe.json" "$@" 2>&1 | tee "$OUT/probe.log" | tail -16
