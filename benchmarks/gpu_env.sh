# Sourced by the GPU scripts, from the repository root with OUT set: logs the device and the
# software to $OUT/env.log, and installs the wheels the image lacks (torchao), carried in .whl
# (see the README's contributor section).
export PYTHONUNBUFFERED=1 TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total --format=csv 2>&1 | tee "$OUT/env.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$OUT/env.log"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# The memory system's state (copy and random-gather bandwidth), before anything is timed.
nvidia-smi --query-gpu=driver_version,clocks.mem,clocks.max.mem,power.limit,mig.mode.current,ecc.mode.current --format=csv 2>&1 | tee -a "$OUT/env.log"
python3 benchmarks/device_probe.py 2>&1 | tee -a "$OUT/env.log"
