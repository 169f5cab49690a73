# Estat — developer and operator commands.
#   make run-local   venv + install + run on the local directory store (./estat-data)
#   make test        venv + install with test extras + the whole suite (pytest)
#   make build/push  the Docker image (IMAGE, TAG, AWS_ACCOUNT_ID, AWS_REGION, ECR_REPO)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

IMAGE ?= estat
TAG ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo dev)
AWS_REGION ?= ap-northeast-2
AWS_ACCOUNT_ID ?=
ECR_REPO ?= estat
ECR_REGISTRY = $(AWS_ACCOUNT_ID).dkr.ecr.$(AWS_REGION).amazonaws.com

.PHONY: venv compiled run-local test bench soak crash-soak build push clean

$(STAMP): setup.cfg setup.py pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# editable_mode=compat puts the checkout on sys.path, which is what
	# lets twistd find twisted/plugins/estat_plugin.py in a dev install.
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

# The compiled build of the hot modules, in place beside their sources
# (estat/_compiled.py).  Without Cython or a C compiler it says so in one
# line and the server runs pure Python.
compiled: $(STAMP)
	$(BIN)/python setup.py -q build_ext --inplace

venv: $(STAMP)

run-local: $(STAMP) compiled
	$(BIN)/twistd --nodaemon --pidfile= --reactor=estat estat

#: The suites of the modules that are compiled, run again as pure Python.
PURE_SUITES = estat/test/test_http_protocol.py estat/test/test_ingest.py \
	estat/test/test_metrics.py estat/test/test_event.py \
	estat/test/test_ingest_admission.py estat/test/test_ingest_validation.py \
	estat/test/test_ingest_segment_api.py estat/test/test_http_routes.py \
	estat/test/test_http_routes_clients.py estat/test/test_compiled.py \
	estat/test/test_e2e_http_conformance.py

test: $(STAMP) compiled
	$(BIN)/python -c 'from estat._compiled import describe; print("estat build:", describe())'
	$(BIN)/python -m pytest -q
	ESTAT_PURE=1 $(BIN)/python -m pytest -q $(PURE_SUITES)

bench: $(STAMP)
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	# system calls per request (needs strace and perf; skipped without them)
	if command -v strace >/dev/null && command -v perf >/dev/null; then $(BIN)/python bench/syscalls.py; else echo 'bench/syscalls.py skipped: needs strace and perf'; fi
	$(BIN)/python bench/compression.py
	$(BIN)/python bench/tables.py --out bench/RESULTS.md $(TABLES_ARGS)
	$(BIN)/python bench/encoders.py
	$(BIN)/python bench/validators.py
	$(BIN)/python bench/workers.py --out bench/RESULTS.md

soak: $(STAMP)
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

# SIGKILL under load, ACK_MODE=disk and stored, local store and moto S3 via the fault proxy
crash-soak: $(STAMP)
	$(BIN)/python bench/crash.py --output bench/CRASH.md $(CRASH_ARGS)

build:
	docker build -t $(IMAGE):$(TAG) .

push: build
	@test -n "$(AWS_ACCOUNT_ID)" || (echo "set AWS_ACCOUNT_ID (and AWS_REGION, ECR_REPO)"; exit 2)
	aws ecr get-login-password --region $(AWS_REGION) | docker login --username AWS --password-stdin $(ECR_REGISTRY)
	docker tag $(IMAGE):$(TAG) $(ECR_REGISTRY)/$(ECR_REPO):$(TAG)
	docker push $(ECR_REGISTRY)/$(ECR_REPO):$(TAG)

clean:
	rm -rf $(VENV) build dist *.egg-info estat-data estat/_compiled.json
	find estat \( -name '*.so' -o -name '*.c' \) -delete
