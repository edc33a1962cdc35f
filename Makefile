# The two commands: `make demo` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-slow lint install clean

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

# Everything but the tests marked slow (multi-node cluster, fault injection, full
# training/tuning runs); those run with `make test-slow`.
test: lint
	$(BIN)/pytest -m "not slow"

test-slow: $(STAMP)
	$(BIN)/pytest -m slow

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache *.egg-info
