# chatpipe developer commands. `make test` is the README's test command: on a fresh Debian
# machine it installs what is missing, starts the local Kafka + Redis (infra/local/stack.sh),
# creates the topics and runs the whole test suite; the stack stays up afterwards.
#
# Ports come from the environment (make passes it on): KAFKA_PORT, KAFKA_CONTROLLER_PORT,
# REDIS_PORT, CHATPIPE_STACK_DIR; see docs/local-stack.md. The clients of the targets that
# use the stack are pointed at it: KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_PORT and
# REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
# Steps depend on each other's side effects (install before stack, stack before topics).
.NOTPARALLEL:

PYTHON ?= python3
CHATPIPE ?= chatpipe
PYTEST_ARGS ?=
BENCH_ARGS ?=

KAFKA_PORT ?= 9092
KAFKA_CONTROLLER_PORT ?= 9093
REDIS_PORT ?= 6379
export KAFKA_PORT KAFKA_CONTROLLER_PORT REDIS_PORT

STACK := infra/local/stack.sh
STACK_ENV := KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$(KAFKA_PORT) REDIS_URL=redis://127.0.0.1:$(REDIS_PORT)/0

.PHONY: help install stack-up stack-down stack-status stack-logs stack-wipe topics dev \
	cluster-up cluster-down cluster-status cluster-wipe \
	test test-single test-cluster test-cluster-faults test-cluster-contract test-unit test-security lint format typecheck bench bench-smoke clean

help:  ## list the targets
	@grep -E '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

install:  ## Debian packages, Kafka jars (cached), pip install -e '.[dev]' (skips what is there)
	infra/local/install.sh

stack-up:  ## start local Kafka + Redis (no-op when running)
	$(STACK) start

stack-down:  ## stop local Kafka + Redis (data kept)
	$(STACK) stop

stack-status:  ## is the local stack up?
	$(STACK) status

stack-logs:  ## last lines of the Kafka and Redis logs
	$(STACK) logs

stack-wipe:  ## stop the local stack and delete its Kafka data
	$(STACK) wipe

cluster-up:  ## start the local cluster stack: 3 Kafka brokers + a 6-node Redis Cluster (no-op when up)
	infra/local/cluster.sh start

cluster-down:  ## stop the cluster stack (data kept)
	infra/local/cluster.sh stop

cluster-status:  ## is the cluster stack up?
	infra/local/cluster.sh status

cluster-wipe:  ## stop the cluster stack and delete its data
	infra/local/cluster.sh wipe

topics:  ## create the topics (partitions, configs) on the local stack
	$(STACK_ENV) $(CHATPIPE) topics

dev: install  ## everything, then run api + consumers + cancel listener locally
	$(STACK_ENV) $(CHATPIPE) dev

# `make test`: the single-node suite on two pytest-xdist workers (a module's tests on one, its
# processes started once) and, beside it, the contract's e2e tests on the cluster stack (one
# worker: the two together fill the cores the single-node suite alone left idle while its
# processes start and wait); then tests/cluster alone. PYTEST_ARGS: only what it names.
XDIST ?= -n 2 --dist loadgroup
test: install stack-up  ## the whole suite: single node (2 workers) beside the cluster contract run, then tests/cluster
	$(STACK_ENV) $(CHATPIPE) topics
	$(if $(PYTEST_ARGS),$(STACK_ENV) $(PYTHON) -m pytest $(PYTEST_ARGS),infra/local/beside.sh '$(MAKE) --no-print-directory test-cluster-contract' $(MAKE) --no-print-directory test-single)
	$(if $(PYTEST_ARGS),,$(MAKE) --no-print-directory test-cluster-faults)

test-single: stack-up  ## the single-node suite alone (two workers), without tests/cluster
	$(STACK_ENV) $(PYTHON) -m pytest $(XDIST) --ignore=tests/cluster

# On the cluster stack, one test at a time: tests/cluster (nodes stopped and killed under load),
# and the contract's end-to-end tests again with every chatpipe process on 3 Kafka brokers
# and a Redis Cluster (REDIS_CLUSTER=true), from cluster.sh's last line (and every Redis
# script of chatpipe/state.py: each one's keys must share a hash slot there)
CLUSTER_TESTS ?= tests/e2e/test_cancel.py tests/e2e/test_stream.py tests/e2e/test_dead_letters.py \
	tests/e2e/test_bad_input.py tests/e2e/test_sessions.py tests/integration/test_state.py
test-cluster: test-cluster-faults test-cluster-contract  ## tests/cluster, then the contract e2e tests on the cluster stack

test-cluster-faults: stack-up cluster-up  ## tests/cluster alone: brokers and Redis nodes stopped and killed under load
	$(STACK_ENV) $(PYTHON) -m pytest tests/cluster $(PYTEST_ARGS)

# its own --basetemp: it may run beside another pytest session (`make test`)
test-cluster-contract: cluster-up  ## the contract e2e tests with every process on the cluster stack (one worker)
	eval "$$(infra/local/cluster.sh env | tail -n 1)" && $(PYTHON) -m pytest $(CLUSTER_TESTS) --basetemp="$${TMPDIR:-/tmp}/chatpipe-cluster-contract" $(PYTEST_ARGS)

test-unit:  ## unit tests only: no services needed
	$(PYTHON) -m pytest tests/unit $(PYTEST_ARGS)

test-security: stack-up  ## auth, limits, secrets, fuzzers, SASL/ACL/TLS connections (docs/security.md)
	$(STACK_ENV) $(PYTHON) -m pytest tests/security tests/e2e/test_secure_connections.py $(PYTEST_ARGS)

lint:  ## ruff lint + format check (+ shellcheck of the scripts, when installed)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	@if command -v shellcheck >/dev/null; then \
		echo "shellcheck infra/local/*.sh .ci/run"; shellcheck infra/local/*.sh .ci/run; \
	fi

format:  ## ruff fix + format
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

typecheck:  ## mypy (strict, configured in pyproject.toml)
	$(PYTHON) -m mypy

bench: stack-up  ## benchmarks against the local stack (docs/benchmarks.md)
	$(STACK_ENV) $(PYTHON) -m bench $(BENCH_ARGS)

bench-smoke: stack-up  ## a short benchmark run, as CI does
	$(STACK_ENV) $(PYTHON) -m bench --smoke $(BENCH_ARGS)

clean:  ## caches and build output in the repo (not the stack: see stack-wipe)
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
