# Two commands set everything up from a fresh clone: `make train` and `make test`.
# Each creates the virtual environment it needs (only Python 3.10+ and make required).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# `make test` needs every extra its tests use (MPI, launchers, the PostgreSQL driver);
# `make train` only the training app's.
EXTRAS ?= dev,train,distributed,scale
TRAIN_EXTRAS ?= train
comma := ,
stamp = $(VENV)/.installed-$(subst $(comma),+,$(1))
STAMP := $(call stamp,$(EXTRAS))
TRAIN_STAMP := $(call stamp,$(TRAIN_EXTRAS))
# Arguments passed through to the training app, e.g. `make train ARGS="trainer.epochs=5"`.
ARGS ?=

.PHONY: venv test test-fast lint train explain bench bench-smoke server clean

venv: $(STAMP)

# One stamp per set of extras installed (.installed-dev+train+...): the set comes back
# from the stamp's name.
$(VENV)/.installed-%: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "gpucnn needs Python >= 3.10; found " + sys.version.split()[0] + " (set PYTHON=...)")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[$(subst +,$(comma),$*)]'
	@touch $@

lint: $(STAMP)
	$(PY) -m ruff check gpucnn tests docs $(wildcard benchmarks)

test: lint
	$(PY) -m pytest

# The edit-test loop: everything but the tests marked slow (about 15 s on 2 cores).
test-fast: lint
	$(PY) -m pytest -m "not slow"

train: $(TRAIN_STAMP)
	$(PY) -m gpucnn.train experiment=digits $(ARGS)

explain: $(TRAIN_STAMP)
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
