#!/bin/sh
# Renders envoy/signet-local.yaml.tmpl to stdout from the environment (POSIX sh, sed and tr
# only: it also runs in Dockerfile.envoy). Every placeholder must be set; the plugin
# configuration comes from envoy/signet-plugin.json unless SIGNET_PLUGIN_CONFIG_FILE says.
#   BIND_ADDRESS ENVOY_PORT ENVOY_ADMIN_ADDRESS ENVOY_ADMIN_PORT CONTROL_PLANE_HOST
#   CONTROL_PLANE_INTERNAL_PORT CONTROL_PLANE_PUBLIC_PORT UPSTREAM_HOST UPSTREAM_PORT
#   SIGNET_FILTER_WASM
# ENVOY_ADMIN_ADDRESS must be a loopback address: the admin API is never exposed.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
template=${SIGNET_ENVOY_TEMPLATE:-$here/envoy/signet-local.yaml.tmpl}
plugin_file=${SIGNET_PLUGIN_CONFIG_FILE:-$here/envoy/signet-plugin.json}

for name in BIND_ADDRESS ENVOY_PORT ENVOY_ADMIN_ADDRESS ENVOY_ADMIN_PORT CONTROL_PLANE_HOST \
    CONTROL_PLANE_INTERNAL_PORT CONTROL_PLANE_PUBLIC_PORT UPSTREAM_HOST UPSTREAM_PORT \
    SIGNET_FILTER_WASM; do
    eval "value=\${$name:-}"
    [ -n "$value" ] || { echo "render-envoy-config: $name is not set" >&2; exit 1; }
done
case $ENVOY_ADMIN_ADDRESS in
    127.*|::1) ;;
    *) echo "render-envoy-config: ENVOY_ADMIN_ADDRESS=$ENVOY_ADMIN_ADDRESS is not loopback" >&2; exit 1 ;;
esac

# JSON strings hold no raw newlines, so dropping them keeps the JSON; then the ' doubled and
# sed's own | and & escaped for the YAML single-quoted scalar it lands in.
plugin_config=$(tr -d '\n' <"$plugin_file" | sed -e "s/'/''/g" -e 's/[|&\\]/\\&/g')

out=$(sed \
    -e "s|\${BIND_ADDRESS}|$BIND_ADDRESS|g" \
    -e "s|\${ENVOY_PORT}|$ENVOY_PORT|g" \
    -e "s|\${ENVOY_ADMIN_ADDRESS}|$ENVOY_ADMIN_ADDRESS|g" \
    -e "s|\${ENVOY_ADMIN_PORT}|$ENVOY_ADMIN_PORT|g" \
    -e "s|\${CONTROL_PLANE_HOST}|$CONTROL_PLANE_HOST|g" \
    -e "s|\${CONTROL_PLANE_INTERNAL_PORT}|$CONTROL_PLANE_INTERNAL_PORT|g" \
    -e "s|\${CONTROL_PLANE_PUBLIC_PORT}|$CONTROL_PLANE_PUBLIC_PORT|g" \
    -e "s|\${UPSTREAM_HOST}|$UPSTREAM_HOST|g" \
    -e "s|\${UPSTREAM_PORT}|$UPSTREAM_PORT|g" \
    -e "s|\${SIGNET_FILTER_WASM}|$SIGNET_FILTER_WASM|g" \
    -e "s|\${SIGNET_PLUGIN_CONFIG}|$plugin_config|g" \
    "$template")
if printf '%s\n' "$out" | grep -v '^ *#' | grep -q '\${'; then
    echo "render-envoy-config: unfilled placeholder:" >&2
    printf '%s\n' "$out" | grep -v '^ *#' | grep '\${' >&2
    exit 1
fi
printf '%s\n' "$out"
