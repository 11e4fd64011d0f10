# Sluice: `make run` starts everything in the foreground; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SLUICE := $(VENV)/bin/sluice
STAMP := $(VENV)/.installed

.PHONY: help prereqs install kafka-jars protos lint test run up down status clean

help:
	@echo "make run     build what is missing, start the whole stack in the foreground"
	@echo "make up      same, in the background;  make down  stops it;  make status"
	@echo "make test    every test (starts its own Kafka broker and services)"
	@echo "make lint    ruff, mypy, buf lint, stale-stub check"
	@echo "make protos  regenerate the Python stubs from protos/"

prereqs:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (found %s)" % sys.version.split()[0])'
	@command -v java >/dev/null || { echo "java not found: install Java 17+ (e.g. apt-get install openjdk-17-jre-headless)"; exit 1; }
	@command -v mvn >/dev/null || { echo "mvn not found: install Maven (e.g. apt-get install maven)"; exit 1; }
	@command -v cc >/dev/null || { echo "no C compiler: install gcc (needed once to build llama-cpp-python)"; exit 1; }
	@command -v cmake >/dev/null || { echo "cmake not found: install cmake (needed once to build llama-cpp-python)"; exit 1; }

# The venv is rebuilt when pyproject.toml changes. pip's cache keeps the
# llama-cpp-python wheel after its first (~12 min) build, so later installs are fast.
$(STAMP): pyproject.toml | prereqs
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

kafka-jars: $(STAMP)
	$(PY) -c 'from sluice.broker import kafka_classpath; from sluice.config import REPO_ROOT, load_settings; kafka_classpath(REPO_ROOT, load_settings().state_dir)'

protos: $(STAMP)
	tools/gen_protos.sh
	$(PY) tools/gen_json_schemas.py

lint: $(STAMP)
	$(VENV)/bin/ruff check sluice services streams loadtest tests
	$(VENV)/bin/mypy
	cd protos && ../$(VENV)/bin/buf lint
	@tmp=$$(mktemp -d) && tools/gen_protos.sh $$tmp && \
	  diff -r -q -x __pycache__ $$tmp/sluice/v1 sluice/v1 || { echo "generated stubs are stale: run 'make protos'"; exit 1; }
	@tmp=$$(mktemp -d) && $(PY) tools/gen_json_schemas.py $$tmp && \
	  diff -r -q $$tmp schemas/json || { echo "JSON Schemas are stale: run 'make protos'"; exit 1; }

test: $(STAMP) kafka-jars
	$(PY) -m pytest

run: $(STAMP) kafka-jars
	$(SLUICE) run

up: $(STAMP) kafka-jars
	$(SLUICE) up

down: $(STAMP)
	$(SLUICE) down

status: $(STAMP)
	$(SLUICE) status --once

clean: down
	rm -rf .sluice

# Prompt assembly on one core: 3-message template, 1,500-token context document.
.PHONY: bench-prompts
bench-prompts: $(STAMP)
	$(PY) -m loadtest.bench_prompts
BENCHES += bench-prompts

# Audit: query latency over 1,000,000 indexed records; indexer records/s from Kafka on one core.
.PHONY: bench-audit
bench-audit: $(STAMP) kafka-jars
	$(PY) -m loadtest.bench_audit
BENCHES += bench-audit

# Redaction: precision/recall/F1 on tests/data, texts/s on one core, before/after, TTFT added.
.PHONY: bench-redaction
bench-redaction: $(STAMP)
	taskset -c 0 $(PY) -m loadtest.bench_redaction
BENCHES += bench-redaction

# Metering: ledger entries/s with exactly-once (Kafka transactions) on one core.
.PHONY: bench-metering
bench-metering: $(STAMP) kafka-jars
	$(PY) -m loadtest.bench_metering
BENCHES += bench-metering

# Feedback: ratings joined to prompts and completions and counted per second (faust, exactly-once), one core.
.PHONY: bench-feedback
bench-feedback: $(STAMP) kafka-jars
	$(PY) -m loadtest.bench_feedback
BENCHES += bench-feedback

# Output redaction in the inference worker: CPU per 1,000 tokens and latency added, open-loop streams.
.PHONY: bench-output-redaction
bench-output-redaction: $(STAMP)
	$(PY) -m loadtest.bench_output_redaction --rps 5,20,50 --duration 20
BENCHES += bench-output-redaction

# API keys: lookup cost per authenticated call; revocation to effect on a live follower.
.PHONY: bench-keys
bench-keys: $(STAMP) kafka-jars
	$(PY) -m loadtest.bench_keys
BENCHES += bench-keys

# Inference: 16 concurrent streams x 64 tokens, llama.cpp direct vs the worker end to end through Kafka.
.PHONY: bench-inference
bench-inference: $(STAMP) kafka-jars
	$(PY) -m loadtest.bench_inference
BENCHES += bench-inference

# Inference engines: the same mix in process (llama.cpp) vs remote (OpenAI engine over llama_cpp.server).
.PHONY: bench-engines
bench-engines: $(STAMP)
	$(PY) -m loadtest.bench_engines
BENCHES += bench-engines

# Gateway overhead (issue 9): one fixed-timing upstream called directly, through Sluice (all on,
# and lightest redaction) and through LiteLLM proxy (own venv under .sluice/bench); loss audit
# after every Sluice run. Flags: make bench-overhead ARGS="--rps 20 --duration 30".
.PHONY: bench-overhead
bench-overhead: $(STAMP) kafka-jars
	$(PY) -m loadtest.bench_overhead $(ARGS)
BENCHES += bench-overhead

# Capacity (issue 9): RPS rises until p99 added TTFT > 100 ms, errors or loss; consumer lag per step.
.PHONY: bench-capacity
bench-capacity: $(STAMP) kafka-jars
	$(PY) -m loadtest.bench_capacity $(ARGS)
BENCHES += bench-capacity

# Deployment: the chart reads copies of the topic plan, rules and dashboard (helm cannot
# read outside the chart); ops-check runs helm lint/template + kubeconform, promtool,
# hadolint (tests/ops, also part of `make test`; Go tools cached in ~/.cache/sluice/bin).
.PHONY: helm-sync ops-check
helm-sync:
	cp schemas/topics.yaml helm/sluice/files/topics.yaml
	cp monitoring/prometheus/sluice-rules.yaml helm/sluice/files/sluice-rules.yaml
	cp monitoring/grafana/sluice-overview.json helm/sluice/files/sluice-overview.json

ops-check: $(STAMP) kafka-jars
	$(PY) -m pytest -q tests/ops

# Benchmarks are not part of `make test`. Each adds its own `bench-<area>` target
# above this line and appends it to BENCHES; `make bench` runs them all.
BENCHES ?=
.PHONY: bench
bench: $(BENCHES)
	@test -n "$(BENCHES)" || { echo "no benchmarks yet"; exit 1; }
