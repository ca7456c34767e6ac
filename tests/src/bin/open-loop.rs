//! An open-loop load generator for `make bench`: requests are *scheduled* at a fixed rate and
//! each one's latency is measured from the moment it was due, not from when a connection was
//! free to send it. wrk keeps a fixed number of requests in flight instead (closed loop), so
//! at saturation its latencies are connections / throughput (Little's law) and say nothing
//! about the tail a mesh sees below saturation (docs/perf.md, "Cost model").
//!
//! ```text
//! open-loop URL BODY_FILE RATE CONNECTIONS DURATION_S [WARMUP_S]
//! ```
//!
//! HTTP/1.1 with keep-alive on CONNECTIONS connections; each request carries the demo API key
//! and a new idempotency key (a new exchange on a new trace), as scripts/bench/request.lua
//! does for wrk. Prints one `key value` line per figure: `rate` (offered), `achieved`,
//! `requests`, `non_2xx`, `errors`, `late` (requests still unanswered a second after the run's
//! end: their latency counts as that long, a lower bound), `p50_ms`, `p90_ms`, `p99_ms`,
//! `p999_ms`, `max_ms`. Requests of the warm-up are sent the same way and not counted. With
//! `OPEN_LOOP_TRACE=FILE`, FILE gets one line per counted request: when it was due (ms since
//! the counted part began) and its latency (ms), to see when the slow ones happened.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Args {
    host: String,
    path: String,
    body: Vec<u8>,
    rate: f64,
    connections: usize,
    duration: Duration,
    warmup: Duration,
}

fn usage() -> String {
    "usage: open-loop URL BODY_FILE RATE CONNECTIONS DURATION_S [WARMUP_S]".to_owned()
}

fn parse_args() -> Result<Args, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, body, rate, connections, duration, optional @ ..] = args.as_slice() else {
        return Err(usage());
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs (the bench talks to Envoy on loopback)")?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    // a positive number, or with `zero_ok` also 0
    let number = |what: &str, text: &str, zero_ok: bool| {
        text.parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && (*n > 0.0 || zero_ok && *n == 0.0))
            .ok_or(format!(
                "{what} must be a number > 0 (or 0 if optional), not {text:?}"
            ))
    };
    Ok(Args {
        host: host.to_owned(),
        path: if path.is_empty() { "/" } else { path }.to_owned(),
        body: std::fs::read(body).map_err(|e| format!("{body}: {e}"))?,
        rate: number("RATE", rate, false)?,
        connections: connections
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or(format!(
                "CONNECTIONS must be a positive integer, not {connections:?}"
            ))?,
        duration: Duration::from_secs_f64(number("DURATION_S", duration, false)?),
        warmup: match optional {
            [] => Duration::ZERO,
            [w, ..] => Duration::from_secs_f64(number("WARMUP_S", w, true)?),
        },
    })
}

/// What one connection saw: each counted request's (when it was due, since the counted part
/// began; its latency), both in µs, and its faults.
#[derive(Default)]
struct Tally {
    samples: Vec<(u64, u64)>,
    non_2xx: u64,
    errors: u64,
    late: u64,
}

/// The schedule every connection takes its next request from: request `i` is due at
/// `start + i / rate`; the run ends for requests due after `end`.
struct Schedule {
    start: Instant,
    rate: f64,
    counted_from: Instant,
    end: Instant,
    next: AtomicU64,
}

impl Schedule {
    fn due(&self, i: u64) -> Instant {
        self.start + Duration::from_secs_f64(i as f64 / self.rate)
    }
}

fn request_bytes(args: &Args, run_id: &str, n: u64) -> Vec<u8> {
    let mut head = format!(
        "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        args.path,
        args.host,
        args.body.len()
    );
    head.push_str("x-signet-api-key: demo-key\r\n");
    head.push_str(&format!(
        "x-signet-idempotency-key: open-{run_id}-{n}\r\n\r\n"
    ));
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&args.body);
    bytes
}

/// The status and total length (head and body) of the HTTP/1.1 response at the start of
/// `buf`: `None` while its head is incomplete. Envoy frames these answers with Content-Length.
fn response_frame(buf: &[u8]) -> Option<std::io::Result<(u16, usize)>> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let frame = || {
        let head = std::str::from_utf8(&buf[..end]).map_err(|_| invalid("head not UTF-8"))?;
        let status = head
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| invalid("no HTTP/1.1 status line"))?;
        let length = head
            .lines()
            .filter_map(|line| line.split_once(':'))
            .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, value)| value.trim().parse::<usize>().ok())
            .ok_or_else(|| invalid("no content-length"))?;
        Ok((status, end + 4 + length))
    };
    Some(frame())
}

/// Reads one response from `stream` (after what `buf` holds already) and returns its status.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    loop {
        if let Some(frame) = response_frame(buf) {
            let (status, total) = frame?;
            while buf.len() < total {
                read_more(stream, buf).await?;
            }
            buf.drain(..total);
            return Ok(status);
        }
        read_more(stream, buf).await?;
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    let n = stream.read(&mut chunk).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

