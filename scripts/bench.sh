#!/usr/bin/env bash
# `make bench`: the same ~1 KB invoice through three routes of one Envoy, measured with wrk in
# one run so the figures share a baseline:
#   passthrough  Envoy → demo upstream, filter disabled                (the baseline)
#   exchange     POST /v1/exchange: verify, normalize, sign, store    (answered by Envoy)
#   inline       /invoices: the same pipeline, then on to the demo upstream
# `exchange` runs at BENCH_CONNECTIONS and again at BENCH_HIGH_CONNECTIONS (`exchange-c64`);
# then, when PostgreSQL is there, the stack restarts on it for one more `exchange` run
# (`exchange-pg`). Before the stack starts, scripts/wasm-bench runs the filter's stages in V8.
# wrk holds its connections' requests in flight (a closed loop): its runs measure throughput and
# CPU at saturation. Latency is measured apart, in an open loop (tests/src/bin/open-loop.rs):
# `exchange` offered at BENCH_OPEN_LOAD (0.5) of the rate the wrk run reached, on
# BENCH_CONNECTIONS and on BENCH_HIGH_CONNECTIONS connections (`open-c16`, `open-c64`), each
# request timed from when it was due.
# Prints requests/s, p50 and p99 of each run, the ratio to passthrough, CPU per request of each
# process, the stages in V8, the .wasm size, and the targets of issue #12, each PASS or FAIL.
# A FAIL is reported, not an error: the exit status is 1 only when a run had non-2xx answers or
# socket errors (its figures would be those of errors, not of exchanges).
# Every Signet request has a new idempotency key and opens a new trace (scripts/bench/request.lua).
#
# Settings: BENCH_DURATION (10s), BENCH_WARMUP (2s), BENCH_CONNECTIONS (16),
# BENCH_HIGH_CONNECTIONS (64), BENCH_THREADS (1), BENCH_OPEN_LOAD (0.5), ENVOY_CONCURRENCY (2),
# SP_STORAGE (sqlite) as for make up; BENCH_POSTGRES: `auto` (default: when 127.0.0.1:5432 answers and psql is there,
# in a schema of its own that is dropped afterwards), `0` (skip), or set SP_POSTGRES_URL to use
# that database as is; BENCH_WASM=0 skips the V8 stage bench (BENCH_WASM_RUNS, 3);
# BENCH_PROFILE=1 adds, per storage, one more exchange run under `perf record` (not one of the
# figures above: perf slows it) and prints where Envoy's and the control plane's CPU per
# exchange goes (scripts/bench/profile.py); BENCH_FSYNC_SECONDS (5, 0 skips) times fsync on the
# data directory's disk alone before the stack starts (the `disk` line). Its own ports and a temp
# data dir ($TMPDIR), so it runs beside `make up`.
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
: "${BENCH_HIGH_CONNECTIONS:=64}"
: "${BENCH_THREADS:=1}"
: "${BENCH_OPEN_LOAD:=0.5}"
: "${BENCH_POSTGRES:=auto}"
: "${BENCH_WASM:=1}"
: "${BENCH_WASM_RUNS:=3}"
: "${BENCH_PROFILE:=0}"
: "${BENCH_FSYNC_SECONDS:=5}"
BENCH_DIR=$(mktemp -d -t signet-bench.XXXXXX)
SIGNET_DATA="$BENCH_DIR/data"
SIGNET_RUN="$BENCH_DIR/run"
source "$(dirname "$0")/stack.sh"
MAIN_STORAGE=$SP_STORAGE
PG_SCHEMA=""

