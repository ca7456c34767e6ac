#!/bin/sh
# Prints envoy/istio/wasmplugin.yaml pinned to the SHA-256 of a built filter, ready for
# `kubectl apply -f -`: Istio then refuses a module whose digest differs (a moved tag, a
# tampered registry).
#   scripts/istio-wasmplugin.sh [path/to/signet_filter.wasm]
# Default: $CARGO_TARGET_DIR (or target)/wasm32-wasip1/wasm/signet_filter.wasm. The .wasm must
# be the one pushed to the WasmPlugin's url.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$here/target}
wasm=${1:-$target/wasm32-wasip1/wasm/signet_filter.wasm}
manifest=${SIGNET_WASMPLUGIN:-$here/envoy/istio/wasmplugin.yaml}
[ -f "$wasm" ] || { echo "istio-wasmplugin: no $wasm (make wasm)" >&2; exit 1; }
digest=$(sha256sum "$wasm" | cut -d' ' -f1)
case $digest in
    *[!0-9a-f]*|'') echo "istio-wasmplugin: sha256sum failed" >&2; exit 1 ;;
esac
grep -q '^  sha256: SHA256_OF_SIGNET_FILTER_WASM$' "$manifest" ||
    { echo "istio-wasmplugin: $manifest has no sha256 placeholder" >&2; exit 1; }
sed "s|^  sha256: SHA256_OF_SIGNET_FILTER_WASM\$|  sha256: $digest|" "$manifest"
