#!/usr/bin/env python3
"""Where one process's CPU per request goes, from a `perf record` of a `make bench` run
(BENCH_PROFILE=1 in scripts/bench.sh): the samples of process PID grouped by what ran, each
group's share turned into µs per request with the CPU per request that run measured in /proc.

    profile.py PERF_DATA PID envoy|control-plane CPU_US_PER_REQUEST

BENCH_PROFILE_TOP=N also prints the N symbols with the most samples.

Envoy's binary is stripped, so Envoy's own code and V8's runtime are one group; the Wasm code
V8 compiled (the filter) has no file behind it, which is how it is told apart.
"""
import os
import re
import subprocess
import sys

# (group, test on "dso symbol") in order; the first that matches wins.
GROUPS = {
    "envoy": [
        ("filter code (Wasm compiled by V8)", lambda dso, sym: dso in ("[unknown]", "[JIT]") or dso.startswith(("perf-", "//anon", "[anon"))),
        ("kernel: network (loopback TCP, epoll)", lambda dso, sym: dso.startswith("[kernel") and re.search(r"tcp|inet|sock|skb|net_|ip_|epoll|__sys_(send|recv)|loopback|dev_", sym)),
        ("kernel: other (scheduler, syscalls, memory)", lambda dso, sym: dso.startswith("[kernel")),
        ("libc (malloc, memcpy, ...)", lambda dso, sym: "libc" in dso or "libm" in dso or "ld-linux" in dso),
        ("Envoy and V8 runtime (stripped binary)", lambda dso, sym: True),
    ],
    "control-plane": [
        ("Ed25519 verify (curve25519, sha2)", lambda dso, sym: re.search(r"curve25519|ed25519|sha2::|sha512|Sha512", sym)),
        ("SQLite (its static functions too: page cache, WAL, b-tree)", lambda dso, sym: re.search(r"sqlite3|rusqlite|Sqlite|^(pcache|pager|wal|btree|vdbe|balance|moveTo|getAndInitPage|accessPayload)", sym)),
        ("PostgreSQL client (tokio-postgres)", lambda dso, sym: re.search(r"postgres|Postgres", sym)),
        ("JSON: strict parse, canonical form, serde", lambda dso, sym: re.search(r"serde|canonical|strict|json|Json", sym)),
        ("HTTP (hyper, axum, tower)", lambda dso, sym: re.search(r"hyper|axum|tower|http::|httparse|h2::", sym)),
        ("tokio runtime", lambda dso, sym: re.search(r"tokio|mio::", sym)),
        ("kernel: network (loopback TCP, epoll)", lambda dso, sym: dso.startswith("[kernel") and re.search(r"tcp|inet|sock|skb|net_|ip_|epoll|__sys_(send|recv)|loopback|dev_", sym)),
        ("kernel: file I/O, fsync", lambda dso, sym: dso.startswith("[kernel") and re.search(r"ext4|jbd2|xfs|btrfs|overlay|fsync|blk|bio|filemap|folio|page_cache|iomap|pwrite|pread|fdatasync|file_|generic_perform_write|iowrite|virtqueue|xas_", sym)),
        ("kernel: other (scheduler, futex, memory)", lambda dso, sym: dso.startswith("[kernel")),
        ("libc (malloc, memcpy, ...)", lambda dso, sym: "libc" in dso or "libm" in dso or "ld-linux" in dso),
        ("memory allocation, copies", lambda dso, sym: re.search(r"alloc|memcpy|memmove|memset|drop_in_place", sym)),
        ("signet code, other", lambda dso, sym: re.search(r"signet", sym)),
        ("other", lambda dso, sym: True),
    ],
}


def main():
    perf_data, pid, kind, cpu_us = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    report = subprocess.run(
        ["perf", "report", "-i", perf_data, "--pid", pid, "--stdio", "--no-children", "-q",
         "--sort", "dso,sym", "--percent-limit", "0", "-F", "sample,dso,sym"],
        capture_output=True, text=True, check=True).stdout
    totals = {name: 0 for name, _ in GROUPS[kind]}
    samples = 0
    symbols = []
    for line in report.splitlines():
        # "   1234  dso-name   [.] symbol name"
        m = re.match(r"\s*(\d+)\s+(\S+)\s+\[.\]\s+(.*)$", line)
        if not m:
            continue
        count, dso, sym = int(m.group(1)), m.group(2), m.group(3).strip()
        samples += count
        symbols.append((count, dso, sym))
        for name, test in GROUPS[kind]:
            if test(dso, sym):
                totals[name] += count
                break
    if not samples:
        print(f"  {kind}: no samples")
        return
    print(f"  {kind} ({cpu_us:.0f} us CPU per request, {samples} samples):")
    for name, count in sorted(totals.items(), key=lambda kv: -kv[1]):
        if count:
            print(f"    {name:<58} {100 * count / samples:5.1f}%  {cpu_us * count / samples:6.1f} us")
    top = int(os.environ.get("BENCH_PROFILE_TOP", "0"))
    if top:
        print("    top symbols:")
    for count, dso, sym in sorted(symbols, reverse=True)[:top]:
        print(f"      {100 * count / samples:5.1f}%  {dso[:24]:<24} {sym[:100]}")


if __name__ == "__main__":
    main()