cleanup() {
    stack_stop
    if [[ -n $PG_SCHEMA ]]; then
        psql -q "$PG_ADMIN_URL" -c "DROP SCHEMA IF EXISTS $PG_SCHEMA CASCADE" >/dev/null 2>&1 || true
    fi
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

# Where the PostgreSQL run goes, if it runs: empty when it does not (and why, in PG_SKIPPED).
PG_URL="" PG_SKIPPED=""
if [[ $MAIN_STORAGE == postgres ]]; then
    PG_SKIPPED="the main run is on PostgreSQL"
elif [[ $BENCH_POSTGRES == 0 ]]; then
    PG_SKIPPED="BENCH_POSTGRES=0"
elif [[ -n ${SP_POSTGRES_URL:-} ]]; then
    PG_URL=$SP_POSTGRES_URL
    unset SP_POSTGRES_URL   # the control plane refuses it beside SP_STORAGE=sqlite
elif ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
    PG_SKIPPED="nothing answers on 127.0.0.1:5432"
elif ! command -v psql >/dev/null; then
    PG_SKIPPED="psql is not installed (it creates the run's schema)"
else
    PG_ADMIN_URL=postgres://postgres@127.0.0.1:5432/test
    PG_SCHEMA="signet_bench_$$"
    psql -q "$PG_ADMIN_URL" -c "CREATE SCHEMA $PG_SCHEMA" >/dev/null \
        || die "psql could not create schema $PG_SCHEMA in $PG_ADMIN_URL"
    PG_URL="$PG_ADMIN_URL?options=-csearch_path%3D$PG_SCHEMA"
fi

stack_build --bin open-loop

# The filter's stages in V8, before anything else runs on the machine.
if [[ $BENCH_WASM != 0 ]]; then
    log "the filter's stages in V8 (scripts/wasm-bench, $BENCH_WASM_RUNS runs)"
    BASE="" NATIVE=0 RUNS=$BENCH_WASM_RUNS "$ROOT/scripts/wasm-bench/run.sh" >"$BENCH_DIR/wasm.txt" \
        || die "scripts/wasm-bench/run.sh failed"
fi

# fsync_probe DIR SECONDS: the latency of fsync on DIR's disk, alone: an 8 KiB write and its
# fsync every millisecond, about what the SQLite writer does below saturation. Every commit waits
# for one, so the disk's tail is a floor under the open loop's p99 (docs/perf.md).
fsync_probe() {
    python3 - "$@" <<'PROBE'
import os, subprocess, sys, time
folder, seconds = sys.argv[1], float(sys.argv[2])
path = os.path.join(folder, "fsync-probe")
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
block, took, end = b"x" * 8192, [], time.monotonic() + seconds
while time.monotonic() < end:
    os.write(fd, block)
    start = time.perf_counter()
    os.fsync(fd)
    took.append((time.perf_counter() - start) * 1000)
    time.sleep(0.001)
os.close(fd)
os.unlink(path)
took.sort()
at = lambda q: took[min(len(took) - 1, int(q * len(took)))]
fs = subprocess.run(["df", "--output=fstype", folder], capture_output=True, text=True).stdout.split()[-1]
print(f"disk    fsync of 8 KiB on {fs}, alone, {seconds:g} s: p50 {at(0.5):.2f} ms, p99 {at(0.99):.2f},"
      f" p99.9 {at(0.999):.2f}, max {took[-1]:.2f} ({len(took)} calls)")
PROBE
}

stack_secrets
# The machine, before the stack adds its own load.
{
    echo "machine $(nproc) cores, $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | xargs),"
    echo "        load average $(cut -d' ' -f1-3 /proc/loadavg) before the run; $(date -u '+%Y-%m-%d %H:%M UTC'); $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    if [[ $BENCH_FSYNC_SECONDS != 0 ]]; then
        log "fsync on the data directory's disk ($BENCH_FSYNC_SECONDS s)"
        fsync_probe "$BENCH_DIR" "$BENCH_FSYNC_SECONDS" || die "the fsync probe failed"
    fi
} >"$BENCH_DIR/machine.txt"
stack_start

ENVOY="http://127.0.0.1:$ENVOY_PORT"
# The bodies: the invoice tool call as compact JSON, and the same payload in an exchange envelope.
python3 -c 'import json, sys; json.dump(json.load(open(sys.argv[1])), open(sys.argv[2], "w"), separators=(",", ":"))' \
    "$ROOT/scripts/payloads/invoice-toolcall.json" "$BENCH_DIR/invoice.json"
exchange_body "$ROOT/scripts/payloads/invoice-toolcall.json" "$BENCH_DIR/exchange.json"

# run NAME PATH BODY MODE CONNECTIONS
RUNS_MAIN=(
    "passthrough /passthrough/invoices invoice.json plain $BENCH_CONNECTIONS"
    "exchange /v1/exchange exchange.json signet $BENCH_CONNECTIONS"
    "exchange-c$BENCH_HIGH_CONNECTIONS /v1/exchange exchange.json signet $BENCH_HIGH_CONNECTIONS"
    "inline /invoices invoice.json signet $BENCH_CONNECTIONS"
)
RUNS_PG=("exchange-pg /v1/exchange exchange.json signet $BENCH_CONNECTIONS")

# A route that errors fast would look fast: each must answer 200 before it is measured.
check_routes() { # check_routes RUN...
    local run name path body mode status
    for run in "$@"; do
        read -r name path body mode _ <<<"$run"
        headers=(-H 'content-type: application/json')
        [[ $mode == signet ]] && headers+=(-H 'X-SIGNET-API-Key: demo-key' -H "X-SIGNET-Idempotency-Key: bench-check-$name-$RANDOM$RANDOM")
        status=$(curl -sS -o "$BENCH_DIR/check-$name.out" -w '%{http_code}' "${headers[@]}" \
            --data-binary "@$BENCH_DIR/$body" "$ENVOY$path")
        [[ $status == 200 ]] || die "$name ($path) answered $status: $(cat "$BENCH_DIR/check-$name.out")"
    done
}

run_wrk() { # run_wrk DURATION PATH BODY MODE CONNECTIONS
    wrk --threads "$BENCH_THREADS" --connections "$5" --duration "$1" --latency \
        --script "$ROOT/scripts/bench/request.lua" "$ENVOY$2" -- "$BENCH_DIR/$3" "$4"
}

# CPU seconds each process has used (user + system), one line `label pid seconds` each, to
# split a run's cost between processes. STACK_PIDS from stack_start: control plane, demo
# upstream, Envoy; with PostgreSQL also its server processes (all of them on the machine).
cpu_snapshot() {
    local hz label pid
    hz=$(getconf CLK_TCK)
    {
        echo "control_plane ${STACK_PIDS[0]}"
        echo "upstream ${STACK_PIDS[1]}"
        echo "envoy ${STACK_PIDS[2]}"
        if [[ $SP_STORAGE == postgres ]]; then
            pgrep -x postgres | sed 's/^/postgres /' || true
        fi
    } | while read -r label pid; do
        awk -v l="$label" -v p="$pid" -v hz="$hz" '{ printf "%s %s %.2f\n", l, p, ($14 + $15) / hz }' \
            "/proc/$pid/stat" 2>/dev/null || true
    done
}

# The control plane's commit calls so far: `sum count` of its commits-per-call histogram, to
# tell the batches of a run (its CPU per commit depends on them: docs/perf.md, "The control
# plane's CPU per commit is mostly per request").
batch_snapshot() {
    curl -fsS "http://127.0.0.1:$CONTROL_PLANE_PORT/metrics" \
        | awk '/^signet_cp_commit_batch_size_sum / { s = $2 } /^signet_cp_commit_batch_size_count / { c = $2 }
               END { print s + 0, c + 0 }'
}

measure() { # measure STORAGE RUN...
    local run name path body mode connections
    log "wrk: $BENCH_THREADS thread(s), $BENCH_DURATION per run (after $BENCH_WARMUP warm-up); Envoy concurrency $ENVOY_CONCURRENCY; storage $1"
    shift
    for run in "$@"; do
        read -r name path body mode connections <<<"$run"
        run_wrk "$BENCH_WARMUP" "$path" "$body" "$mode" "$connections" >/dev/null
        cpu_snapshot >"$BENCH_DIR/cpu-before-$name.txt"
        batch_snapshot >"$BENCH_DIR/batches-before-$name.txt"
        run_wrk "$BENCH_DURATION" "$path" "$body" "$mode" "$connections" >"$BENCH_DIR/wrk-$name.txt"
        cpu_snapshot >"$BENCH_DIR/cpu-after-$name.txt"
        batch_snapshot >"$BENCH_DIR/batches-after-$name.txt"
        echo "$name $connections $SP_STORAGE" >>"$BENCH_DIR/runs.txt"
        log "$name ($connections connections) done"
    done
}

# profile RUN: RUN once more with `perf record` on Envoy and the control plane.
profile() {
    local name path body mode connections perf_pid
    read -r name path body mode connections <<<"$1"
    name="$name-perf"
    command -v perf >/dev/null || die "BENCH_PROFILE=1 needs perf (Debian: linux-perf)"
    run_wrk "$BENCH_WARMUP" "$path" "$body" "$mode" "$connections" >/dev/null
    cpu_snapshot >"$BENCH_DIR/cpu-before-$name.txt"
    perf record -q -e cpu-clock -F 999 -p "${STACK_PIDS[2]},${STACK_PIDS[0]}" \
        -o "$BENCH_DIR/$name.data" 2>"$BENCH_DIR/$name.log" &
    perf_pid=$!
    run_wrk "$BENCH_DURATION" "$path" "$body" "$mode" "$connections" >"$BENCH_DIR/wrk-$name.txt"
    kill -INT "$perf_pid"
    wait "$perf_pid" || true
    cpu_snapshot >"$BENCH_DIR/cpu-after-$name.txt"
    echo "$name ${STACK_PIDS[2]} ${STACK_PIDS[0]}" >>"$BENCH_DIR/profiles.txt"
    log "$name (under perf) done"
}

seconds() { # seconds 10s|2m|5: wrk's duration, in seconds
    case $1 in
        *m) echo $((${1%m} * 60)) ;;
        *s) echo "${1%s}" ;;
        *) echo "$1" ;;
    esac
}

