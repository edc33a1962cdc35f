# The two commands: `make demo` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-fast lint install clean

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

test: lint
	$(BIN)/pytest

# Unit tests only: no Ray, no S3 server.
test-fast: $(STAMP)
	$(BIN)/pytest -m "not ray and not s3 and not slow"

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache *.egg-info
