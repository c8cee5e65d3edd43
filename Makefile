# The two commands: `make serve` and `make test`. Both set everything up (venv, install,
# data, model, feature database) and are idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 3000
PYTEST_ARGS ?=
# Wait for another apt-get (a second checkout's `make test`) instead of failing on its lock.
APT := apt-get -o DPkg::Lock::Timeout=600

export BENTOML_HOME ?= $(CURDIR)/bentoml_home
export BENTOML_DO_NOT_TRACK := true
export OMP_NUM_THREADS ?= 1

.PHONY: install setup serve test test-fast lint bench loadtest clean servers bento image smoke fuzz cluster cluster-stop soak canary-sim consistency

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(VENV)/.installed

setup: install
	$(BIN)/ctr -v setup

# With CTR_REDIS_URL left at its default and no Redis answering there, a private one (files
# in data/redis, append-only) runs with the service and stops with it; CTR_REDIS_URL= runs without L2.
serve: setup
	$(BIN)/python -m ctr.cli.private_redis $(BIN)/bentoml serve service:CTRGateway --host $(HOST) --port $(PORT)

# The tests start private Redis, Redis Cluster and PostgreSQL servers from these binaries,
# and open the status page in headless Chromium.
servers:
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null || \
		{ $(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq redis-server; }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
		{ $(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq postgresql; }
	@command -v chromium >/dev/null || \
		{ $(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq chromium; }

test: setup servers
	$(BIN)/pytest $(PYTEST_ARGS)

# The unit tests alone (no Redis, PostgreSQL, bentoml serve, image or browser; tests/conftest.py
# says which are integration tests): about a minute, for every change; `make test` runs all.
test-fast: install
	$(BIN)/pytest -q -m "not integration" $(PYTEST_ARGS)

# A longer schemathesis run against a real `bentoml serve` (make test runs 100 examples an
# operation and phase, about 1,300 requests).
FUZZ_EXAMPLES ?= 1000
fuzz: setup servers
	CTR_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -s -q tests/test_fuzz.py --timeout 1800

# 10 minutes of open-loop load at ~70 % of measured capacity with faults on a schedule
# (tests/test_soak.py; make test runs a 60 s version). Report: reports/soak.md.
SOAK_S ?= 600
soak: setup servers
	SOAK_S=$(SOAK_S) SOAK_REPORT=reports/soak.md $(BIN)/pytest -q -s tests/test_soak.py

# The feature-write history checker on real processes under faults (tests/test_consistency.py;
# make test runs a 40 s version). Report: reports/consistency.md.
CONSISTENCY_S ?= 300
consistency: setup servers
	CONSISTENCY_S=$(CONSISTENCY_S) CONSISTENCY_REPORT=reports/consistency.md $(BIN)/pytest -q -s tests/test_consistency.py

# An immutable Bento: code, the exact model version, the feature database, pinned packages.
# The tag goes to build/bento.tag. GPU=1 builds the GPU variant (PyPI's CUDA torch).
bento: setup
	$(BIN)/ctr -v ship bento $(if $(GPU),--gpu)

# The Bento as an OCI image (build/image.tag): Docker when an engine answers, else buildah
# and podman (installed with apt-get), a local debootstrap base and a host-side wheelhouse.
image: bento
	$(BIN)/ctr -v ship image

# Run the image on a loopback port, wait for /readyz, POST /predict, stop it.
smoke: image
	$(BIN)/ctr -v ship smoke

lint: install
	$(BIN)/ruff check ctr models tests service.py
	$(BIN)/ruff format --check ctr models tests service.py

bench: setup
	$(BIN)/ctr bench e2e --url http://$(HOST):$(PORT)

# A bounded headless Locust run; starts the service when it is not running.
$(VENV)/.load-installed: $(VENV)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,load]'
	touch $@

loadtest: setup $(VENV)/.load-installed
	$(BIN)/ctr loadtest --url http://$(HOST):$(PORT) --users 16 --duration 30s --out reports/loadtest

# Whole canary rollouts under a fake clock (docs/canary.md): five bad canaries and a
# good one (real trained models) at 10,000 and 1,000 requests/s; A/A canaries at every start hour
# with a daily cycle and heterogeneous users (240 per traffic and spread); canaries exactly at
# each gate's margin (240 per gate). About 25 minutes on two cores.
canary-sim: install
	$(BIN)/ctr canary simulate --aa-seeds 240 --margin-seeds 240 --workdir build/canary-sim --json-out build/canary-sim/outcomes.json

clean:
	rm -rf $(VENV) data bentoml_home reports build

# The local topology: gateway, FeatureService, FallbackService and REPLICAS CTRModel replicas,
# each a process of its own on loopback (as deploy/k8s runs them); Ctrl-C or `make cluster-stop`.
REPLICAS ?= 3
cluster: setup
	$(BIN)/ctr cluster --replicas $(REPLICAS) --port $(PORT)

cluster-stop:
	$(BIN)/ctr cluster stop