# open_loop RUN CONNECTIONS...: `exchange` offered at BENCH_OPEN_LOAD of the rate wrk's RUN reached.
open_loop() {
    local run=$1 rate connections name
    shift
    rate=$(awk -v f="$BENCH_OPEN_LOAD" '/^Requests\/sec:/ { printf "%.0f", $2 * f }' "$BENCH_DIR/wrk-$run.txt")
    for connections in "$@"; do
        name="open-c$connections${run#exchange}"
        log "open loop: exchange at $rate req/s on $connections connections, storage $SP_STORAGE"
        "$BIN/open-loop" "$ENVOY/v1/exchange" "$BENCH_DIR/exchange.json" "$rate" \
            "$connections" "$(seconds "$BENCH_DURATION")" "$(seconds "$BENCH_WARMUP")" >"$BENCH_DIR/$name.txt" \
            || die "open-loop failed"
        echo "$name $connections $SP_STORAGE" >>"$BENCH_DIR/open.txt"
    done
}

check_routes "${RUNS_MAIN[@]}"
measure "$MAIN_STORAGE" "${RUNS_MAIN[@]}"
open_loop exchange "$BENCH_CONNECTIONS" "$BENCH_HIGH_CONNECTIONS"
[[ $BENCH_PROFILE != 1 ]] || profile "${RUNS_MAIN[1]}"

