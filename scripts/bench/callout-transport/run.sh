#!/usr/bin/env bash
# What one control-plane callout costs Envoy, by transport (docs/perf.md, "The commit callout's
# transport"): a minimal proxy-wasm filter (filter/lib.rs) in the real Envoy sends one ~2 KB
# message per request to a local peer (peer/main.rs) and answers with its reply, by HTTP/1.1
# dispatch_http_call, HTTP/2 dispatch_http_call, or a message on one long-lived gRPC stream per
# worker; `wake` is the same request answered without a callout, `passthrough` one the router
# proxies to the peer. Open loop (tests/src/bin/open-loop.rs, 16 connections) at each RATE, the
# modes alternating ROUNDS times; prints Envoy's and the peer's CPU µs per request (/proc) and
# each callout mode minus `wake` in the same round.
#
#   scripts/bench/callout-transport/run.sh [RATE...]   # default 500 1500; ROUNDS (3), SECONDS_PER_RUN (10)
#
# Measurement only: not part of make test or make bench; nothing it builds is shipped.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/../../stack.sh"
RATES=("$@")
[[ ${#RATES[@]} -gt 0 ]] || RATES=(500 1500)
: "${ROUNDS:=3}"
: "${SECONDS_PER_RUN:=10}"
: "${TRANSPORT_PORT:=10292}"
: "${TRANSPORT_ADMIN_PORT:=10291}"
: "${TRANSPORT_PEER_PORT:=10290}"
: "${ENVOY_CONCURRENCY:=2}"
MODES=(passthrough wake http1 http2 grpc-stream)
WORK=$(mktemp -d -t signet-transport.XXXXXX)
OUT="$TARGET_DIR/callout-transport"
cleanup() {
    stack_stop
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

stack_build --bin open-loop
log "building the measurement filter and its peer"
cargo build --quiet --release --manifest-path "$HERE/filter/Cargo.toml" --target wasm32-wasip1 \
    --target-dir "$OUT"
cargo build --quiet --release --manifest-path "$HERE/peer/Cargo.toml" --target-dir "$OUT"

cluster() { # NAME PROTOCOL_OPTIONS
    cat <<YAML
    - name: $1
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: { $2: {} }
      load_assignment:
        cluster_name: $1
        endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $TRANSPORT_PEER_PORT } } } }] }]
YAML
}
cat >"$WORK/envoy.yaml" <<YAML
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: $TRANSPORT_ADMIN_PORT } }
static_resources:
  listeners:
    - name: transport
      address: { socket_address: { address: 127.0.0.1, port_value: $TRANSPORT_PORT } }
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: transport
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes: [{ match: { prefix: / }, route: { cluster: peer_http1 } }]
                http_filters:
                  - name: callout_transport
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
                      config:
                        name: callout_transport
                        vm_config:
                          vm_id: callout_transport
                          runtime: envoy.wasm.runtime.v8
                          code: { local: { filename: $OUT/wasm32-wasip1/release/callout_transport_filter.wasm } }
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
$(cluster peer_http1 http_protocol_options)
$(cluster peer_http2 http2_protocol_options)
YAML

start peer "the peer" "$WORK/peer.log" "$OUT/release/callout-transport-peer" "$TRANSPORT_PEER_PORT"
wait_http peer "the peer" "http://127.0.0.1:$TRANSPORT_PEER_PORT/message"
start envoy Envoy "$WORK/envoy.log" "$ENVOY_BIN" --config-path "$WORK/envoy.yaml" --disable-hot-restart \
    --concurrency "$ENVOY_CONCURRENCY" --log-level warn
wait_http envoy Envoy "http://127.0.0.1:$TRANSPORT_ADMIN_PORT/ready"
peer_pid=${SERVICE_PID[peer]} envoy_pid=${SERVICE_PID[envoy]}
echo '{}' >"$WORK/body.json"
for mode in "${MODES[@]}"; do
    curl -fs -o /dev/null -d @"$WORK/body.json" "http://127.0.0.1:$TRANSPORT_PORT/$mode" \
        || service_failed envoy "$mode does not answer 200"
done

cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }   # clock ticks, user + system
: >"$WORK/results.txt"
for rate in "${RATES[@]}"; do
    for round in $(seq "$ROUNDS"); do
        for mode in "${MODES[@]}"; do
            e0=$(cpu "$envoy_pid"); p0=$(cpu "$peer_pid")
            "$BIN/open-loop" "http://127.0.0.1:$TRANSPORT_PORT/$mode" "$WORK/body.json" "$rate" 16 \
                "$SECONDS_PER_RUN" 1 >"$WORK/run.txt"
            e1=$(cpu "$envoy_pid"); p1=$(cpu "$peer_pid")
            echo "$rate $round $mode $e0 $e1 $p0 $p1 $(tr '\n' ' ' <"$WORK/run.txt")" >>"$WORK/results.txt"
        done
    done
done

python3 - "$WORK/results.txt" "$SECONDS_PER_RUN" "$(getconf CLK_TCK)" <<'PY'
import sys
path, seconds, tick = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows, bad = {}, 0
for line in open(path):
    f = line.split()
    rate, rnd, mode = int(f[0]), f[1], f[2]
    e0, e1, p0, p1 = map(float, f[3:7])
    figures = dict(zip(f[7::2], f[8::2]))
    bad += int(figures["non_2xx"]) + int(figures["errors"])
    sent = rate * (seconds + 1)  # the warm-up second's requests are served too
    us = lambda a, b: (b - a) / tick * 1e6 / sent
    rows.setdefault(rate, {}).setdefault(rnd, {})[mode] = (us(e0, e1), us(p0, p1), float(figures["p50_ms"]))
for rate, rounds in rows.items():
    print(f"\n{rate} requests/s, 16 connections, {seconds} s a run; CPU µs per request (/proc)")
    print(f"{'mode':<12} {'Envoy, each round':<26} {'minus wake':<22} {'peer':<20} p50 ms")
    for mode in rounds[next(iter(rounds))]:
        envoy = [r[mode][0] for r in rounds.values()]
        extra = [r[mode][0] - r["wake"][0] for r in rounds.values()]
        peer = [r[mode][1] for r in rounds.values()]
        p50 = [r[mode][2] for r in rounds.values()]
        j = lambda xs: ", ".join(f"{x:.0f}" for x in xs)
        print(f"{mode:<12} {j(envoy):<26} {j(extra) if mode not in ('wake', 'passthrough') else '':<22} "
              f"{j(peer):<20} {', '.join(f'{x:.2f}' for x in p50)}")
print(f"\nnon-2xx answers and socket errors: {bad}")
PY
