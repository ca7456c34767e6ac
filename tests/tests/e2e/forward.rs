//! Forwarding through the real Envoy (SPEC §5): the filter asks the real control plane to
//! deliver to an HTTPS receiver with a certificate of a test CA, resolved by a DNS server of the
//! test (`SP_DNS_SERVERS`); the receiver's check is the README's: the RFC 9421 signature against
//! the control plane's JWKS. Every address is on loopback; `SP_FORWARD_ALLOW_CIDRS=127.0.0.2/32`
//! lets the control plane reach the receiver there, every other address stays refused.

use std::time::Duration;

use serde_json::{json, Value};
use signet_e2e::forward_support::{Dns, Received, Receiver, TestCa};
use signet_e2e::http::Response;
use signet_e2e::payloads::{exchange_body, sample_invoice};
use signet_e2e::stack::{ADMIN_KEY, DEMO_KEY};
use signet_e2e::{random_hex, Stack, StackOptions, Storage};
use signet_protocol::keys::Jwks;
use signet_protocol::{cid, http_signature};

use crate::{assert_error, assert_ok};

/// A stack whose control plane delivers to `receiver` through `dns`.
struct Forwarding {
    // fields drop in order: the stack first, the runtime of the DNS server and receiver and the
    // CA file (read at every start of the control plane) last
    stack: Stack,
    dns: Dns,
    receiver: Receiver,
    _runtime: tokio::runtime::Runtime,
    _ca_dir: tempfile::TempDir,
}

