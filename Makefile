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

demo: $(STAMP) ## run the whole job on the embedded default (tiny Gemma3 world, BadNet 10%, local MLflow)
	$(BIN)/tcapguard demo

test: $(STAMP) ## run ruff and the whole test suite (two workers, one file each at a time)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

benchmark-world: $(STAMP) ## train the tiny world per attack and print clean accuracy / ASR
	$(BIN)/python benchmarks/world.py

benchmark-robust: $(STAMP) ## plain vs robust fine-tuning on the tiny world: clean accuracy, ASR, loss ablation
	$(BIN)/python benchmarks/robust.py

gallery: $(STAMP) ## render the trigger examples under docs/triggers
	$(BIN)/python benchmarks/trigger_gallery.py

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache

# --- deploy: images and chart (issue 6) ---
HELM := .cache/tools/helm
IMAGE ?= ghcr.io/tcapguard/tcapguard
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
.PHONY: helm images image-lock
test: $(HELM)

helm: $(HELM) ## fetch a static helm binary into .cache/tools (the chart tests use it)

$(HELM): scripts/get-helm.sh | $(STAMP)
	PYTHON=$(BIN)/python scripts/get-helm.sh $(HELM)

images: ## build the CPU and CUDA images (needs a Docker engine)
	docker build -f docker/Dockerfile -t $(IMAGE):$(VERSION) .
	docker build -f docker/Dockerfile.cuda -t $(IMAGE):$(VERSION)-cuda .

image-lock: $(STAMP) ## re-pin the image's Python packages (docker/requirements.lock) from .venv
	$(BIN)/python scripts/lock_image_requirements.py

# --- S3 tests: a real Ceph RADOS Gateway (tests/s3server.py starts it; Debian packages) ---
CEPH_PACKAGES := radosgw ceph-mon ceph-osd
.PHONY: ceph
test: ceph

ceph: ## install the Ceph packages the S3 tests run (apt-get as root or sudo; skipped when present)
	@if command -v radosgw >/dev/null && command -v ceph-mon >/dev/null && command -v ceph-osd >/dev/null; then \
	  :; \
	elif ! command -v apt-get >/dev/null; then \
	  echo "warning: no apt-get to install $(CEPH_PACKAGES): the S3 tests fail in CI and skip elsewhere"; \
	else \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo -n"; \
	  echo "installing $(CEPH_PACKAGES) with apt-get (about 20 s)"; \
	  { $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends $(CEPH_PACKAGES) >/dev/null; } \
	  || echo "warning: could not install $(CEPH_PACKAGES): the S3 tests fail in CI and skip elsewhere"; \
	fi

# --- orchestrators (issue 6) ---
.PHONY: kfp-compile
kfp-compile: $(STAMP) ## recompile pipelines/tcapguard_pipeline.yaml (a test fails while it is stale)
	PYTHONPATH=src:. $(BIN)/python -m pipelines.tcapguard_pipeline
