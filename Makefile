# Two commands set everything up from a fresh clone: `make train` and `make test`.
# Each creates the virtual environment it needs (only Python 3.10+ and make required).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,train,distributed,scale
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
# Arguments passed through to the training app, e.g. `make train ARGS="trainer.epochs=5"`.
ARGS ?=

.PHONY: venv test test-fast lint train explain bench bench-smoke server clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "gpucnn needs Python >= 3.10; found " + sys.version.split()[0] + " (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[$(EXTRAS)]'
	@touch $@

lint: $(STAMP)
	$(PY) -m ruff check gpucnn tests docs $(wildcard benchmarks)

test: lint
	$(PY) -m pytest

# The edit-test loop: everything but the tests marked slow (about 15 s on 2 cores).
test-fast: lint
	$(PY) -m pytest -m "not slow"

train: $(STAMP)
	$(PY) -m gpucnn.train experiment=digits $(ARGS)

explain: $(STAMP)
	$(PY) -m gpucnn.explain

# Full side-by-side benchmark (install torch for the reference: make venv EXTRAS=dev,train,bench).
bench: $(STAMP)
	$(PY) benchmarks/bench.py --json runs/bench/latest.json

bench-smoke: $(STAMP)
	$(PY) benchmarks/bench.py --quick

# A team's MLflow tracking server: PostgreSQL (a local one under runs/postgres unless
# ARGS="--db postgresql://...") and artifacts served by the server, on 127.0.0.1:5000.
server: $(STAMP)
	$(PY) scripts/tracking_server.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
