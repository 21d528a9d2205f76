# pkfast developer entry points. Each target creates (or reuses) the virtual environment in $(VENV).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pkfast-installed
PYTEST_ARGS ?=

.PHONY: venv demo test test-slow test-timm bench gpu-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q -e .
	@touch $@

## make demo: train a small MLP on scikit-learn's digits while recording, compute its path-kernel Gram, report.
demo: venv
	$(PY) examples/demo.py

## make test: the default test suite (slow tests excluded; includes Triton interpreter tests).
test: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# exit status 5 means "no test selected": not a failure while no test is marked slow
test-slow: venv
	$(PY) -m pytest -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

## make test-timm: timm's ResNet/ViT route tests in their own environment (.venv-timm): timm needs a torchvision
## built for its torch, and the one for the dev set-up's torch 2.13 CPU build is not installable here; torch 2.14.1
## with torchvision 0.29.1 is (both from the machine's local wheels).
TIMM_VENV := .venv-timm
$(TIMM_VENV)/.pkfast-installed: pyproject.toml setup.py
	@test -x $(TIMM_VENV)/bin/python || $(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 timm==1.0.31 pytest numpy tqdm safetensors
	$(TIMM_VENV)/bin/python -m pip install -q --no-deps -e .
	@touch $@

test-timm: $(TIMM_VENV)/.pkfast-installed
	$(TIMM_VENV)/bin/python -m pytest tests/layers/test_timm_rules.py -k timm $(PYTEST_ARGS)

## make bench: the benchmark suite (pytest-benchmark), see benchmarks/README.md.
bench: venv
	$(PY) -m pytest benchmarks/test_bench_gram.py benchmarks/bench_recorder.py -p no:cacheprovider --benchmark-only $(PYTEST_ARGS)

## make gpu-check: on a machine with a CUDA GPU, the Triton kernel's tests, the kernel vs cuBLAS and gram on CUDA vs CPU
## (one table, PASS/FAIL, under 8 minutes); without CUDA it says so and exits 0.
gpu-check: venv
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .benchmarks
