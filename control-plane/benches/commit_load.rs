//! Commit throughput over HTTP on loopback, per backend.
//!
//! `cargo bench -p signet-control-plane --bench commit_load`
//! Environment: `BENCH_CLIENTS` (concurrent clients, a comma-separated list, default `32,128`),
//! `BENCH_COMMITS` (default 20000 per run), `BENCH_BACKENDS` (default `sqlite,postgres`),
//! `BENCH_BATCH` (commits per request, default 1).
//!
//! Each client owns a trace and appends its pre-signed receipts hop after hop with fresh
//! idempotency keys. Two figures per backend and client count, in the same run:
//! - `baseline`: the HTTP stack alone (`GET /.well-known/jwks.json`, no storage);
//! - `commit`: `POST /v1/internal/commits` with `BENCH_BATCH` consecutive hops (one is a filter
//!   worker's batch when alone; under load its batches carry several); its CPU figures are per
//!   commit.
//!
//! The clients run in this process on a runtime of their own; the service runs on another
//! (threads `cp-server`, like the binary's: one worker per core) with its storage threads
//! (`signet-*`). Two CPU figures per request (user + system time): `cpu` of the whole process
//! (clients included) and `server` of the service's threads alone. PostgreSQL's own CPU is in
//! neither.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// User + system CPU time in a `/proc/.../stat` line, and the thread or process name.
fn stat_cpu(stat: &str) -> (&str, Duration) {
    let name = stat
        .split_once('(')
        .and_then(|(_, rest)| rest.rsplit_once(')'))
        .map_or("", |(name, _)| name);
    // Fields after the parenthesised name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    (name, Duration::from_millis(ticks * 10)) // USER_HZ = 100
}

/// CPU time this process has used so far, and that of each of the service's threads (by
/// thread id: a storage thread of an earlier run may end meanwhile).
fn cpu_time() -> (Duration, HashMap<String, Duration>) {
    let process = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let mut server = HashMap::new();
    let tasks = std::fs::read_dir("/proc/self/task").into_iter().flatten();
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let (name, cpu) = stat_cpu(&stat);
        if name.starts_with("cp-server") || name.starts_with("signet-") {
            server.insert(task.file_name().to_string_lossy().into_owned(), cpu);
        }
    }
    (stat_cpu(&process).1, server)
}

/// CPU time of the service's threads between two `cpu_time` readings.
fn server_cpu_between(
    start: &HashMap<String, Duration>,
    end: &HashMap<String, Duration>,
) -> Duration {
    let since = |tid: &String| start.get(tid).copied().unwrap_or_default();
    end.iter()
        .map(|(tid, cpu)| cpu.saturating_sub(since(tid)))
        .sum()
}

/// One HTTP request: a path and, for a POST to the internal API, its body.
type Step = (&'static str, Option<Vec<u8>>);
/// What one client sends: items in order, each item one or more steps, timed as a whole.
type Work = Vec<Vec<Step>>;

struct Figures {
    per_second: f64,
    p50: Duration,
    p99: Duration,
    /// CPU time of the whole process (server and clients) per item.
    cpu: Duration,
    /// CPU time of the service's threads per item.
    server_cpu: Duration,
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>7.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms  cpu {:>4} µs  server {:>4} µs",
            self.per_second,
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.cpu.as_micros(),
            self.server_cpu.as_micros()
        )
    }
}

