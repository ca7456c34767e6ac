#!/usr/bin/env bash
# `make up`: builds everything, starts the local stack, proves it with one verified exchange and
# keeps running until Ctrl-C, which stops everything this script started.
#
#   Envoy (+ Signet filter)  http://127.0.0.1:10000   admin http://127.0.0.1:9901
#                            (the one base URL of the public Signet API)
#   control plane            http://127.0.0.1:8088    (SQLite in ./data; SP_STORAGE=postgres …)
#                            internal API :8090 (the filter's), admin API :8091
#   demo upstream            http://127.0.0.1:8089    (echoes what reaches it)
#
# Settings: ENVOY_PORT, ENVOY_ADMIN_PORT, CONTROL_PLANE_PORT, CONTROL_PLANE_INTERNAL_PORT,
# CONTROL_PLANE_ADMIN_PORT, UPSTREAM_PORT, SIGNET_DATA and any
# SP_* variable of the control plane (control-plane/README.md).
# OBSERVE=1 (make up OBSERVE=1): Prometheus on PROMETHEUS_PORT (9090) scraping this stack with
# ops/prometheus/alerts.yml, and Grafana on GRAFANA_PORT (3000) with ops/grafana's dashboard
# when grafana-server is on PATH.
set -euo pipefail
source "$(dirname "$0")/stack.sh"

PAYLOAD="$ROOT/scripts/payloads/invoice-toolcall.json"

trap 'stack_stop' EXIT
trap 'echo; log "stopping"; exit 0' INT TERM

stack_build
stack_secrets
stack_start

observe() {
    local dir="$SIGNET_RUN/prometheus" port=${PROMETHEUS_PORT:-9090}
    [[ -x ${PROMETHEUS_BIN:-} ]] || die "OBSERVE=1: no prometheus at ${PROMETHEUS_BIN:-} (make prometheus)"
    mkdir -p "$dir"
    cp "$ROOT/ops/prometheus/alerts.yml" "$dir/"
    sed -e "s|127.0.0.1:9901|127.0.0.1:$ENVOY_ADMIN_PORT|" \
        -e "s|127.0.0.1:8088|127.0.0.1:$CONTROL_PLANE_PORT|" \
        "$ROOT/ops/prometheus/prometheus.yml" >"$dir/prometheus.yml"
    start prometheus "prometheus on :$port" "$SIGNET_RUN/prometheus.log" \
        "$PROMETHEUS_BIN" --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
        --web.listen-address="127.0.0.1:$port"
    wait_http prometheus prometheus "http://127.0.0.1:$port/-/ready"
    if command -v grafana-server >/dev/null; then
        local grafana="$SIGNET_RUN/grafana" gport=${GRAFANA_PORT:-3000}
        mkdir -p "$grafana/provisioning/datasources" "$grafana/provisioning/dashboards" "$grafana/dashboards"
        printf 'apiVersion: 1\ndatasources:\n  - {name: Prometheus, type: prometheus, uid: prometheus, url: "http://127.0.0.1:%s", isDefault: true}\n' \
            "$port" >"$grafana/provisioning/datasources/signet.yaml"
        printf 'apiVersion: 1\nproviders:\n  - {name: signet, type: file, options: {path: "%s"}}\n' \
            "$grafana/dashboards" >"$grafana/provisioning/dashboards/signet.yaml"
        sed 's|${DS_PROMETHEUS}|prometheus|g' "$ROOT/ops/grafana/signet-dashboard.json" \
            >"$grafana/dashboards/signet.json"
        start grafana "grafana on :$gport" "$SIGNET_RUN/grafana.log" \
            env GF_PATHS_PROVISIONING="$grafana/provisioning" GF_PATHS_DATA="$grafana/data" \
            GF_SERVER_HTTP_ADDR=127.0.0.1 GF_SERVER_HTTP_PORT="$gport" GF_AUTH_ANONYMOUS_ENABLED=true \
            grafana-server --homepath "${GRAFANA_HOME:-/usr/share/grafana}"
        wait_http grafana grafana "http://127.0.0.1:$gport/api/health" 60
        log "grafana: http://127.0.0.1:$gport/d/signet-envoy"
    else
        log "grafana-server is not installed: import ops/grafana/signet-dashboard.json into yours (ops/README.md)"
    fi
    log "prometheus: http://127.0.0.1:$port/alerts"
}
[[ -z ${OBSERVE:-} ]] || observe

