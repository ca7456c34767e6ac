#!/usr/bin/env bash
# How exchange throughput changes with a second control-plane instance (docs/perf.md, "Two
# control-plane instances over one PostgreSQL"): the make-bench stack on PostgreSQL with one
# control plane, or with two over the same database (the second on its own ports, the same keys)
# as two endpoints of the filter's `signet_control_plane` cluster. wrk on `exchange` at each
# CONNECTIONS count, the two settings alternating ROUNDS times; prints req/s, p99, CPU µs per
# exchange of Envoy, of the control planes together and of PostgreSQL (/proc), and the commits
# each instance stored.
#
#   scripts/bench/two-instances.sh [CONNECTIONS...]   # default 16 64; ROUNDS (3), BENCH_DURATION (10s)
#
# Needs PostgreSQL at 127.0.0.1:5432 (each run in a schema of its own, dropped afterwards).
# Measurement only: not part of make test or make bench.
set -euo pipefail

export ENVOY_PORT=10100 ENVOY_ADMIN_PORT=10101 CONTROL_PLANE_PORT=10188 \
    CONTROL_PLANE_INTERNAL_PORT=10190 CONTROL_PLANE_ADMIN_PORT=10191 UPSTREAM_PORT=10189
SECOND_PORT=10198 SECOND_INTERNAL_PORT=10200 SECOND_ADMIN_PORT=10201
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/../stack.sh"
CONNECTIONS=("$@")
[[ ${#CONNECTIONS[@]} -gt 0 ]] || CONNECTIONS=(16 64)
: "${ROUNDS:=3}"
: "${BENCH_DURATION:=10s}"
: "${ENVOY_CONCURRENCY:=2}"
PG_ADMIN_URL=postgres://postgres@127.0.0.1:5432/test
WORK=$(mktemp -d -t signet-two-instances.XXXXXX)
SCHEMA=""
drop_schema() {
    [[ -z $SCHEMA ]] || psql -q "$PG_ADMIN_URL" -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1 || true
    SCHEMA=""
}
cleanup() {
    stack_stop
    drop_schema
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

command -v wrk >/dev/null || die "wrk is not installed (apt-get install wrk)"
psql -q "$PG_ADMIN_URL" -c "SELECT 1" >/dev/null || die "PostgreSQL does not answer at $PG_ADMIN_URL"
stack_build
export SIGNET_DATA="$WORK/data" SIGNET_RUN="$WORK/run" SP_STORAGE=postgres
stack_secrets
exchange_body "$ROOT/scripts/payloads/invoice-toolcall.json" "$WORK/exchange.json"
HZ=$(getconf CLK_TCK)

cpu_seconds() { # cpu_seconds PID...: user + system seconds of these processes together
    local pid total=0
    for pid in "$@"; do
        total=$(awk -v t="$total" -v hz="$HZ" '{ printf "%.2f", t + ($14 + $15) / hz }' "/proc/$pid/stat")
    done
    echo "$total"
}

# stack INSTANCES: stack_start, with a second control plane as another endpoint of the callouts'
# cluster when asked.
stack() {
    stack_start_services
    if [[ $1 == 2 ]]; then
        start second "second control plane" "$SIGNET_RUN/second.log" \
            env PORT="$SECOND_PORT" SP_BIND=127.0.0.1 SP_INTERNAL_PORT="$SECOND_INTERNAL_PORT" \
            SP_ADMIN_PORT="$SECOND_ADMIN_PORT" "$BIN/signet-control-plane"
        wait_http second "second control plane" "http://127.0.0.1:$SECOND_PORT/.well-known/jwks.json"
    fi
    stack_render_envoy
    if [[ $1 == 2 ]]; then
        python3 - "$SIGNET_RUN/envoy.yaml" "$CONTROL_PLANE_INTERNAL_PORT" "$SECOND_INTERNAL_PORT" <<'PY'
import sys
path, first, second = sys.argv[1:]
text = open(path).read()
endpoint = "                    socket_address: { address: 127.0.0.1, port_value: %s }\n"
assert text.count(endpoint % first) == 1, "one endpoint of signet_control_plane expected"
text = text.replace(endpoint % first, endpoint % first + "              - endpoint:\n"
                    "                  address:\n" + endpoint % second)
open(path, "w").write(text)
PY
    fi
    stack_start_envoy
}

wrk_exchange() { # wrk_exchange CONNECTIONS DURATION
    wrk --threads 1 --connections "$1" --duration "$2" --latency --script "$ROOT/scripts/bench/request.lua" \
        "http://127.0.0.1:$ENVOY_PORT/v1/exchange" -- "$WORK/exchange.json" signet
}

for round in $(seq "$ROUNDS"); do
    for instances in 1 2; do
        SCHEMA="signet_two_instances_$$_${round}_$instances"
        psql -q "$PG_ADMIN_URL" -c "CREATE SCHEMA $SCHEMA" >/dev/null
        export SP_POSTGRES_URL="$PG_ADMIN_URL?options=-csearch_path%3D$SCHEMA"
        stack "$instances"
        planes=("${SERVICE_PID[control-plane]}")
        [[ $instances == 1 ]] || planes+=("${SERVICE_PID[second]}")
        for connections in "${CONNECTIONS[@]}"; do
            wrk_exchange "$connections" 2s >/dev/null # warm-up
            mapfile -t postgres < <(pgrep -x postgres)
            before=("$(cpu_seconds "${SERVICE_PID[envoy]}")" "$(cpu_seconds "${planes[@]}")" "$(cpu_seconds "${postgres[@]}")")
            out=$(wrk_exchange "$connections" "$BENCH_DURATION")
            after=("$(cpu_seconds "${SERVICE_PID[envoy]}")" "$(cpu_seconds "${planes[@]}")" "$(cpu_seconds "${postgres[@]}")")
            awk -v round="$round" -v n="$instances" -v c="$connections" \
                -v e="${before[0]} ${after[0]}" -v cp="${before[1]} ${after[1]}" -v pg="${before[2]} ${after[2]}" '
                /^Requests\/sec:/ { rps = $2 } / requests in / { total = $1 } $1 == "99%" { p99 = $2 }
                /Non-2xx/ { bad = $5 }
                function us(pair) { split(pair, v, " "); return (v[2] - v[1]) * 1e6 / total }
                END { printf "round %d, %d instance%s, c%-3d %7.0f req/s  p99 %-9s CPU us per exchange: envoy %4.0f  control planes %4.0f  postgres %4.0f  non-2xx %d\n",
                      round, n, (n > 1 ? "s" : " "), c, rps, p99, us(e), us(cp), us(pg), bad }' <<<"$out"
        done
        for port in "$CONTROL_PLANE_PORT" "$SECOND_PORT"; do
            [[ $instances == 2 || $port == "$CONTROL_PLANE_PORT" ]] || continue
            curl -fsS "http://127.0.0.1:$port/metrics" \
                | awk -v port="$port" '/^signet_cp_commits_total / { print "  commits stored by the instance on :" port ": " $2 }'
        done
        stack_stop
        drop_schema
    done
done
