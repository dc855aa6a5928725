# microgrid-twin: one-line entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SYSTEM_PACKAGES := mosquitto mosquitto-clients influxdb

.PHONY: help test demo check bench accuracy-30d accuracy-ocv accuracy-bands system-deps install clean

help:
	@echo "make test    install what is missing (apt-get, pip) and run the whole test suite"
	@echo "make demo    install and run the demo (emulated Nevada site)"
	@echo "make check   ruff and mypy"
	@echo "make bench   run every benchmark and print one table"
	@echo "make accuracy-30d  emulate 30 days of 60 nevada packs, replay, score (about 13 min)"
	@echo "make accuracy-ocv  score 4 h of 60 nevada packs with cells 0-3 mV off the twin's OCV tables (about 5 min)"
	@echo "make accuracy-bands  pool the P5-P95 bands over 24 draws of 4 h of 60 nevada packs, tables drawn 3 mV off (about 6 min)"

# Mosquitto and InfluxDB 1.x are real dependencies of the integration tests.
system-deps:
	@missing=""; \
	for b in mosquitto mosquitto_pub influxd; do \
	  command -v $$b >/dev/null 2>&1 || [ -x /usr/sbin/$$b ] || missing="$$missing $$b"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ -f /etc/debian_version ] && [ "$$(id -u)" = 0 ]; then \
	    echo "installing$$missing with apt-get"; \
	    apt-get update -q >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
	  else \
	    echo "missing:$$missing. Install the packages $(SYSTEM_PACKAGES) (Debian/Ubuntu:" \
	         "sudo apt-get install $(SYSTEM_PACKAGES); macOS: brew install mosquitto influxdb@1)" >&2; \
	    exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: system-deps $(STAMP)
	$(BIN)/python -m pytest -q --durations=10

check: $(STAMP)
	$(BIN)/ruff check twin emulators tests benchmarks
	$(BIN)/mypy

# No services needed: embedded broker, the Nevada site emulated live at 60x, the twin, a terminal view;
# records the run into runs/demo-TIMESTAMP. DEMO_ARGS passes options, e.g. DEMO_ARGS="--duration 10m".
demo: $(STAMP)
	$(BIN)/mgtwin demo $(DEMO_ARGS)

bench: system-deps $(STAMP)
	$(BIN)/python benchmarks/run_all.py $(ARGS)

# Issue 6's month: 60 packs of every nevada kind with the scenario's faults, 30 days at real
# aging (emulation about 4 min, replay about 8 min, 1.5 GB in runs/n60_30d), then the table.
accuracy-30d: $(STAMP)
	$(BIN)/mgtwin emulate --scenario nevada --packs 60 --duration 30d --dt 10 --pack-level \
	  --truth --truth-every 1m --site-truth-every 1h --out runs/n60_30d
	$(BIN)/mgtwin replay runs/n60_30d --every 5m
	$(BIN)/mgtwin evaluate runs/n60_30d --skip 6h

# How the twin fares when its OCV tables are not the cells': 4 hours of 60 nevada packs with
# the cells' OCV off the tables by 0, 1, 2 and 3 mV RMS (a curve per chemistry), one row each.
accuracy-ocv: $(STAMP)
	for mv in 0 1 2 3; do \
	  $(BIN)/mgtwin emulate --scenario nevada --packs 60 --duration 4h --pack-level --truth \
	    --site-truth-every 10m --ocv-error-mv $$mv --out runs/n60_ocv$$mv && \
	  $(BIN)/mgtwin replay runs/n60_ocv$$mv || exit 1; \
	done
	$(BIN)/mgtwin compare runs/n60_ocv0 runs/n60_ocv1 runs/n60_ocv2 runs/n60_ocv3

# Are the P5-P95 bands calibrated? 24 draws of 4 hours of 60 nevada packs, each with its own
# seed, start hour and error of the OCV tables (3 mV RMS, the twin's own budget), pooled.
accuracy-bands: $(STAMP)
	$(BIN)/mgtwin bands --draws 24 --out runs/bands

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
