#!/usr/bin/env bash
# CPU of the filter's per-exchange logic in V8, stage by stage (parse, sanitize, normalize,
# canon+cid, sign, response, plus Ed25519 sign/verify and receipt::verify apart), for the
# `make bench` invoice. filter/examples/wasm_bench.rs is built for wasm32-wasip1 with
# [profile.wasm] and run under node 20's V8 (node:wasi) by run.mjs, in the same invocation as
#   base    the same bench built from revision $BASE (default: the commit that added this
#           script, i.e. before the optimizations that followed it)
#   native  the same bench built natively (release), what the CLI and control plane see.
#
#   scripts/wasm-bench/run.sh                 # base vs current vs native
#   BASE=HEAD~2 scripts/wasm-bench/run.sh     # another baseline revision; BASE= for none
#   RUNS=5 BENCH_ARGS="--rounds 25" scripts/wasm-bench/run.sh
#   BASE_NATIVE=1 scripts/wasm-bench/run.sh   # also the baseline built natively
#   BASE= NATIVE=0 scripts/wasm-bench/run.sh  # the current .wasm alone (what `make bench` runs)
#
# Prints µs per stage and the sizes of signet_filter.wasm of both builds. Not part of
# `make test` (it takes a few minutes: two LTO builds for wasm and one native build). Builds in
# $CARGO_TARGET_DIR (default target/) and, for the baseline, $CARGO_TARGET_DIR/wasm-bench-base.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/scripts/wasm-bench"
TARGET_DIR=$(realpath -m "${CARGO_TARGET_DIR:-$ROOT/target}")
RUNS=${RUNS:-3}
NATIVE=${NATIVE:-1}
BENCH_ARGS=${BENCH_ARGS:-}
if [[ -z ${BASE+set} ]]; then
    BASE=$(git -C "$ROOT" log --diff-filter=A --format=%H -- scripts/wasm-bench/run.sh | tail -1)
    BASE=${BASE:-HEAD}
fi
WORK=$(mktemp -d -t wasm-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

build_wasm() { # build_wasm SOURCE_DIR TARGET_DIR: the bench and the filter, profile wasm
    (cd "$1" && CARGO_TARGET_DIR="$2" cargo build --quiet -p signet-filter --profile wasm \
        --target wasm32-wasip1 --lib --example wasm_bench)
}

columns=()
sizes=()
if [[ -n $BASE ]]; then
    rev=$(git -C "$ROOT" rev-parse --short "$BASE")
    echo "building the baseline ($rev) for wasm32-wasip1 ..." >&2
    mkdir "$WORK/base"
    git -C "$ROOT" archive "$BASE" | tar -x -C "$WORK/base"
    # the bench as it is now, so both columns measure the same work
    mkdir -p "$WORK/base/filter/examples"
    cp "$ROOT/filter/examples/wasm_bench.rs" "$WORK/base/filter/examples/"
    build_wasm "$WORK/base" "$TARGET_DIR/wasm-bench-base"
    base_out="$TARGET_DIR/wasm-bench-base/wasm32-wasip1/wasm"
    cp "$base_out/examples/wasm_bench.wasm" "$WORK/base.wasm"
    base_label="base-$rev"
    columns+=("$base_label=$WORK/base.wasm")
    sizes+=("base-$rev $(stat -c %s "$base_out/signet_filter.wasm")")
    if [[ -n ${BASE_NATIVE:-} ]]; then
        (cd "$WORK/base" && CARGO_TARGET_DIR="$TARGET_DIR/wasm-bench-base" cargo build --quiet \
            -p signet-filter --release --example wasm_bench)
        # shellcheck disable=SC2086
        "$TARGET_DIR/wasm-bench-base/release/examples/wasm_bench" --json $BENCH_ARGS \
            >"$WORK/native-base.json"
        native_base="native-base=$WORK/native-base.json"
    fi
fi

builds="wasm32-wasip1"
[[ $NATIVE == 0 ]] || builds+=" and natively"
echo "building the current tree for $builds ..." >&2
build_wasm "$ROOT" "$TARGET_DIR"
out="$TARGET_DIR/wasm32-wasip1/wasm"
cp "$out/examples/wasm_bench.wasm" "$WORK/current.wasm"
columns+=("current${base_label:+~$base_label}=$WORK/current.wasm")
sizes+=("current $(stat -c %s "$out/signet_filter.wasm")")
if [[ $NATIVE != 0 ]]; then
    (cd "$ROOT" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --quiet -p signet-filter --release \
        --example wasm_bench)
    # shellcheck disable=SC2086
    "$TARGET_DIR/release/examples/wasm_bench" --json $BENCH_ARGS >"$WORK/native.json"
    if [[ -n ${native_base:-} ]]; then
        columns+=("$native_base" "native~native-base=$WORK/native.json")
    else
        columns+=("native=$WORK/native.json")
    fi
fi

echo "running under node $(node --version) (V8 $(node -p process.versions.v8)), $RUNS runs each ..." >&2
node "$HERE/run.mjs" --runs "$RUNS" --args "$BENCH_ARGS" "${columns[@]}"
echo
for size in "${sizes[@]}"; do
    read -r label bytes <<<"$size"
    printf 'signet_filter.wasm %-14s %9d bytes\n' "$label" "$bytes"
done