if [[ -n $PG_URL ]]; then
    stack_stop
    export SP_STORAGE=postgres SP_POSTGRES_URL=$PG_URL
    stack_start
    check_routes "${RUNS_PG[@]}"
    measure postgres "${RUNS_PG[@]}"
    open_loop exchange-pg "$BENCH_CONNECTIONS"
    [[ $BENCH_PROFILE != 1 ]] || profile "${RUNS_PG[0]}"
fi

python3 - "$BENCH_DIR" "$WASM" "$BENCH_CONNECTIONS" "$BENCH_HIGH_CONNECTIONS" "$PG_SKIPPED" "$ROOT" "$BENCH_OPEN_LOAD" <<'EOF'
import os, re, subprocess, sys
bench_dir, wasm, connections, high_connections, pg_skipped, root, open_load = sys.argv[1:8]
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
    """CPU ms per request of each process label; a process that started during the run counts
    from zero, one that ended is left out."""
    def read(when):
        snapshot = {}
        for line in open(f"{bench_dir}/cpu-{when}-{name}.txt"):
            label, pid, seconds = line.split()
            snapshot[(label, pid)] = float(seconds)
        return snapshot
    before, after = read("before"), read("after")
    cpu = {}
    for (label, pid), seconds in after.items():
        cpu[label] = cpu.get(label, 0.0) + seconds - before.get((label, pid), 0.0)
    return {label: seconds * 1000 / total for label, seconds in cpu.items()}

