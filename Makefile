# Two entry points: `make demo` (the default pipeline) and `make test` (lint + tests).
# Both create .venv and install the package with its dev extra on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-slow lint format bench browser clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "lxt==2.1.*"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/crp-toolkit run

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# headless Chromium and its chromedriver for the HTML atlas's browser tests (Debian packages;
# root, or sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: lint browser
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) browser
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_lrp.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache
