#!/usr/bin/env bash
# `make bench`: the same ~1 KB invoice through three routes of one Envoy, measured with wrk in
# one run so the figures share a baseline:
#   passthrough  Envoy → demo upstream, filter disabled                (the baseline)
#   exchange     POST /v1/exchange: verify, normalize, sign, store    (answered by Envoy)
#   inline       /invoices: the same pipeline, then on to the demo upstream
# Prints requests/s, p50 and p99 of each, the ratios to passthrough and the .wasm size.
# Every Signet request has a new idempotency key and opens a new trace (scripts/bench/request.lua).
#
# Settings: BENCH_DURATION (10s), BENCH_CONNECTIONS (16), BENCH_THREADS (1), ENVOY_CONCURRENCY
# (2), and SP_STORAGE/SP_POSTGRES_URL as for make up. Its own ports and a temp data dir, so it
# runs beside `make up`.
set -euo pipefail

: "${ENVOY_PORT:=10100}"
: "${ENVOY_ADMIN_PORT:=10101}"
: "${CONTROL_PLANE_PORT:=10188}"
: "${CONTROL_PLANE_INTERNAL_PORT:=10190}"
: "${CONTROL_PLANE_ADMIN_PORT:=10191}"
: "${UPSTREAM_PORT:=10189}"
: "${ENVOY_CONCURRENCY:=2}"
: "${BENCH_DURATION:=10s}"
: "${BENCH_WARMUP:=2s}"
: "${BENCH_CONNECTIONS:=16}"
: "${BENCH_THREADS:=1}"
BENCH_DIR=$(mktemp -d -t signet-bench.XXXXXX)
SIGNET_DATA="$BENCH_DIR/data"
SIGNET_RUN="$BENCH_DIR/run"
source "$(dirname "$0")/stack.sh"

cleanup() {
    stack_stop
    rm -rf "$BENCH_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if ! command -v wrk >/dev/null; then
    log "installing wrk (Debian package)"
    if [[ $(id -u) == 0 ]]; then
        apt-get install -y wrk >/dev/null || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
    else
        sudo apt-get install -y wrk >/dev/null
    fi
fi

stack_build
stack_secrets
stack_start

ENVOY="http://127.0.0.1:$ENVOY_PORT"
# The bodies: the invoice tool call as compact JSON, and the same payload in an exchange envelope.
python3 - "$ROOT/scripts/payloads/invoice-toolcall.json" "$BENCH_DIR" <<'EOF'
import json, sys
payload = json.load(open(sys.argv[1]))
compact = lambda v: json.dumps(v, separators=(",", ":"))
open(f"{sys.argv[2]}/invoice.json", "w").write(compact(payload))
open(f"{sys.argv[2]}/exchange.json", "w").write(compact({
    "payload_type": "openai.tooluse.invoice.v1",
    "target_type": "invoice.iso20022.v1",
    "payload": payload,
}))
EOF

# route NAME PATH BODY MODE
ROUTES=(
    "passthrough /passthrough/invoices invoice.json plain"
    "exchange /v1/exchange exchange.json signet"
    "inline /invoices invoice.json signet"
)

# A route that errors fast would look fast: each must answer 200 before it is measured.
for route in "${ROUTES[@]}"; do
    read -r name path body mode <<<"$route"
    headers=(-H 'content-type: application/json')
    [[ $mode == signet ]] && headers+=(-H 'X-SIGNET-API-Key: demo-key' -H "X-SIGNET-Idempotency-Key: bench-check-$name-$RANDOM$RANDOM")
    status=$(curl -sS -o "$BENCH_DIR/check-$name.out" -w '%{http_code}' "${headers[@]}" \
        --data-binary "@$BENCH_DIR/$body" "$ENVOY$path")
    [[ $status == 200 ]] || die "$name ($path) answered $status: $(cat "$BENCH_DIR/check-$name.out")"
done

run_wrk() { # run_wrk DURATION PATH BODY MODE
    wrk --threads "$BENCH_THREADS" --connections "$BENCH_CONNECTIONS" --duration "$1" --latency \
        --script "$ROOT/scripts/bench/request.lua" "$ENVOY$2" -- "$BENCH_DIR/$3" "$4"
}

# CPU seconds a process has used (user + system), to split each route's cost between processes.
cpu_seconds() {
    awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"
}
# STACK_PIDS from stack_start: control plane, demo upstream, Envoy.
PROCESSES=("control_plane ${STACK_PIDS[0]}" "upstream ${STACK_PIDS[1]}" "envoy ${STACK_PIDS[2]}")

log "wrk: $BENCH_THREADS thread(s), $BENCH_CONNECTIONS connections, $BENCH_DURATION per route (after $BENCH_WARMUP warm-up); Envoy concurrency $ENVOY_CONCURRENCY; storage $SP_STORAGE"
for route in "${ROUTES[@]}"; do
    read -r name path body mode <<<"$route"
    run_wrk "$BENCH_WARMUP" "$path" "$body" "$mode" >/dev/null
    for process in "${PROCESSES[@]}"; do
        read -r label pid <<<"$process"
        echo "$label $(cpu_seconds "$pid")" >>"$BENCH_DIR/cpu-before-$name.txt"
    done
    run_wrk "$BENCH_DURATION" "$path" "$body" "$mode" >"$BENCH_DIR/wrk-$name.txt"
    for process in "${PROCESSES[@]}"; do
        read -r label pid <<<"$process"
        echo "$label $(cpu_seconds "$pid")" >>"$BENCH_DIR/cpu-after-$name.txt"
    done
    log "$name done"
done

python3 - "$BENCH_DIR" "$WASM" <<'EOF'
import os, re, sys
bench_dir, wasm = sys.argv[1], sys.argv[2]
UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}

def parse(name):
    text = open(f"{bench_dir}/wrk-{name}.txt").read()
    def latency(pct):
        value, unit = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M).groups()
        return float(value) * UNITS[unit]
    rps = float(re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M).group(1))
    total = int(re.search(r"^\s+(\d+) requests in", text, re.M).group(1))
    bad = re.search(r"^\s+Non-2xx or 3xx responses: (\d+)", text, re.M)
    errors = re.search(r"^\s+Socket errors: (.*)$", text, re.M)
    return {"rps": rps, "p50": latency(50), "p99": latency(99), "total": total,
            "non2xx": int(bad.group(1)) if bad else 0, "socket_errors": errors.group(1) if errors else ""}

def cpu_ms_per_request(name, total):
    read = lambda when: dict(line.split() for line in open(f"{bench_dir}/cpu-{when}-{name}.txt"))
    before, after = read("before"), read("after")
    return {p: (float(after[p]) - float(before[p])) * 1000 / total for p in before}

results = {name: parse(name) for name in ("passthrough", "exchange", "inline")}
base = results["passthrough"]
print()
print(f"{'route':<12} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs passthrough':>15}"
      f" | CPU ms per request: {'envoy':>6} {'control plane':>13} {'upstream':>8} | requests, non-2xx")
for name, r in results.items():
    ratio = r["rps"] / base["rps"]
    cpu = cpu_ms_per_request(name, r["total"])
    print(f"{name:<12} {r['rps']:>8.0f} {r['p50']:>8.2f} {r['p99']:>8.2f} {ratio:>14.2f}x"
          f" | {'':19} {cpu['envoy']:>6.3f} {cpu['control_plane']:>13.3f} {cpu['upstream']:>8.3f}"
          f" | {r['total']}, {r['non2xx']}"
          + (f"  socket errors: {r['socket_errors']}" if r["socket_errors"] else ""))
print()
print(f"signet_filter.wasm: {os.path.getsize(wasm)} bytes ({os.path.getsize(wasm) / 1024:.0f} KiB)")
target = 0.5
ok = results["exchange"]["rps"] >= target * base["rps"]
print(f"target: exchange >= {target}x passthrough: {'met' if ok else 'NOT met'}")
failed = [n for n, r in results.items() if r["non2xx"] or r["socket_errors"]]
if failed:
    print(f"error: non-2xx answers or socket errors on {', '.join(failed)}: the figures are not valid", file=sys.stderr)
    sys.exit(1)
EOF
