# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

# The CPU build of torch goes in first so nothing later resolves `torch` to the CUDA wheels;
# deepspeed builds against that torch, hence --no-build-isolation.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "deepspeed>=0.18"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

# The whole suite with the CPU fast paths (train.cpu_kernels=auto), then the training run's
# tests once more with them off: the model exactly as written must train the same way.
test: $(STAMP)
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q tests/train/test_train_run.py --cpu-kernels=off

bench: $(STAMP)
	$(PY) scripts/bench_prepare.py --out bench/prepare.json
	$(PY) scripts/bench_train.py
	$(PY) scripts/bench_precision.py --out bench/precision.json

clean:
	rm -rf $(VENV) .demo