def commits_per_call(name):
    """The mean commits per commit call of the run (None: no call)."""
    (s0, c0), (s1, c1) = ([float(x) for x in open(f"{bench_dir}/batches-{when}-{name}.txt").read().split()]
                          for when in ("before", "after"))
    return (s1 - s0) / (c1 - c0) if c1 > c0 else None

runs = [line.split() for line in open(f"{bench_dir}/runs.txt")]
results = {}
for name, conns, storage in runs:
    results[name] = parse(name)
    results[name].update(conns=int(conns), storage=storage, cpu=cpu_ms_per_request(name, results[name]["total"]),
                         batch=commits_per_call(name))
base = results["passthrough"]

print()
print(open(f"{bench_dir}/machine.txt").read().rstrip())
print()
print(f"{'run':<14} {'conns':>5} {'storage':>8} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'vs passthrough':>15}"
      f" | CPU ms per request: {'envoy':>6} {'control plane':>13} {'upstream':>8} {'postgres':>8}"
      f" | {'commits/call':>12} | requests, non-2xx")
for name, r in results.items():
    ratio = f"{r['rps'] / base['rps']:.2f}x" if r["conns"] == base["conns"] else "-"
    cpu = r["cpu"]
    postgres = f"{cpu['postgres']:.3f}" if "postgres" in cpu else "-"
    batch = f"{r['batch']:.1f}" if r["batch"] is not None else "-"
    print(f"{name:<14} {r['conns']:>5} {r['storage']:>8} {r['rps']:>8.0f} {r['p50']:>7.2f} {r['p99']:>7.2f} {ratio:>15}"
          f" | {'':19} {cpu['envoy']:>6.3f} {cpu['control_plane']:>13.3f} {cpu['upstream']:>8.3f} {postgres:>8}"
          f" | {batch:>12} | {r['total']}, {r['non2xx']}"
          + (f"  socket errors: {r['socket_errors']}" if r["socket_errors"] else ""))
opened = {}  # the main storage's open-loop runs, by connections
main_storage = results["exchange"]["storage"]
open_errors = []
if os.path.exists(f"{bench_dir}/open.txt"):
    print()
    print(f"open loop (latency below saturation): exchange offered at a fixed rate, each request timed from when it was due")
    print(f"{'run':<14} {'conns':>5} {'storage':>8} {'offered':>8} {'answered':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'p99.9':>7} {'max ms':>7} | non-2xx, errors, late")
    for line in open(f"{bench_dir}/open.txt"):
        name, conns, storage = line.split()
        o = dict((k, float(v)) for k, v in (l.split() for l in open(f"{bench_dir}/{name}.txt")))
        if storage == main_storage:
            opened[int(conns)] = o
        print(f"{name:<14} {conns:>5} {storage:>8} {o['rate']:>8.0f} {o['achieved']:>8.0f} {o['p50_ms']:>7.2f} {o['p90_ms']:>7.2f}"
              f" {o['p99_ms']:>7.2f} {o['p999_ms']:>7.2f} {o['max_ms']:>7.2f} | {o['non_2xx']:.0f}, {o['errors']:.0f}, {o['late']:.0f}")
        if o["non_2xx"] or o["errors"]:
            open_errors.append((name, o))

print()
print(f"signet_filter.wasm: {os.path.getsize(wasm)} bytes ({os.path.getsize(wasm) / 1024:.0f} KiB)")

wasm_exchange_us = None
if os.path.exists(f"{bench_dir}/wasm.txt"):
    wasm_text = open(f"{bench_dir}/wasm.txt").read()
    print()
    print("the filter's stages in V8 (scripts/wasm-bench, best of its runs):")
    print(wasm_text.rstrip())
    found = re.search(r"^exchange \(no lap timers\)\s+([\d.]+)", wasm_text, re.M)
    wasm_exchange_us = float(found.group(1)) if found else None

