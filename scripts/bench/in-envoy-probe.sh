#!/usr/bin/env bash
# Where the filter's time goes inside Envoy (docs/perf.md, "The filter inside Envoy"). Applies
# scripts/bench/in-envoy-probe.patch to a copy of HEAD (timers around the filter's callbacks, its
# host calls and the pipeline's stages, read with proxy_get_current_time; each worker logs its
# means every 1000 exchanges), builds that filter, starts the stack on make bench's ports with
# it, offers exchanges at each RATE (open loop, 16 connections, PROBE_SECONDS each after 1 s of
# warm-up) and prints, per rate, the mean µs per exchange of each timer over the lines logged
# during it, beside Envoy's CPU per exchange from /proc. Wall time: a callback that is
# preempted counts the wait, so compare rates below saturation.
#
#   scripts/bench/in-envoy-probe.sh [RATE...]     # default 200 800; PROBE_SECONDS (12)
#
# Measurement only: the patch never reaches the tree, and the filter it builds is not shipped.
# Not part of make test or make bench (one more LTO build of the filter, ~1.5 min).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
: "${PROBE_SECONDS:=12}"
RATES=("$@")
[[ ${#RATES[@]} -gt 0 ]] || RATES=(200 800)
# make bench's ports (scripts/bench.sh), so it runs beside `make up`
: "${ENVOY_PORT:=10100}"
: "${ENVOY_ADMIN_PORT:=10101}"
: "${CONTROL_PLANE_PORT:=10188}"
: "${CONTROL_PLANE_INTERNAL_PORT:=10190}"
: "${CONTROL_PLANE_ADMIN_PORT:=10191}"
: "${UPSTREAM_PORT:=10189}"
WORK=$(mktemp -d -t signet-probe.XXXXXX)
TARGET_DIR=$(realpath -m "${CARGO_TARGET_DIR:-$ROOT/target}")
PROBE_TARGET="$TARGET_DIR/in-envoy-probe"
export SIGNET_FILTER_WASM="$PROBE_TARGET/wasm32-wasip1/wasm/signet_filter.wasm"
SIGNET_DATA="$WORK/data"
SIGNET_RUN="$WORK/run"
source "$ROOT/scripts/stack.sh"

cleanup() {
    stack_stop
    git -C "$ROOT" worktree remove --force "$WORK/tree" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "building the filter with the probe (HEAD + scripts/bench/in-envoy-probe.patch)"
git -C "$ROOT" worktree add --quiet --detach "$WORK/tree" HEAD
git -C "$WORK/tree" apply "$ROOT/scripts/bench/in-envoy-probe.patch" \
    || die "in-envoy-probe.patch no longer applies to HEAD: refresh it"
(cd "$WORK/tree" && CARGO_TARGET_DIR=$PROBE_TARGET cargo build --quiet -p signet-filter \
    --profile wasm --target wasm32-wasip1)
stack_build --bin open-loop
stack_secrets
stack_start
exchange_body "$ROOT/scripts/payloads/invoice-toolcall.json" "$WORK/exchange.json"

envoy_pid=${STACK_PIDS[2]}
for rate in "${RATES[@]}"; do
    log "open loop: $rate exchanges/s on 16 connections for ${PROBE_SECONDS}s"
    "$BIN/open-loop" "http://127.0.0.1:$ENVOY_PORT/v1/exchange" "$WORK/exchange.json" "$rate" 16 1 0 >/dev/null
    mark=$(wc -l <"$SIGNET_RUN/envoy.log")
    before=$(awk '{ print $14 + $15 }' "/proc/$envoy_pid/stat")
    "$BIN/open-loop" "http://127.0.0.1:$ENVOY_PORT/v1/exchange" "$WORK/exchange.json" "$rate" 16 \
        "$PROBE_SECONDS" 0 >"$WORK/open-$rate.txt"
    after=$(awk '{ print $14 + $15 }' "/proc/$envoy_pid/stat")
    tail -n "+$((mark + 1))" "$SIGNET_RUN/envoy.log" | grep -o 'signet-probe us/exchange: .*' >"$WORK/probe-$rate.txt" || true
    echo "$rate $((after - before))" >>"$WORK/rates.txt"
done

python3 - "$WORK" "$(getconf CLK_TCK)" <<'PY'
import sys
work, hz = sys.argv[1], int(sys.argv[2])
columns = []
for line in open(f"{work}/rates.txt"):
    rate, ticks = line.split()
    run = dict(l.split() for l in open(f"{work}/open-{rate}.txt"))
    sums, lines = {}, 0
    for text in open(f"{work}/probe-{rate}.txt"):
        lines += 1
        for field in text.split(": ", 1)[1].strip().split("; "):
            name, value = field.rsplit("=", 1)
            sums[name] = sums.get(name, 0.0) + float(value)
    requests = int(run["requests"])
    columns.append((rate, {n: v / lines for n, v in sums.items()} if lines else {}, lines,
                    int(ticks) * 1e6 / hz / requests if requests else 0.0, run))
names = list(columns[0][1]) if columns and columns[0][1] else []
print()
print(f"{'µs per exchange (wall)':<42}" + "".join(f"{r + '/s':>12}" for r, *_ in columns))
for name in names:
    print(f"{name:<42}" + "".join(f"{c[1].get(name, 0):>12.1f}" for c in columns))
def total(c, prefix):
    return sum(v for n, v in c[1].items() if n.startswith(prefix))
print(f"{'= in the callbacks':<42}" + "".join(f"{total(c, 'callback:'):>12.1f}" for c in columns))
print(f"{'  of which host calls':<42}" + "".join(f"{total(c, 'host:'):>12.1f}" for c in columns))
print(f"{'  of which the filter (callbacks - host)':<42}" + "".join(f"{total(c, 'callback:') - total(c, 'host:'):>12.1f}" for c in columns))
print(f"{'(probe lines averaged)':<42}" + "".join(f"{c[2]:>12}" for c in columns))
print(f"{'Envoy CPU per exchange (/proc)':<42}" + "".join(f"{c[3]:>12.1f}" for c in columns))
print(f"{'p50 / p99 ms':<42}" + "".join(f"{c[4]['p50_ms'] + '/' + c[4]['p99_ms']:>12}" for c in columns))
print(f"{'non-2xx, errors':<42}" + "".join(f"{c[4]['non_2xx'] + ', ' + c[4]['errors']:>12}" for c in columns))
PY