async fn connection(args: Arc<Args>, schedule: Arc<Schedule>, run_id: Arc<str>) -> Tally {
    let mut tally = Tally::default();
    let mut stream: Option<TcpStream> = None;
    let mut buf = Vec::new();
    loop {
        let i = schedule.next.fetch_add(1, Ordering::Relaxed);
        let due = schedule.due(i);
        if due > schedule.end {
            return tally;
        }
        tokio::time::sleep_until(due.into()).await;
        let counted = due >= schedule.counted_from;
        let at = micros(due.saturating_duration_since(schedule.counted_from));
        let request = request_bytes(&args, &run_id, i);
        let answer = async {
            if stream.is_none() {
                let s = TcpStream::connect(&args.host).await?;
                s.set_nodelay(true)?;
                stream = Some(s);
                buf.clear();
            }
            let Some(s) = stream.as_mut() else {
                return Err(std::io::ErrorKind::NotConnected.into());
            };
            s.write_all(&request).await?;
            read_response(s, &mut buf).await
        };
        // a request still unanswered a second after the run's end is late, not waited for
        let deadline = schedule.end + Duration::from_secs(1);
        match tokio::time::timeout_at(deadline.into(), answer).await {
            Err(_) => {
                if counted {
                    tally.late += 1;
                    let latency = micros(deadline.saturating_duration_since(due));
                    tally.samples.push((at, latency));
                }
                return tally;
            }
            Ok(Err(_)) => {
                stream = None;
                tally.errors += u64::from(counted);
            }
            Ok(Ok(status)) if counted => {
                let latency = micros(Instant::now().saturating_duration_since(due));
                tally.samples.push((at, latency));
                if !(200..300).contains(&status) {
                    tally.non_2xx += 1;
                }
            }
            Ok(Ok(_)) => {}
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn percentile_ms(sorted_us: &[u64], pct: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    // nearest rank
    let rank = ((pct / 100.0) * sorted_us.len() as f64).ceil() as usize;
    sorted_us[rank.clamp(1, sorted_us.len()) - 1] as f64 / 1000.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = match parse_args() {
        Ok(args) => Arc::new(args),
        Err(message) => {
            eprintln!("open-loop: {message}");
            std::process::exit(2);
        }
    };
    let trace_file = std::env::var_os("OPEN_LOOP_TRACE");
    let start = Instant::now() + Duration::from_millis(50);
    let schedule = Arc::new(Schedule {
        start,
        rate: args.rate,
        counted_from: start + args.warmup,
        end: start + args.warmup + args.duration,
        next: AtomicU64::new(0),
    });
    let run_id: Arc<str> = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    )
    .into();
    let tasks: Vec<_> = (0..args.connections)
        .map(|_| tokio::spawn(connection(args.clone(), schedule.clone(), run_id.clone())))
        .collect();
    let mut all = Tally::default();
    for task in tasks {
        let Ok(tally) = task.await else {
            all.errors += 1;
            continue;
        };
        all.samples.extend(tally.samples);
        all.non_2xx += tally.non_2xx;
        all.errors += tally.errors;
        all.late += tally.late;
    }
    if let Some(file) = trace_file {
        all.samples.sort_unstable();
        let lines: String = all
            .samples
            .iter()
            .map(|(at, latency)| format!("{:.3} {:.3}\n", *at as f64 / 1e3, *latency as f64 / 1e3))
            .collect();
        if let Err(e) = std::fs::write(&file, lines) {
            eprintln!("open-loop: {}: {e}", file.to_string_lossy());
        }
    }
    let mut latencies_us: Vec<u64> = all.samples.iter().map(|(_, latency)| *latency).collect();
    latencies_us.sort_unstable();
    let answered = (latencies_us.len() as u64).saturating_sub(all.late) as f64;
    println!("rate {:.0}", args.rate);
    println!("achieved {:.0}", answered / args.duration.as_secs_f64());
    println!("requests {}", latencies_us.len());
    println!("non_2xx {}", all.non_2xx);
    println!("errors {}", all.errors);
    println!("late {}", all.late);
    for (name, pct) in [("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9)] {
        println!("{name}_ms {:.2}", percentile_ms(&latencies_us, pct));
    }
    println!(
        "max_ms {:.2}",
        latencies_us.last().map_or(0.0, |us| *us as f64 / 1000.0)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_a_response_by_its_content_length() {
        let answer = b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(
            response_frame(answer).unwrap().unwrap(),
            (201, answer.len())
        );
        // the head is incomplete: wait for more bytes
        assert!(response_frame(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n").is_none());
        // a response without a length cannot be framed on a kept-alive connection
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(response_frame(chunked).unwrap().is_err());
        assert!(response_frame(b"garbage\r\n\r\n").unwrap().is_err());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let us: Vec<u64> = (1..=100).map(|ms| ms * 1000).collect();
        assert_eq!(percentile_ms(&us, 50.0), 50.0);
        assert_eq!(percentile_ms(&us, 99.0), 99.0);
        assert_eq!(percentile_ms(&us, 99.9), 100.0);
        assert_eq!(percentile_ms(&[], 99.0), 0.0);
    }

    #[test]
    fn requests_are_due_at_the_offered_rate() {
        let start = Instant::now();
        let schedule = Schedule {
            start,
            rate: 400.0,
            counted_from: start,
            end: start + Duration::from_secs(1),
            next: AtomicU64::new(0),
        };
        assert_eq!(schedule.due(0), start);
        assert_eq!(schedule.due(400), start + Duration::from_secs(1));
        assert_eq!(schedule.due(1), start + Duration::from_micros(2500));
    }
}