if os.path.exists(f"{bench_dir}/profiles.txt"):
    print()
    print("where the CPU of an exchange goes (perf record at 999 Hz, an extra run: perf slows it):")
    for line in open(f"{bench_dir}/profiles.txt"):
        name, envoy_pid, control_plane_pid = line.split()
        r = parse(name)
        cpu = cpu_ms_per_request(name, r["total"])
        print(f"{name}: {r['rps']:.0f} req/s under perf")
        for kind, pid, label in (("envoy", envoy_pid, "envoy"), ("control-plane", control_plane_pid, "control_plane")):
            sys.stdout.flush()
            subprocess.run([sys.executable, f"{root}/scripts/bench/profile.py", f"{bench_dir}/{name}.data",
                            pid, kind, str(cpu[label] * 1000)], check=False)

# The targets of issue #12: label, figure (None: not measured), bound, "<=" or ">=", format of
# figure and bound, why a figure is missing.
exchange = results["exchange"]
sqlite_run = exchange if exchange["storage"] == "sqlite" else None
pg_run = results.get("exchange-pg") or (exchange if exchange["storage"] == "postgres" else None)
per_commit_us = lambda r: r["cpu"]["control_plane"] * 1000
error_runs = [n for n, r in results.items() if r["non2xx"] or r["socket_errors"]]
error_runs += [name for name, o in open_errors]
errors = sum(r["non2xx"] for r in results.values()) + sum(int(o["non_2xx"] + o["errors"]) for _, o in open_errors)
targets = [
    (f"Envoy CPU per exchange / per passthrough request (c{connections})",
     exchange["cpu"]["envoy"] / base["cpu"]["envoy"], 2.5, "<=", "{:.2f}x", ""),
    (f"control-plane CPU per commit, SQLite (exchange run, c{connections})",
     per_commit_us(sqlite_run) if sqlite_run else None, 100, "<=", "{:.0f} us",
     "the main run is not on SQLite"),
    (f"control-plane CPU per commit, PostgreSQL (exchange run, c{connections})",
     per_commit_us(pg_run) if pg_run else None, 150, "<=", "{:.0f} us", pg_skipped),
    (f"exchange req/s / passthrough req/s (c{connections})",
     exchange["rps"] / base["rps"], 0.35, ">=", "{:.2f}x", ""),
    (f"exchange p99 at {connections} connections (open loop, {open_load} of c{connections} rate)",
     opened[int(connections)]["p99_ms"] if int(connections) in opened else None, 8, "<=", "{:.2f} ms",
     "no open-loop run"),
    (f"exchange p99 at {high_connections} connections (open loop, same rate)",
     opened[int(high_connections)]["p99_ms"] if int(high_connections) in opened else None, 8, "<=",
     "{:.2f} ms", "no open-loop run"),
    ("non-2xx answers and socket errors, all runs", max(errors, len(error_runs)), 0, "<=",
     "{:.0f}", ""),
    ("filter logic per exchange in V8 (wasm-bench)", wasm_exchange_us, 60, "<=", "{:.1f} us",
     "no figure in its output" if os.path.exists(f"{bench_dir}/wasm.txt") else "BENCH_WASM=0"),
]
print()
print(f"{'target (issue #12)':<62} {'figure':>10}  {'target':>11}  result")
for label, value, bound, op, fmt, missing in targets:
    bound_text = f"{op} {fmt.format(bound)}"
    if value is None:
        print(f"{label:<62} {'-':>10}  {bound_text:>11}  not measured ({missing})")
        continue
    ok = value <= bound if op == "<=" else value >= bound
    print(f"{label:<62} {fmt.format(value):>10}  {bound_text:>11}  {'PASS' if ok else 'FAIL'}")
batches = ", ".join(f"{r['batch']:.1f} on {r['storage']}" for r in (sqlite_run, pg_run) if r and r["batch"])
print("CPU per commit: the control plane's CPU in the exchange run / the run's 200 answers (one"
      f" commit each, in the batches the filter sends: {batches or 'none'} commits a call; most of a"
      " commit call's cost is per call, docs/perf.md).")
print("p99: the wrk runs above are at saturation, where latency is connections / throughput;"
      " the targets take the open loop's, below it. Each exchange waits for its commit's fsync:"
      " the disk line above is that wait's own tail.")

if error_runs:
    print(f"error: non-2xx answers or socket errors on {', '.join(error_runs)}: the figures are not valid", file=sys.stderr)
    sys.exit(1)
EOF
