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
set -euo pipefail
source "$(dirname "$0")/stack.sh"

PAYLOAD="$ROOT/scripts/payloads/invoice-toolcall.json"

trap 'stack_stop' EXIT
trap 'echo; log "stopping"; exit 0' INT TERM

stack_build
stack_secrets
stack_start

ENVOY="http://127.0.0.1:$ENVOY_PORT"
CP="http://127.0.0.1:$CONTROL_PLANE_PORT"
CP_ADMIN="http://127.0.0.1:$CONTROL_PLANE_ADMIN_PORT"

# One exchange through Envoy, then the trace's bundle, exported through Envoy too (one base URL),
# verified offline by the signet CLI against the JWKS.
log "one verified exchange"
exchange_file="$SIGNET_RUN/exchange.json"
python3 -c 'import json,sys; print(json.dumps({
    "payload_type": "openai.tooluse.invoice.v1",
    "target_type": "invoice.iso20022.v1",
    "payload": json.load(open(sys.argv[1]))}))' "$PAYLOAD" >"$exchange_file"
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
