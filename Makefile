# The two commands: `make demo` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-slow lint install clean bench-gpu

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

# On a machine with one CUDA GPU: the GPU benchmarks (predictor, decode ceiling, score, train)
# in about 6 minutes; figures in bench-gpu/benchmark-gpu.{json,md}. GPU tests: pytest -m gpu.
bench-gpu: $(STAMP)
	$(BIN)/pytest -m gpu -q
	$(BIN)/breakhis benchmark gpu --workdir bench-gpu

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache *.egg-info
