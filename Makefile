# The two commands: `make demo` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-slow lint install clean bench-gpu bench-gpu-dry gpu-bundle gpu-test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/breakhis demo

lint: $(STAMP)
	$(BIN)/ruff check breakhis jobs tests
	$(BIN)/ruff format --check breakhis jobs tests

# Everything but the tests marked slow; those (the multi-node cluster and its injected
# faults, full training and tuning runs to accuracy, resume and recovery, the benchmarks'
# smoke runs) run with `make test-slow`. CI (.ci/run) runs both.
test: lint
	$(BIN)/pytest -m "not slow"

test-slow: $(STAMP)
	$(BIN)/pytest -m slow --durations=10

# On a machine with one CUDA GPU (no network, no Ray: `sh gpu-bundle/install.sh` first, the
# bundle `make gpu-bundle` packs here): issue 27's table (the training job vs a plain loop, the
# predictor vs the bare forward pass, Grad-CAM) with the date and GPU, in under 8 minutes;
# every figure in bench-gpu/benchmark-gpu.{json,md}. The machine's own python3 and torch.
bench-gpu:
	timeout 480 $(PYTHON) -m breakhis.cli benchmark gpu --workdir bench-gpu --parts predictor,train

# The same script on this CPU at a toy size: checks it runs before a GPU machine is lent.
bench-gpu-dry: $(STAMP)
	$(BIN)/breakhis benchmark gpu --dry-run --workdir bench-gpu-dry --parts predictor,train

# The GPU tests (predictor bf16 vs float32, Ray Train and scoring on the GPU).
gpu-test:
	$(PYTHON) -m pytest -m gpu -q --noconftest tests/test_gpu.py

# Ray's wheel for the GPU machine's Python, stripped, and the small wheels it lacks, with
# install.sh: one folder under 48 MiB to carry there (breakhis/dev/gpu_bundle.py).
gpu-bundle: $(STAMP)
	$(BIN)/python -m breakhis.dev.gpu_bundle gpu-bundle

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache *.egg-info
