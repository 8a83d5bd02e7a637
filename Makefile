# Two entry points on a fresh machine: `make demo` (the whole story on the embedded tiny model)
# and `make test` (the test suite CI runs). Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-unit test-integration browser lint benchmark clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and exact: the CPU wheel; a looser spec pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/incremental demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

test-integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration

# The browser tests (tests/server/test_browser.py) drive Debian's Chromium, never a browser Playwright
# downloads (and an emoji font: the run logs and verdicts use ✅/❌). Without it they are skipped,
# except in CI (.ci/run runs this first). Needs root or sudo.
CHROMIUM := /usr/bin/chromium
browser:
	@if [ -x $(CHROMIUM) ]; then echo "browser: $(CHROMIUM) is installed"; exit 0; fi; \
	sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	log=$$(mktemp); \
	if ! apt-cache policy chromium 2>/dev/null | grep -q 'Candidate: [0-9]'; then \
	  echo "browser: apt-get update"; \
	  $$sudo apt-get update -qq >$$log 2>&1 || { cat $$log; exit 1; }; \
	fi; \
	echo "browser: apt-get install --no-install-recommends chromium fonts-noto-color-emoji"; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-noto-color-emoji >$$log 2>&1 \
	  || { cat $$log; exit 1; }; \
	rm -f $$log; [ -x $(CHROMIUM) ] || { echo "browser: $(CHROMIUM) still missing"; exit 1; }; \
	echo "browser: $$($(CHROMIUM) --version 2>/dev/null)"

benchmark: $(STAMP)
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/history_scaling.py
	$(BIN)/python benchmarks/gate_quality.py
	INCREMENTAL_THREADS=1 $(BIN)/python benchmarks/learning_curve.py
	INCREMENTAL_THREADS=1 $(BIN)/python benchmarks/prompt_layout.py
	$(BIN)/python benchmarks/threads.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/flow_overhead.py

clean:
	rm -rf $(VENV) demo-run
