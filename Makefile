# medvlp: `make demo` and `make test` work on a fresh clone (they create .venv and install).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# When make started: `make demo` reports install (venv + pip) time as the time from here to the demo's start.
MAKE_T0 := $(shell date +%s.%N)

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first and pinned: a bare `torch` requirement may pull a several-GB download.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m launch.demo --out demo_out --started-at $(MAKE_T0)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_stream.py
	$(BIN)/python benchmarks/bench_contrastive.py
	$(BIN)/python benchmarks/bench_pretrain.py

clean:
	rm -rf demo_out mlruns.db mlruns .pytest_cache
