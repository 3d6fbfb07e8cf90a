# medvlp: `make demo` and `make test` work on a fresh clone (they create .venv and install).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every install takes its versions from this lock (pip constraints); `make lock` regenerates it from pyproject.toml.
LOCK := constraints.txt
PYTEST_ARGS ?=
# Test processes (pytest-xdist): 2 matches the 2-core CI box; TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
# Options of the demo, e.g. make demo DEMO_ARGS="--steps 150" (see python -m medvlp.launch.demo --help).
DEMO_ARGS ?=
# When make started: `make demo` reports install (venv + pip) time as the time from here to the demo's start.
MAKE_T0 := $(shell date +%s.%N)

.PHONY: install lock demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first and pinned: a bare `torch` requirement may pull a several-GB download.
$(STAMP): $(BIN)/python pyproject.toml $(LOCK)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install -c $(LOCK) torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

# Refresh the lock on purpose: resolve pyproject.toml's ranges afresh in a throw-away venv and pin what came out.
lock:
	rm -rf .lock-venv
	$(PY) -m venv .lock-venv
	.lock-venv/bin/pip install --upgrade pip >/dev/null
	.lock-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
	.lock-venv/bin/pip install ".[dev]"
	.lock-venv/bin/pip freeze --exclude-editable | grep -v -e '^medvlp' -e '^-e ' > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .lock-venv

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m medvlp.launch.demo --out demo_out --started-at $(MAKE_T0) $(DEMO_ARGS)

# --dist loadfile: a test file runs in one worker, so its module fixtures (built corpora, trained towers) are built once.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_stream.py
	$(BIN)/python benchmarks/bench_contrastive.py
	$(BIN)/python benchmarks/bench_pretrain.py

clean:
	rm -rf demo_out mlruns.db mlruns mlartifacts medvlp-outputs .pytest_cache
