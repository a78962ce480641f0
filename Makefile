# chat-api: `make run` starts a local-only pod, `make test` runs every test.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test check lint typecheck fmt bench bench-topologies soak demo-cluster clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "chat-api needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,examples]'
	@touch $@

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,examples,bench]'
	@touch $@

run: $(STAMP)
	$(BIN)/chat-api

# Without a browser, the browser tests skip with a loud reason; when CI is set
# (to anything but 0 or false) or CHAT_API_REQUIRE_BROWSER=1 (.ci/run sets
# it), a missing browser fails the run here, and the browser tests fail too.
test: $(STAMP)
	@scripts/ensure-chromium || case "$${CHAT_API_REQUIRE_BROWSER:-}:$${CI:-}" in \
		1:*) echo "make test: a browser is required (CHAT_API_REQUIRE_BROWSER=1)" >&2; exit 1;; \
		*:|*:0|*:false) ;; \
		*) echo "make test: a browser is required (CI is set)" >&2; exit 1;; \
	esac
	scripts/ensure-docker
	$(BIN)/ruff check src tests bench scripts examples
	$(BIN)/mypy
	$(BIN)/pytest

check: lint typecheck

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts examples
	$(BIN)/ruff format --check src tests bench scripts examples

typecheck: $(STAMP)
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format src tests bench scripts examples
	$(BIN)/ruff check --fix src tests bench scripts examples

demo-cluster: $(STAMP)
	$(BIN)/python scripts/demo_cluster.py

# chat-api against its peers (python-socketio, Django Channels, and Node
# socket.io when npm is there), about 12 minutes of both cores; results in
# bench/results/ (git-ignored). BENCH_ARGS=--quick checks the harness in about
# a minute; BENCH_ARGS=--publish (a full run) also writes docs/benchmarks* and
# the README's table.
NODE_PEER := bench/peers/node

bench: $(BENCH_STAMP)
	@if [ ! -d $(NODE_PEER)/node_modules ] && command -v npm >/dev/null 2>&1; then \
		(cd $(NODE_PEER) && npm ci --no-audit --no-fund --silent) \
		|| echo "bench: npm ci failed; the Node socket.io peer is skipped"; \
	fi
	$(BIN)/python -m bench $(BENCH_ARGS)

# Redis Cluster and Sentinel: each pod's subscriptions and pub/sub bytes, the
# shards' load, Redis CPU per message beside one Redis, and the ack latency of
# waiting for a replica (about 2 minutes); results in bench/results/topologies.*
bench-topologies: $(BENCH_STAMP)
	$(BIN)/python -m bench.topologies $(BENCH_ARGS)

# A soak test with faults: 3 pods on a Redis of one topology (standalone,
# sentinel, cluster; needs redis-server), resuming clients at a steady rate,
# pods and Redis primaries killed on a seeded schedule; exits 1 when an acked
# message was lost, duplicated or reordered. Results in bench/results/soak-*.json.
# SOAK_ARGS="--redis cluster --duration 600 --seed 7"; docs/soak.md.
soak: $(STAMP)
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
