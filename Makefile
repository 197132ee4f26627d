# The two front-door commands. Each sets up its own virtual environment on a fresh machine.
#   make demo   compile a reference MLA model with backend="sparse_mla": what matched, what ran, how fast
#   make test   the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The exact CPU build CI pins; the package itself accepts torch>=2.11,<2.15.
TORCH_SPEC ?= torch==2.13.0

export TORCHAO_FORCE_SKIP_LOADING_SO_FILES := 1

.PHONY: demo test setup clean browser

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q numpy "triton>=3.6" "torchao==0.18.0" "pytest>=8" "pytest-xdist>=3" "hypothesis>=6"
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m mla_compiler.demo

# The graph-dump page is tested in headless Chromium; install it where apt and root allow.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "make: chromium not installed; the page-rendering test will be skipped"

# Two test processes: the suite is CPU-bound (Inductor's C++ builds, the Triton interpreter), and
# CI's two cores then finish it in about two thirds of the time.
TEST_WORKERS ?= 2

test: $(VENV)/.installed browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
