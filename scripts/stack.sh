# Shared by scripts/up.sh and scripts/bench.sh (sourced, not run): build, configure, start and
# stop the local stack — control plane, demo upstream, Envoy with the Signet filter.
#
# Every setting is an environment variable with a default below; the control plane's own SP_*
# variables (control-plane/README.md) pass through unchanged, e.g.
#   SP_STORAGE=postgres SP_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test make up

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ENVOY_VERSION=1.40.0
TARGET_DIR=${CARGO_TARGET_DIR:-target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
WASM=${SIGNET_FILTER_WASM:-$TARGET_DIR/wasm32-wasip1/wasm/signet_filter.wasm}
BIN="$TARGET_DIR/release"

: "${ENVOY_PORT:=10000}"
: "${ENVOY_ADMIN_PORT:=9901}"
: "${CONTROL_PLANE_PORT:=8088}"           # public API: health, metrics, JWKS, chains, exports
: "${CONTROL_PLANE_INTERNAL_PORT:=8090}"  # internal API: the filter's callouts (Envoy only)
: "${CONTROL_PLANE_ADMIN_PORT:=8091}"     # admin API: reload, usage
: "${UPSTREAM_PORT:=8089}"
: "${SIGNET_DATA:=$ROOT/data}"        # dev key, filter token, SQLite database
: "${SIGNET_RUN:=$ROOT/.run}"         # rendered Envoy config, logs

# The demo tenant: API key `demo-key`, may forward to *.example.com; with SP_OPENAI_API_KEY set
# it has the LLM fallback too, up to 100000 FU a month. (Only here, for `make up` and
# `make bench` on loopback; docker-compose.yml takes SP_API_KEYS from .env.)
if [[ -z ${SP_API_KEYS:-} ]]; then
    if [[ -n ${SP_OPENAI_API_KEY:-} ]]; then
        SP_API_KEYS='{"demo-key":{"tenant":"demo","allowlist":["*.example.com"],"fallback_enabled":true,"fu_monthly_limit":100000}}'
    else
        SP_API_KEYS='{"demo-key":{"tenant":"demo","allowlist":["*.example.com"]}}'
    fi
fi
: "${SP_STORAGE:=sqlite}"
: "${SP_DB_PATH:=$SIGNET_DATA/signet.db}"
export SP_API_KEYS SP_STORAGE SP_DB_PATH

STACK_PIDS=()
declare -A SERVICE_PID SERVICE_LOG   # by service key (control-plane, upstream, envoy)

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Builds the filter (.wasm) and the release binaries, installing the wasm target and Envoy if
# they are missing. Arguments go to that cargo build (`--bin NAME`: one more binary).
stack_build() {
    log "building the filter, the control plane, the signet CLI and the demo upstream"
    make -C "$ROOT" --no-print-directory toolchain envoy wasm
    cargo build --release --manifest-path "$ROOT/Cargo.toml" \
        --bin signet --bin signet-control-plane --bin demo-upstream "$@"
    [[ -f $WASM ]] || die "the filter build did not produce $WASM"
    ENVOY_BIN=$(command -v envoy) || die "envoy is not on PATH after 'make envoy'"
    "$ENVOY_BIN" --version | grep -q "/$ENVOY_VERSION/" || die "envoy is not $ENVOY_VERSION"
}

# A dev signing key and filter token, created once under $SIGNET_DATA (never committed), unless
# SP_PRIVATE_KEY_B64 / SP_KID / SP_FILTER_TOKEN are already set.
stack_secrets() {
    mkdir -p "$SIGNET_DATA"
    chmod 700 "$SIGNET_DATA"
    local key_file="$SIGNET_DATA/dev-signing-key.json"
    if [[ -z ${SP_PRIVATE_KEY_B64:-} ]]; then
        if [[ ! -f $key_file ]]; then
            log "creating a dev signing key in $key_file"
            (umask 077 && "$BIN/signet" keygen --kid "dev-$(date -u +%Y%m%d)" >"$key_file")
        fi
        SP_PRIVATE_KEY_B64=$(json_field "$key_file" seed)
        SP_KID=$(json_field "$key_file" kid)
    fi
    [[ -n ${SP_KID:-} ]] || die "SP_PRIVATE_KEY_B64 is set but SP_KID is not"
    local token_file="$SIGNET_DATA/dev-filter-token"
    if [[ -z ${SP_FILTER_TOKEN:-} ]]; then
        if [[ ! -f $token_file ]]; then
            (umask 077 && od -An -tx1 -N24 /dev/urandom | tr -d ' \n' >"$token_file")
        fi
        SP_FILTER_TOKEN=$(<"$token_file")
    fi
    export SP_PRIVATE_KEY_B64 SP_KID SP_FILTER_TOKEN
}

# json_field FILE NAME: a top-level string member of a JSON file.
json_field() {
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"
}

# exchange_body PAYLOAD OUT: the payload file (an OpenAI invoice tool call) in the envelope of
# POST /v1/exchange, as compact JSON.
exchange_body() {
    python3 -c 'import json, sys; json.dump({
    "payload_type": "openai.tooluse.invoice.v1",
    "target_type": "invoice.iso20022.v1",
    "payload": json.load(open(sys.argv[1]))}, open(sys.argv[2], "w"), separators=(",", ":"))' "$1" "$2"
}

# start KEY NAME LOG CMD...: runs CMD in the background as the leader of its own session and
# process group (setsid), so that stack_stop ends it with everything it spawned, whether or not
# this shell has a terminal. Ctrl-C reaches only this script, whose trap calls stack_stop.
start() {
    local key=$1 name=$2 logfile=$3
    shift 3
    : >"$logfile"   # this run's lines only: they are what a failure shows
    setsid "$@" >>"$logfile" 2>&1 </dev/null &
    STACK_PIDS+=("$!")
    SERVICE_PID[$key]=$!
    SERVICE_LOG[$key]=$logfile
    log "started $name (pid $!, log $logfile)"
}

# service_failed KEY WHY: stops with WHY and the end of the service's log, so the reason (a
# missing setting, a port taken, a database refused) is on the terminal.
service_failed() {
    local logfile=${SERVICE_LOG[$1]:-}
    {
        printf 'error: %s\n' "$2"
        if [[ -n $logfile && -s $logfile ]]; then
            printf -- '--- last lines of %s ---\n' "$logfile"
            tail -n 20 "$logfile"
        fi
    } >&2
    exit 1
}

# wait_http KEY NAME URL [SECONDS]: until URL answers 2xx; the service exiting first, or the
# deadline, stops with its log.
wait_http() {
    local key=$1 name=$2 url=$3 limit=${4:-30} pid=${SERVICE_PID[$1]:-}
    local deadline=$((SECONDS + limit))
    until curl -fsS -o /dev/null "$url" 2>/dev/null; do
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            local status=0
            wait "$pid" 2>/dev/null || status=$?
            service_failed "$key" "$name exited (status $status) before answering $url"
        fi
        ((SECONDS < deadline)) || service_failed "$key" "$name did not come up ($url) in $limit s"
        sleep 0.2
    done
}

# stack_start: the control plane, the demo upstream, then Envoy. Its three steps are functions of
# their own so that a measurement script can start another service, or edit the rendered Envoy
# config, between them (scripts/bench/two-instances.sh).
stack_start() {
    stack_start_services
    stack_render_envoy
    stack_start_envoy
}

stack_start_services() {
    mkdir -p "$SIGNET_RUN"
    local port
    for port in "$ENVOY_PORT" "$ENVOY_ADMIN_PORT" "$CONTROL_PLANE_PORT" \
        "$CONTROL_PLANE_INTERNAL_PORT" "$CONTROL_PLANE_ADMIN_PORT" "$UPSTREAM_PORT"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            die "127.0.0.1:$port is already in use (another 'make up'?); set the *_PORT variables"
        fi
    done

    start control-plane "control plane ($SP_STORAGE) on :$CONTROL_PLANE_PORT" \
        "$SIGNET_RUN/control-plane.log" \
        env PORT="$CONTROL_PLANE_PORT" SP_BIND=127.0.0.1 \
        SP_INTERNAL_PORT="$CONTROL_PLANE_INTERNAL_PORT" SP_ADMIN_PORT="$CONTROL_PLANE_ADMIN_PORT" \
        "$BIN/signet-control-plane"
    start upstream "demo upstream on :$UPSTREAM_PORT" "$SIGNET_RUN/upstream.log" \
        "$BIN/demo-upstream" "127.0.0.1:$UPSTREAM_PORT"
    wait_http control-plane "control plane" \
        "http://127.0.0.1:$CONTROL_PLANE_PORT/.well-known/jwks.json"
    wait_http upstream "demo upstream" "http://127.0.0.1:$UPSTREAM_PORT/"
}

# Renders the Envoy config of the stack into $SIGNET_RUN/envoy.yaml.
stack_render_envoy() {
    BIND_ADDRESS=127.0.0.1 ENVOY_ADMIN_ADDRESS=127.0.0.1 CONTROL_PLANE_HOST=127.0.0.1 \
        UPSTREAM_HOST=127.0.0.1 ENVOY_PORT=$ENVOY_PORT ENVOY_ADMIN_PORT=$ENVOY_ADMIN_PORT \
        CONTROL_PLANE_INTERNAL_PORT=$CONTROL_PLANE_INTERNAL_PORT \
        CONTROL_PLANE_PUBLIC_PORT=$CONTROL_PLANE_PORT UPSTREAM_PORT=$UPSTREAM_PORT \
        SIGNET_FILTER_WASM=$WASM \
        "$ROOT/scripts/render-envoy-config.sh" >"$SIGNET_RUN/envoy.yaml"
}

stack_start_envoy() {
    # The filter reads SP_PRIVATE_KEY_B64, SP_KID and SP_FILTER_TOKEN from this environment.
    start envoy "envoy on :$ENVOY_PORT (admin :$ENVOY_ADMIN_PORT)" "$SIGNET_RUN/envoy.log" \
        "$ENVOY_BIN" --config-path "$SIGNET_RUN/envoy.yaml" --disable-hot-restart \
        ${ENVOY_CONCURRENCY:+--concurrency "$ENVOY_CONCURRENCY"} --log-level info
    wait_http envoy envoy "http://127.0.0.1:$ENVOY_ADMIN_PORT/ready"
}

# Stops every process group stack_start created.
stack_stop() {
    local pid
    for pid in "${STACK_PIDS[@]}"; do
        kill -TERM -- "-$pid" 2>/dev/null || true
    done
    for pid in "${STACK_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    STACK_PIDS=()
}