impl Forwarding {
    fn start(storage: Storage, settings: &[(&str, &str)]) -> Forwarding {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let ca = TestCa::new();
        let (dns, receiver) = runtime
            .block_on(async { (Dns::start().await, Receiver::start(&ca, "127.0.0.2").await) });
        dns.set("hooks.example.com", &[&["127.0.0.2"]]);
        let dir = tempfile::tempdir().unwrap();
        let ca_file = ca.write_ca(dir.path());
        let mut env: Vec<(String, String)> = [
            ("SP_DNS_SERVERS", dns.addr.to_string()),
            ("SP_FORWARD_CA_FILE", ca_file.display().to_string()),
            ("SP_FORWARD_ALLOW_CIDRS", "127.0.0.2/32".to_owned()),
            ("SP_FORWARD_POLL_MS", "100".to_owned()),
            ("SP_FORWARD_RETRY_BASE_MS", "200".to_owned()),
            ("SP_FORWARD_RETRY_MAX_MS", "500".to_owned()),
            ("SP_FORWARD_TIMEOUT_MS", "3000".to_owned()),
            ("SP_FORWARD_CONNECT_TIMEOUT_MS", "500".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in settings {
            env.retain(|(n, _)| n != k);
            env.push((k.to_string(), v.to_string()));
        }
        let stack = Stack::with_options(StackOptions {
            storage,
            control_plane_env: env,
            ..StackOptions::default()
        });
        Forwarding {
            stack,
            dns,
            receiver,
            _runtime: runtime,
            _ca_dir: dir,
        }
    }

    fn url(&self, host: &str) -> String {
        format!("https://{host}:{}/hooks/in", self.receiver.addr.port())
    }

    fn exchange(&self, key: &str, url: &str) -> Response {
        let mut body = exchange_body(sample_invoice());
        body["forward_url"] = json!(url);
        self.stack.exchange_with(
            &[
                ("X-SIGNET-API-Key", DEMO_KEY),
                ("X-SIGNET-Idempotency-Key", key),
            ],
            body.to_string().as_bytes(),
        )
    }

    fn jwks(&self) -> Jwks {
        let r = self
            .stack
            .client
            .get(&self.stack.control_plane.url("/.well-known/jwks.json"), &[]);
        Jwks::from_json(r.text().as_bytes()).unwrap()
    }

    fn deliveries(&self, trace: &str) -> Value {
        let r = self.stack.client.get(
            &self
                .stack
                .control_plane
                .url(&format!("/v1/forward/deliveries/{trace}")),
            &[("X-SIGNET-API-Key", DEMO_KEY)],
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    fn wait_for(&self, what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..400 {
            if done() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("never {what}\n{}", self.stack.logs());
    }

    fn wait_for_state(&self, trace: &str, state: &str) -> Value {
        self.wait_for(state, || {
            self.deliveries(trace)["deliveries"][0]["state"] == state
        });
        self.deliveries(trace)
    }
}

/// What a receiver does with a delivery (README, "Forwarding"): the signature against the
/// JWKS, the body against `Content-Digest` and `X-Signet-Cid`.
fn receiver_verifies(received: &Received, jwks: &Jwks) {
    let header = |name: &str| received.header(name);
    http_signature::verify(
        &received.method,
        &received.target_uri,
        &header,
        &received.body,
        jwks,
    )
    .unwrap_or_else(|e| panic!("{e}: {received:?}"));
    assert_eq!(
        received.header("x-signet-cid").unwrap(),
        cid::cid(&received.body)
    );
}

fn key() -> String {
    format!("fwd-{}", random_hex(6))
}

#[test]
fn a_forwarded_exchange_is_delivered_signed_and_a_replay_delivers_nothing() {
    let f = Forwarding::start(Storage::Sqlite, &[]);
    let k = key();
    let url = f.url("hooks.example.com");
    let r = f.exchange(&k, &url);
    let body = assert_ok(&f.stack, &r);
    let forwarded = json!({"url": url, "status_code": 200, "host": "hooks.example.com",
                           "pinned_ip": "127.0.0.2", "response_size": 11});
    assert_eq!(body["forwarded"], forwarded, "{body}");
    assert_eq!(body["policy"]["reason"], "ok");
    let trace = body["trace_id"].as_str().unwrap().to_owned();
    let chain = f.stack.chain(&trace);
    assert_eq!(
        chain[0]["forwarded"], forwarded,
        "the signed receipt holds it"
    );
    let got = f.receiver.received();
    assert_eq!(got.len(), 1);
    receiver_verifies(&got[0], &f.jwks());
    assert_eq!(got[0].header("x-signet-trace").unwrap(), trace);
    assert_eq!(
        got[0].header("x-signet-cid").as_deref(),
        chain[0]["cid"].as_str()
    );
    assert_eq!(got[0].header("x-signet-hop").unwrap(), "1");

    // the same request again: the stored answer, no second delivery
    let again = f.exchange(&k, &url);
    assert_eq!(assert_ok(&f.stack, &again)["forwarded"], forwarded);
    assert_eq!(again.header("X-SIGNET-Idempotency-Hit"), Some("1"));
    assert_eq!(f.receiver.received().len(), 1);
    assert_eq!(f.dns.queries("hooks.example.com"), 1);

    // the next exchange of the trace names the receipt it is signed on
    let mut next = exchange_body(sample_invoice());
    next["forward_url"] = json!(url);
    next["trace_id"] = json!(trace);
    let r = f.stack.exchange_with(
        &[
            ("X-SIGNET-API-Key", DEMO_KEY),
            ("X-SIGNET-Idempotency-Key", &key()),
        ],
        next.to_string().as_bytes(),
    );
    assert_ok(&f.stack, &r);
    let second = &f.receiver.received()[1];
    receiver_verifies(second, &f.jwks());
    assert_eq!(second.header("x-signet-hop").unwrap(), "2");
    assert_eq!(
        second.header("x-signet-prev-receipt-hash").as_deref(),
        chain[0]["receipt_hash"].as_str()
    );
}

#[test]
fn addresses_that_are_not_global_are_refused_through_the_real_resolver() {
    let f = Forwarding::start(Storage::Sqlite, &[]);
    let port = f.receiver.addr.port();
    for (host, ip, code) in [
        ("internal.example.com", "127.0.0.1", "HEL_RESOLVED_LOOPBACK"),
        (
            "metadata.example.com",
            "169.254.169.254",
            "HEL_RESOLVED_LINKLOCAL",
        ),
        ("lan.example.com", "10.1.2.3", "HEL_RESOLVED_PRIVATE"),
        (
            "mapped.example.com",
            "::ffff:127.0.0.1",
            "HEL_RESOLVED_LOOPBACK",
        ),
    ] {
        f.dns.set(host, &[&[ip]]);
        let r = f.exchange(&key(), &format!("https://{host}:{port}/x"));
        assert_error(&f.stack, &r, 403, code);
    }
    let r = f.exchange(&key(), &format!("https://nowhere.example.com:{port}/x"));
    assert_error(&f.stack, &r, 403, "HEL_NO_RESOLUTION");
    // rebinding: resolved once, connected to what was classified
    f.dns
        .set("rebind.example.com", &[&["127.0.0.2"], &["127.0.0.1"]]);
    let r = f.exchange(&key(), &f.url("rebind.example.com"));
    assert_eq!(
        assert_ok(&f.stack, &r)["forwarded"]["pinned_ip"],
        "127.0.0.2"
    );
    assert_eq!(f.dns.queries("rebind.example.com"), 1);
    assert_eq!(
        f.receiver.received().len(),
        1,
        "only the rebinding test was delivered"
    );
    // the filter counts the control plane's refusals as HEL denials
    f.stack.envoy.wait_for_stat(
        "signet_denials",
        &[("signet_reason", "HEL_RESOLVED_LOOPBACK")],
        2.0,
    );
}

#[test]
fn a_receiver_down_then_up_is_retried_and_a_dead_letter_is_re_driven() {
    let f = Forwarding::start(Storage::Postgres, &[("SP_FORWARD_MAX_ATTEMPTS", "3")]);
    // down, then up
    f.receiver.answer(503, &[]);
    let r = f.exchange(&key(), &f.url("hooks.example.com"));
    let body = assert_ok(&f.stack, &r);
    assert_eq!(
        body["forwarded"]["status_code"], 503,
        "the first attempt, as it was"
    );
    let trace = body["trace_id"].as_str().unwrap().to_owned();
    let listed = f.wait_for_state(&trace, "delivered");
    let attempts = &listed["deliveries"][0]["attempts"];
    assert_eq!(
        (
            attempts[0]["status_code"].clone(),
            attempts[1]["status_code"].clone()
        ),
        (json!(503), json!(200))
    );
    let got = f.receiver.received();
    assert_eq!(got.len(), 2);
    let jwks = f.jwks();
    receiver_verifies(&got[1], &jwks);
    let receipt = &f.stack.chain(&trace)[0];
    assert_eq!(
        got[1].header("x-signet-receipt-hash").as_deref(),
        receipt["receipt_hash"].as_str()
    );
    assert_eq!(
        got[1].header("x-signet-delivery"),
        got[0].header("x-signet-delivery")
    );

    // down for good: dead after 3 attempts, then re-driven by the admin
    for _ in 0..3 {
        f.receiver.answer(500, &[]);
    }
    let r = f.exchange(&key(), &f.url("hooks.example.com"));
    let trace = assert_ok(&f.stack, &r)["trace_id"]
        .as_str()
        .unwrap()
        .to_owned();
    f.wait_for_state(&trace, "dead");
    f.wait_for("the dead-letter gauge", || {
        f.stack
            .control_plane
            .metrics()
            .value("signet_forward_dead_letters", &[])
            == 1.0
    });
    let redrive = f.stack.client.post(
        &f.stack.control_plane.admin_url("/v1/admin/forward/redrive"),
        &[
            ("X-SIGNET-Admin-Key", ADMIN_KEY),
            ("content-type", "application/json"),
        ],
        json!({"tenant": "demo"}).to_string().as_bytes(),
    );
    assert_eq!(redrive.json()["redriven"], 1, "{}", redrive.text());
    let listed = f.wait_for_state(&trace, "delivered");
    assert_eq!(
        listed["deliveries"][0]["attempts"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    let metrics = f.stack.control_plane.metrics();
    assert_eq!(
        metrics.value("signet_forward_total", &[("outcome", "delivered")]),
        2.0
    );
    assert_eq!(
        metrics.value("signet_forward_total", &[("outcome", "dead")]),
        1.0
    );
    assert_eq!(metrics.value("signet_forward_attempts_total", &[]), 6.0);
}

/// The control plane is killed (SIGKILL) while its first attempt waits for the receiver: the
/// exchange fails (no receipt, so no VEx), the delivery is not lost: once its lease ran out the
/// restarted control plane's outbox attempts it again, with the same delivery id.
#[test]
fn a_kill_9_during_a_delivery_loses_nothing() {
    // lease of an attempt: 4 s + 0.5 s + 5 s
    let mut f = Forwarding::start(Storage::Sqlite, &[("SP_FORWARD_TIMEOUT_MS", "4000")]);
    f.receiver.answer_after(200, &[], Duration::from_secs(3));
    let mut body = exchange_body(sample_invoice());
    body["forward_url"] = json!(f.url("hooks.example.com"));
    let exchange_url = f.stack.envoy.url("/v1/exchange");
    let k = key();
    let exchange = std::thread::spawn(move || {
        signet_e2e::http::Client::new().post(
            &exchange_url,
            &[
                ("content-type", "application/json"),
                ("X-SIGNET-API-Key", DEMO_KEY),
                ("X-SIGNET-Idempotency-Key", &k),
            ],
            body.to_string().as_bytes(),
        )
    });
    f.wait_for("the first attempt", || f.receiver.received().len() == 1);
    f.stack.control_plane.restart();
    let answered = exchange.join().unwrap();
    assert_eq!(answered.status, 503, "{}", answered.text());
    assert_eq!(f.stack.vex_count("demo"), 0);
    for _ in 0..400 {
        if f.receiver.received().len() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let got = f.receiver.received();
    assert_eq!(got.len(), 2, "{}", f.stack.logs());
    assert_eq!(
        got[1].header("x-signet-delivery"),
        got[0].header("x-signet-delivery")
    );
    assert_eq!(got[1].header("x-signet-attempt").unwrap(), "2");
    receiver_verifies(&got[1], &f.jwks());
}