/// Runs one task per client, each sending its items in order.
async fn drive(http: &reqwest::Client, base: &str, work: Vec<Work>) -> Figures {
    let total: usize = work.iter().map(Vec::len).sum();
    let base = Arc::new(base.to_owned());
    let cpu_start = cpu_time();
    let start = Instant::now();
    let tasks: Vec<_> = work
        .into_iter()
        .map(|items| {
            let (http, base) = (http.clone(), base.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(items.len());
                for steps in items {
                    let t = Instant::now();
                    for (path, body) in steps {
                        let url = format!("{base}{path}");
                        let req = match body {
                            Some(b) => http
                                .post(url)
                                .header("X-SIGNET-Filter-Token", FILTER_TOKEN)
                                .header("content-type", "application/json")
                                .body(b),
                            None => http.get(url),
                        };
                        let resp = req.send().await.expect("request");
                        let status = resp.status();
                        let text = resp.text().await.expect("body");
                        assert!(status.is_success(), "{status}: {text}");
                    }
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(total);
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed();
    let cpu_end = cpu_time();
    let cpu = (cpu_end.0 - cpu_start.0) / total as u32;
    let server_cpu = server_cpu_between(&cpu_start.1, &cpu_end.1) / total as u32;
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Figures {
        per_second: total as f64 / elapsed.as_secs_f64(),
        p50: at(0.5),
        p99: at(0.99),
        cpu,
        server_cpu,
    }
}

/// Client `c` appends hops 1..=n to trace `{prefix}-c`, each item a batch of `batch` commits.
fn chains(prefix: &str, clients: usize, per_client: usize, batch: usize) -> Vec<Work> {
    let key = signing_key();
    (0..clients)
        .map(|c| {
            let trace_id = format!("{prefix}-{c}");
            let mut prev: Option<String> = None;
            let commits: Vec<_> = (1..=per_client as u64)
                .map(|hop| {
                    let receipt = sign_receipt(&key, &trace_id, hop, prev.as_deref(), "demo");
                    prev = receipt["receipt_hash"].as_str().map(String::from);
                    let idem = format!("{trace_id}-{hop}");
                    let fp = fingerprint(idem.as_bytes());
                    json!({
                        "tenant": "demo", "idempotency_key": idem, "fingerprint": fp,
                        "receipt": receipt, "response": response_for(&receipt), "fu_tokens": 0,
                    })
                })
                .collect();
            commits
                .chunks(batch)
                .map(|commits| {
                    let batch = json!({ "commits": commits });
                    vec![("/v1/internal/commits", Some(batch.to_string().into_bytes()))]
                })
                .collect()
        })
        .collect()
}

async fn bench_backend(
    backend: Backend,
    clients: usize,
    commits: usize,
    batch: usize,
    server_rt: &tokio::runtime::Handle,
) {
    let mut db = TestDb::new(backend).await;
    db.set("SP_CHAIN_MAX", "1000000");
    let db = Arc::new(db);
    let server = {
        let db = db.clone();
        server_rt.spawn(async move { Server::start(&db).await })
    }
    .await
    .unwrap();
    let per_client = commits.div_ceil(clients).next_multiple_of(batch);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()
        .unwrap();

    // Warm-up: connections, prepared statements, page cache.
    drive(&http, &server.bases.internal, chains("warm", clients, 2, 1)).await;
    let baseline_work = vec![vec![vec![("/.well-known/jwks.json", None)]; per_client]; clients];
    let baseline = drive(&http, &server.bases.public, baseline_work).await;
    let mut commit = drive(
        &http,
        &server.bases.internal,
        chains("commit", clients, per_client, batch),
    )
    .await;
    // per commit, not per request
    commit.per_second *= batch as f64;
    commit.cpu /= batch as u32;
    commit.server_cpu /= batch as u32;

    let expected = clients * (2 + per_client);
    let usage = server.usage("demo").await;
    assert_eq!(
        usage["vex"].as_u64(),
        Some(expected as u64),
        "every commit counted once"
    );

    let name = format!("{backend:?}").to_lowercase();
    let label = |what: &str| format!("{name:<8} {clients:>3} clients  {what:<20}");
    println!("{} {baseline}", label("baseline GET jwks"));
    println!(
        "{} {commit}  ({:.0}% of baseline)",
        label(&format!("commit, {batch} a batch")),
        100.0 * commit.per_second / baseline.per_second
    );
    server_rt.spawn(server.stop()).await.unwrap();
    Arc::into_inner(db).unwrap().cleanup().await;
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument that does not match skips the run.
    if std::env::args()
        .skip(1)
        .any(|a| !a.starts_with("--") && !"commit_load".contains(a.as_str()))
    {
        return;
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "{cores} cores, load average before the run: {}",
        load.trim()
    );
    let client_counts: Vec<usize> = std::env::var("BENCH_CLIENTS")
        .unwrap_or_else(|_| "32,128".into())
        .split(',')
        .map(|n| {
            n.trim()
                .parse()
                .expect("BENCH_CLIENTS: numbers separated by commas")
        })
        .collect();
    let commits = env_or("BENCH_COMMITS", 20_000);
    let batch = env_or("BENCH_BATCH", 1).max(1);
    let backends = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // As `#[tokio::main]` in the binary: one worker per core.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("cp-server")
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        for name in backends.split(',') {
            let backend = match name.trim() {
                "sqlite" => Backend::Sqlite,
                "postgres" => Backend::Postgres,
                other => panic!("BENCH_BACKENDS: unknown backend {other:?}"),
            };
            for &clients in &client_counts {
                bench_backend(backend, clients, commits, batch, server_rt.handle()).await;
            }
        }
    });
}
