# Two entry points: `make demo` runs the main job on the embedded tiny world, `make test` runs every test.
# Both bootstrap .venv on first use (idempotent); torch is pinned in the same pip call so that the
# local CPU build is taken instead of a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tcapguard-installed
TORCH ?= torch==2.13.0

.PHONY: help demo test lint benchmark-world benchmark-robust gallery clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q "$(TORCH)" -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP) ## run the main job on the embedded default (tiny world, BadNet 10%)
	$(BIN)/tcapguard demo

test: $(STAMP) ## run ruff and the whole test suite
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

benchmark-world: $(STAMP) ## train the tiny world per attack and print clean accuracy / ASR
	$(BIN)/python benchmarks/world.py

benchmark-robust: $(STAMP) ## plain vs robust fine-tuning on the tiny world: clean accuracy, ASR, loss ablation
	$(BIN)/python benchmarks/robust.py

gallery: $(STAMP) ## render the trigger examples under docs/triggers
	$(BIN)/python benchmarks/trigger_gallery.py

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
