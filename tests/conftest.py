import os

import pytest
import torch

# Triton kernels are tested on CPU through the interpreter. Triton reads this when a kernel is
# defined, so it must be set before any test imports the kernel module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "inductor"))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch, reads its own counters and sees the backend's once-a-site
    FP8 warnings afresh (they are remembered for the process, and a test process runs tests in an
    order that depends on how the suite is split between processes)."""
    from torch._dynamo.utils import counters

    from mla_compiler import backend

    torch._dynamo.reset()
    counters.clear()
    backend._fp8_warned.clear()
    yield
    torch._dynamo.reset()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compiled_for_hopper(script: str) -> dict:
    """Runs ``script`` in a child process without TRITON_INTERPRET (under the interpreter the
    kernels compile nothing) from the repository root; returns the JSON it prints last. For
    checking what kernels compile to for sm_90 on a machine without a GPU."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