ENVOY="http://127.0.0.1:$ENVOY_PORT"
CP="http://127.0.0.1:$CONTROL_PLANE_PORT"
CP_ADMIN="http://127.0.0.1:$CONTROL_PLANE_ADMIN_PORT"

# One exchange through Envoy, then the trace's bundle, exported through Envoy too (one base URL),
# verified offline by the signet CLI against the JWKS.
log "one verified exchange"
exchange_file="$SIGNET_RUN/exchange.json"
exchange_body "$PAYLOAD" "$exchange_file"
response=$(curl -sS --fail-with-body -X POST "$ENVOY/v1/exchange" \
    -H 'content-type: application/json' \
    -H 'X-SIGNET-API-Key: demo-key' \
    -H "X-SIGNET-Idempotency-Key: make-up-$(date +%s%N)" \
    --data-binary "@$exchange_file") || die "the exchange failed: $response"
echo "$response" | python3 -m json.tool
trace_id=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["trace_id"])' "$response")

bundle="$SIGNET_RUN/bundle-$trace_id.json"
curl -sS --fail-with-body -H "X-SIGNET-API-Key: demo-key" "$ENVOY/v1/receipts/export/$trace_id" -o "$bundle" ||
    die "export of $trace_id failed: $(cat "$bundle")"
"$BIN/signet" verify bundle "$bundle" --jwks "$ENVOY/.well-known/jwks.json" ||
    die "the exported bundle did not verify"
log "bundle $bundle verified against $ENVOY/.well-known/jwks.json"
"$BIN/signet" health "$ENVOY/healthz" >/dev/null || die "$ENVOY/healthz is not ok"
log "$ENVOY/healthz: the filter reaches the control plane"

cat <<EOF

The stack is up (storage: $SP_STORAGE, signing key kid: $SP_KID). Try:

  # an exchange (SVX-1); send it again with the same idempotency key for a replay
  curl -si $ENVOY/v1/exchange -H 'X-SIGNET-API-Key: demo-key' -H 'X-SIGNET-Idempotency-Key: k-1' \\
       -H 'content-type: application/json' --data-binary @$exchange_file

  # inline: the body is the invoice itself; the upstream echoes what it got (normalized + receipt headers)
  curl -si $ENVOY/invoices -H 'X-SIGNET-API-Key: demo-key' --data-binary @scripts/payloads/invoice-toolcall.json

  # the same upstream without Signet
  curl -s $ENVOY/passthrough --data-binary @scripts/payloads/invoice-toolcall.json

  # a trace's chain and its signed bundle, verified offline: all through Envoy's one address
  curl -s -H "X-SIGNET-API-Key: demo-key" $ENVOY/v1/receipts/chain/$trace_id
  curl -s -H "X-SIGNET-API-Key: demo-key" $ENVOY/v1/receipts/export/$trace_id > bundle.json
  $BIN/signet verify bundle bundle.json --jwks $ENVOY/.well-known/jwks.json

  # health as the filter sees the control plane
  curl -s $ENVOY/healthz

  # the tenant's usage, from the admin API (needs SP_ADMIN_KEY set when starting)
  curl -s -H "X-SIGNET-Admin-Key: \$SP_ADMIN_KEY" $CP_ADMIN/v1/admin/usage/demo

  # stats with Prometheus labels, control-plane metrics
  curl -s http://127.0.0.1:$ENVOY_ADMIN_PORT/stats/prometheus | grep '^signet_'
  curl -s $CP/metrics

Logs: $SIGNET_RUN/*.log. Ctrl-C stops everything.
EOF

# Wait for Ctrl-C; if one of the services dies, say so and stop the rest.
while true; do
    for pid in "${STACK_PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null || die "a service (pid $pid) exited; see $SIGNET_RUN/*.log"
    done
    sleep 1
done
