//! Forwarding through a real resolver and a real HTTPS receiver (SPEC §5): the DNS server, the
//! test CA and the receiver of `forward_support`, all on loopback. The control plane is pointed
//! at them by its settings (`SP_DNS_SERVERS`, `SP_FORWARD_CA_FILE`) and may reach 127.0.0.2
//! only (`SP_FORWARD_ALLOW_CIDRS=127.0.0.2/32`), which stands for "a public address" here:
//! every other loopback address stays refused.

mod common;
mod forward_support;

use std::time::Duration;

use common::{Backend, Reply, Server, TestDb, FILTER_TOKEN};
use forward_support::{Dns, Receiver, TestCa, Victim};
use serde_json::{json, Value};
use signet_protocol::keys::Jwks;
use signet_protocol::{cid, http_signature};

const CANON: &str = r#"{"amount":12,"currency":"EUR"}"#;

struct Fixture {
    dns: Dns,
    ca: TestCa,
    receiver: Receiver,
    db: TestDb,
    server: Server,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn new(backend: Backend, settings: &[(&str, &str)]) -> Fixture {
        let dns = Dns::start().await;
        let ca = TestCa::new();
        let receiver = Receiver::start(&ca, "127.0.0.2").await;
        dns.set("hooks.example.com", &[&["127.0.0.2"]]);
        let dir = tempfile::tempdir().unwrap();
        let mut db = TestDb::new(backend).await;
        forward_settings(&mut db, &dns, &ca, dir.path(), settings);
        let server = Server::start(&db).await;
        Fixture {
            dns,
            ca,
            receiver,
            db,
            server,
            _dir: dir,
        }
    }

    fn url(&self, host: &str) -> String {
        format!(
            "https://{host}:{}/hooks/in?src=signet",
            self.receiver.addr.port()
        )
    }

    async fn forward(&self, key: &str, url: &str) -> Reply {
        self.server.internal("forward", &request(key, url)).await
    }

    async fn jwks(&self) -> Jwks {
        let text = self.server.get_text("/.well-known/jwks.json").await;
        Jwks::from_json(text.as_bytes()).unwrap()
    }

    async fn deliveries(&self, trace: &str) -> Value {
        let r = self
            .server
            .get(
                &format!("/v1/forward/deliveries/{trace}"),
                &[("X-SIGNET-API-Key", common::DEMO_KEY)],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
    }

    /// Waits (at most 15 s) until the receiver got `n` requests.
    async fn wait_for_requests(&self, n: usize) {
        for _ in 0..300 {
            if self.receiver.received().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the receiver got {} requests, not {n}",
            self.receiver.received().len()
        );
    }

    async fn wait_for_state(&self, trace: &str, state: &str) -> Value {
        for _ in 0..300 {
            let d = self.deliveries(trace).await;
            if d["deliveries"][0]["state"] == state {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the delivery never became {state}: {}",
            self.deliveries(trace).await
        );
    }

    async fn metric(&self, line_start: &str) -> Option<f64> {
        let text = self.server.get_text("/metrics").await;
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    async fn finish(self) {
        self.server.stop().await;
        self.db.cleanup().await;
    }
}

fn forward_settings(
    db: &mut TestDb,
    dns: &Dns,
    ca: &TestCa,
    dir: &std::path::Path,
    extra: &[(&str, &str)],
) {
    let ca_file = ca.write_ca(dir);
    db.set("SP_DNS_SERVERS", &dns.addr.to_string());
    db.set("SP_FORWARD_CA_FILE", ca_file.to_str().unwrap());
    db.set("SP_FORWARD_ALLOW_CIDRS", "127.0.0.2/32");
    db.set("SP_FORWARD_POLL_MS", "50");
    db.set("SP_FORWARD_RETRY_BASE_MS", "100");
    db.set("SP_FORWARD_RETRY_MAX_MS", "400");
    db.set("SP_FORWARD_TIMEOUT_MS", "3000");
    db.set(
        "SP_API_KEYS",
        &json!({
            common::DEMO_KEY: {"tenant": "demo", "allowlist": ["*.example.com", "127.0.0.1", "169.254.169.254", "10.0.0.1"]},
            common::OTHER_KEY: {"tenant": "other", "allowlist": []},
        })
        .to_string(),
    );
    for (k, v) in extra {
        db.set(k, v);
    }
}

fn trace_of(key: &str) -> String {
    format!("trace-{key}")
}

fn request(key: &str, url: &str) -> Value {
    json!({
        "tenant": "demo",
        "idempotency_key": key,
        "fingerprint": cid::cid(format!("{key}:{CANON}").as_bytes()),
        "url": url,
        "trace_id": trace_of(key),
        "hop": 1,
        "prev_receipt_hash": null,
        "cid": cid::cid(CANON.as_bytes()),
        "canon": CANON,
    })
}

/// The receiver's check, as README shows it: the signature against the JWKS, the digest
/// against the body, the CID against the body.
fn verify(received: &forward_support::Received, jwks: &Jwks) -> http_signature::Verified {
    let lookup = |name: &str| received.header(name);
    let verified = http_signature::verify(
        &received.method,
        &received.target_uri,
        &lookup,
        &received.body,
        jwks,
    )
    .unwrap_or_else(|e| panic!("{e}: {received:?}"));
    assert_eq!(
        received.header("x-signet-cid").unwrap(),
        cid::cid(&received.body)
    );
    verified
}

#[tokio::test]
async fn a_delivery_is_signed_pinned_and_never_repeated() {
    let f = Fixture::new(Backend::Sqlite, &[]).await;
    let url = f.url("hooks.example.com");
    // as the filter sends it: HEL's URL, which may hold a trailing dot and a fragment
    let sent = url.replace("hooks.example.com:", "HOOKS.example.com.:") + "#top";
    let r = f.forward("k-1", &sent).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let forwarded = &r.body["forwarded"];
    assert_eq!(
        forwarded,
        &json!({"url": url, "status_code": 200, "host": "hooks.example.com",
                "pinned_ip": "127.0.0.2", "response_size": 11})
    );
    assert_eq!(r.body["replay"], false);
    let id = r.body["delivery_id"].as_str().unwrap().to_owned();

    let got = f.receiver.received();
    assert_eq!(got.len(), 1);
    let d = &got[0];
    assert_eq!(d.method, "POST");
    assert_eq!(d.body, CANON.as_bytes());
    assert_eq!(d.target_uri, url);
    assert_eq!(d.header("x-signet-delivery").unwrap(), id);
    assert_eq!(d.header("x-signet-trace").unwrap(), trace_of("k-1"));
    assert_eq!(d.header("x-signet-hop").unwrap(), "1");
    assert_eq!(d.header("x-signet-attempt").unwrap(), "1");
    assert_eq!(d.header("x-signet-prev-receipt-hash"), None);
    let verified = verify(d, &f.jwks().await);
    assert_eq!(verified.kid, common::KID);
    // h2 by ALPN
    assert_eq!(d.version, "HTTP/2.0");
    assert_eq!(f.dns.queries("hooks.example.com"), 1);

    // the same key again: the stored outcome, no second delivery, no second lookup
    let again = f.forward("k-1", &sent).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body["forwarded"], *forwarded);
    assert_eq!(again.body["delivery_id"], id.as_str());
    assert_eq!(again.body["replay"], true);
    assert_eq!(f.receiver.received().len(), 1);
    assert_eq!(f.dns.queries("hooks.example.com"), 1);
    // the key with another request
    let mut other = request("k-1", &sent);
    other["fingerprint"] = json!(cid::cid(b"another request"));
    let reused = f.server.internal("forward", &other).await;
    assert_eq!(
        (reused.status, reused.body["code"].as_str()),
        (422, Some("IDEMPOTENCY_KEY_REUSED"))
    );

    let listed = f.deliveries(&trace_of("k-1")).await;
    let delivery = &listed["deliveries"][0];
    assert_eq!(delivery["state"], "delivered");
    assert_eq!(delivery["forwarded"], *forwarded);
    assert_eq!(delivery["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(delivery["attempts"][0]["status_code"], 200);
    // another tenant sees nothing of it
    let theirs = f
        .server
        .get(
            &format!("/v1/forward/deliveries/{}", trace_of("k-1")),
            &[("X-SIGNET-API-Key", common::OTHER_KEY)],
        )
        .await;
    assert_eq!(theirs.body["deliveries"], json!([]));
    assert_eq!(
        f.metric("signet_forward_total{outcome=\"delivered\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        f.metric("signet_forward_total{outcome=\"replay\"}").await,
        Some(1.0)
    );
    f.finish().await;
}

#[tokio::test]
async fn every_non_global_answer_is_refused_with_its_reason_before_any_connection() {
    let f = Fixture::new(Backend::Sqlite, &[]).await;
    let port = f.receiver.addr.port();
    let cases: &[(&str, &[&str], &str)] = &[
        ("loop.example.com", &["127.0.0.1"], "HEL_RESOLVED_LOOPBACK"),
        ("loop3.example.com", &["127.0.0.3"], "HEL_RESOLVED_LOOPBACK"),
        ("ten.example.com", &["10.0.0.5"], "HEL_RESOLVED_PRIVATE"),
        ("lan.example.com", &["192.168.1.1"], "HEL_RESOLVED_PRIVATE"),
        ("cgnat.example.com", &["100.64.0.1"], "HEL_RESOLVED_PRIVATE"),
        (
            "metadata.example.com",
            &["169.254.169.254"],
            "HEL_RESOLVED_LINKLOCAL",
        ),
        ("zero.example.com", &["0.0.0.0"], "HEL_RESOLVED_RESERVED"),
        (
            "bench.example.com",
            &["198.18.0.1"],
            "HEL_RESOLVED_RESERVED",
        ),
        ("doc.example.com", &["203.0.113.9"], "HEL_RESOLVED_RESERVED"),
        ("mcast.example.com", &["224.0.0.1"], "HEL_RESOLVED_RESERVED"),
        (
            "bcast.example.com",
            &["255.255.255.255"],
            "HEL_RESOLVED_RESERVED",
        ),
        // one bad address among good ones refuses the host
        (
            "mixed.example.com",
            &["127.0.0.2", "10.0.0.1"],
            "HEL_RESOLVED_PRIVATE",
        ),
        // AAAA answers: the embedded IPv4 decides
        ("v6loop.example.com", &["::1"], "HEL_RESOLVED_LOOPBACK"),
        (
            "mapped.example.com",
            &["::ffff:127.0.0.1"],
            "HEL_RESOLVED_LOOPBACK",
        ),
        (
            "nat64.example.com",
            &["64:ff9b::a9fe:a9fe"],
            "HEL_RESOLVED_LINKLOCAL",
        ),
        (
            "sixtofour.example.com",
            &["2002:c0a8:101::1"],
            "HEL_RESOLVED_PRIVATE",
        ),
        (
            "teredo.example.com",
            &["2001:0:4136:e378:8000:63bf:3fff:fdd2"],
            "HEL_RESOLVED_RESERVED",
        ),
        ("ula.example.com", &["fd12:3456::1"], "HEL_RESOLVED_PRIVATE"),
        ("ll6.example.com", &["fe80::1"], "HEL_RESOLVED_LINKLOCAL"),
        (
            "v4v6.example.com",
            &["127.0.0.2", "fe80::1"],
            "HEL_RESOLVED_LINKLOCAL",
        ),
    ];
    for (i, (host, answer, code)) in cases.iter().enumerate() {
        f.dns.set(host, &[answer]);
        let r = f
            .forward(&format!("ssrf-{i}"), &format!("https://{host}:{port}/x"))
            .await;
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (403, Some(*code)),
            "{host}: {}",
            r.body
        );
    }
    let literal: &[(&str, &str)] = &[
        ("https://0x7f.1/x", "HEL_RESOLVED_LOOPBACK"),
        ("https://2130706433/x", "HEL_RESOLVED_LOOPBACK"),
        ("https://017700000001/x", "HEL_RESOLVED_LOOPBACK"),
        ("https://127.0.0.1/x", "HEL_RESOLVED_LOOPBACK"),
        ("https://0xa9fea9fe/x", "HEL_RESOLVED_LINKLOCAL"),
        ("https://10.0.0.1/x", "HEL_RESOLVED_PRIVATE"),
        ("https://nowhere.example.com/x", "HEL_NO_RESOLUTION"),
        ("http://hooks.example.com/x", "HEL_SCHEME_NOT_HTTPS"),
        ("https://user@hooks.example.com/x", "HEL_BAD_URL"),
        ("https://hooks.evil.test/x", "HEL_HOST_NOT_ALLOWED"),
    ];
    for (i, (url, code)) in literal.iter().enumerate() {
        let r = f.forward(&format!("lit-{i}"), url).await;
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (403, Some(*code)),
            "{url}: {}",
            r.body
        );
    }
    assert!(f.receiver.received().is_empty(), "nothing was delivered");
    // nothing stored for a refusal: the key may be used once the host is fixed
    f.dns.set("loop.example.com", &[&["127.0.0.2"]]);
    let fixed = f.forward("ssrf-0", &f.url("loop.example.com")).await;
    assert_eq!(
        fixed.body["forwarded"]["status_code"], 200,
        "{}",
        fixed.body
    );
    assert_eq!(
        f.metric("signet_forward_total{outcome=\"refused\"}").await,
        Some(30.0),
        "every refusal, HEL and resolution alike"
    );
    f.finish().await;
}

#[tokio::test]
async fn a_dns_rebinding_cannot_redirect_the_connection() {
    let f = Fixture::new(Backend::Sqlite, &[]).await;
    let port = f.receiver.addr.port();
    // where the second answer points, on the receiver's port
    let victim = Victim::start(format!("127.0.0.1:{port}").parse().unwrap()).await;
    f.dns
        .set("rebind.example.com", &[&["127.0.0.2"], &["127.0.0.1"]]);
    let r = f.forward("rebind-1", &f.url("rebind.example.com")).await;
    assert_eq!(r.body["forwarded"]["pinned_ip"], "127.0.0.2", "{}", r.body);
    assert_eq!(r.body["forwarded"]["status_code"], 200);
    assert_eq!(f.dns.queries("rebind.example.com"), 1, "resolved once");
    assert_eq!(f.receiver.received().len(), 1);
    assert_eq!(victim.count(), 0, "nothing reached the rebound address");
    // the other order: the first answer is what is judged, and refused
    f.dns
        .set("rebind2.example.com", &[&["127.0.0.1"], &["127.0.0.2"]]);
    let r = f.forward("rebind-2", &f.url("rebind2.example.com")).await;
    assert_eq!(r.body["code"], "HEL_RESOLVED_LOOPBACK");
    assert_eq!(f.dns.queries("rebind2.example.com"), 1);
    assert_eq!(victim.count(), 0);
    assert_eq!(f.receiver.received().len(), 1);
    f.finish().await;
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused() {
    // the receiver's certificate is for *.example.com only
    let f = Fixture::new(Backend::Sqlite, &[("SP_FORWARD_MAX_ATTEMPTS", "1")]).await;
    let mut db2 = TestDb::new(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    forward_settings(
        &mut db2,
        &f.dns,
        &f.ca,
        dir.path(),
        &[("SP_FORWARD_MAX_ATTEMPTS", "1")],
    );
    db2.set(
        "SP_API_KEYS",
        &json!({common::DEMO_KEY: {"tenant": "demo", "allowlist": ["hooks.example.org"]}})
            .to_string(),
    );
    let server = Server::start(&db2).await;
    f.dns.set("hooks.example.org", &[&["127.0.0.2"]]);
    let url = format!("https://hooks.example.org:{}/x", f.receiver.addr.port());
    let r = server.internal("forward", &request("tls-1", &url)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let error = r.body["forwarded"]["error"].as_str().unwrap();
    assert!(
        error.contains("certificate") || error.contains("Certificate"),
        "{error}"
    );
    assert!(f.receiver.received().is_empty());
    server.stop().await;
    db2.cleanup().await;
    f.finish().await;
}

#[tokio::test]
async fn a_failed_delivery_is_retried_honouring_retry_after_then_delivered_with_its_receipt() {
    let f = Fixture::new(Backend::Sqlite, &[]).await;
    f.receiver.answer(503, &[("Retry-After", "1")]);
    let url = f.url("hooks.example.com");
    let started = std::time::Instant::now();
    let r = f.forward("retry-1", &url).await;
    assert_eq!(r.body["forwarded"]["status_code"], 503, "{}", r.body);
    // the exchange's receipt, committed meanwhile: the retry carries its hash
    let receipt = forwarded_receipt(&trace_of("retry-1"), &r.body["forwarded"]);
    let committed = f
        .server
        .commit("demo", "retry-1", &cid::cid(b"retry-1"), &receipt, 0)
        .await;
    assert_eq!(committed.status, 200, "{}", committed.body);
    f.wait_for_requests(2).await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was honoured"
    );
    let got = f.receiver.received();
    let jwks = f.jwks().await;
    let (first, second) = (&got[0], &got[1]);
    verify(first, &jwks);
    let verified = verify(second, &jwks);
    assert!(verified
        .covered
        .iter()
        .any(|c| c == "x-signet-receipt-hash"));
    assert_eq!(second.header("x-signet-attempt").unwrap(), "2");
    assert_eq!(
        second.header("x-signet-delivery"),
        first.header("x-signet-delivery")
    );
    assert_eq!(
        second.header("x-signet-receipt-hash").unwrap(),
        receipt["receipt_hash"].as_str().unwrap()
    );
    assert_eq!(
        first.header("x-signet-receipt-hash"),
        None,
        "not known before the receipt"
    );
    let listed = f.wait_for_state(&trace_of("retry-1"), "delivered").await;
    let attempts = &listed["deliveries"][0]["attempts"];
    assert_eq!(attempts[0]["status_code"], 503);
    assert_eq!(attempts[1]["status_code"], 200);
    // the receipt records the first attempt, as it was
    assert_eq!(listed["deliveries"][0]["forwarded"]["status_code"], 503);
    assert_eq!(
        f.metric("signet_forward_total{outcome=\"failed\"}").await,
        Some(1.0)
    );
    assert_eq!(
        f.metric("signet_forward_total{outcome=\"delivered\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(f.metric("signet_forward_attempts_total").await, Some(2.0));
    f.finish().await;
}

#[tokio::test]
async fn a_receiver_down_then_up_gets_the_delivery() {
    let f = Fixture::new(Backend::Sqlite, &[]).await;
    // a port where nothing listens yet
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        l.local_addr().unwrap().port()
    };
    f.dns.set("later.example.com", &[&["127.0.0.2"]]);
    let url = format!("https://later.example.com:{port}/in");
    let r = f.forward("down-1", &url).await;
    let error = r.body["forwarded"]["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("connect"), "{}", r.body);
    assert_eq!(r.body["forwarded"]["host"], "later.example.com");
    let up = Receiver::start_on(&f.ca, format!("127.0.0.2:{port}").parse().unwrap()).await;
    for _ in 0..300 {
        if !up.received().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(up.received().len(), 1);
    verify(&up.received()[0], &f.jwks().await);
    f.wait_for_state(&trace_of("down-1"), "delivered").await;
    f.finish().await;
}

#[tokio::test]
async fn a_receiver_down_for_good_is_dead_lettered_and_re_driven() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let f = Fixture::new(backend, &[("SP_FORWARD_MAX_ATTEMPTS", "3")]).await;
        for _ in 0..3 {
            f.receiver.answer(500, &[]);
        }
        let r = f.forward("dead-1", &f.url("hooks.example.com")).await;
        assert_eq!(r.body["forwarded"]["status_code"], 500);
        let listed = f.wait_for_state(&trace_of("dead-1"), "dead").await;
        assert_eq!(
            listed["deliveries"][0]["attempts"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
        assert_eq!(f.receiver.received().len(), 3, "bounded attempts");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(f.metric("signet_forward_dead_letters").await, Some(1.0));
        assert_eq!(
            f.metric("signet_forward_total{outcome=\"dead\"}").await,
            Some(1.0)
        );
        // the admin re-drives the tenant's dead letters; the receiver is back
        let redrive = f
            .server
            .http
            .post(f.server.url("/v1/admin/forward/redrive"))
            .header("X-SIGNET-Admin-Key", common::ADMIN_KEY)
            .json(&json!({"tenant": "demo"}))
            .send()
            .await
            .unwrap();
        assert_eq!(redrive.status(), 200);
        assert_eq!(redrive.json::<Value>().await.unwrap()["redriven"], 1);
        let listed = f.wait_for_state(&trace_of("dead-1"), "delivered").await;
        assert_eq!(
            listed["deliveries"][0]["attempts"]
                .as_array()
                .unwrap()
                .len(),
            4
        );
        assert_eq!(f.receiver.received().len(), 4);
        // not an admin: refused
        let anon = f
            .server
            .http
            .post(f.server.url("/v1/admin/forward/redrive"))
            .json(&json!({"tenant": "demo"}))
            .send()
            .await
            .unwrap();
        assert_eq!(anon.status(), 401);
        f.finish().await;
    }
}

/// Two instances over one PostgreSQL: each polls the outbox; a delivery is attempted by one
/// of them at a time and delivered once.
#[tokio::test]
async fn two_instances_share_one_outbox_and_deliver_once() {
    let f = Fixture::new(Backend::Postgres, &[]).await;
    let second = Server::start(&f.db).await;
    for _ in 0..2 {
        f.receiver.answer(503, &[]);
    }
    let keys: Vec<String> = (0..6).map(|i| format!("pair-{i}")).collect();
    for key in &keys {
        f.receiver.answer(503, &[]);
        let r = f.forward(key, &f.url("hooks.example.com")).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    for key in &keys {
        f.wait_for_state(&trace_of(key), "delivered").await;
    }
    // every delivery reached the receiver exactly once with a 200
    let got = f.receiver.received();
    let mut ok_per_delivery = std::collections::HashMap::<String, usize>::new();
    let listed_ok: usize = {
        let mut n = 0;
        for key in &keys {
            let d = f.deliveries(&trace_of(key)).await;
            let attempts = d["deliveries"][0]["attempts"].as_array().unwrap().clone();
            let numbers: Vec<u64> = attempts
                .iter()
                .map(|a| a["attempt"].as_u64().unwrap())
                .collect();
            let expected: Vec<u64> = (1..=numbers.len() as u64).collect();
            assert_eq!(
                numbers, expected,
                "one attempt at a time, numbered in order"
            );
            n += attempts.iter().filter(|a| a["status_code"] == 200).count();
        }
        n
    };
    assert_eq!(listed_ok, keys.len());
    for r in &got {
        *ok_per_delivery
            .entry(r.header("x-signet-delivery").unwrap())
            .or_default() += 1;
    }
    assert_eq!(ok_per_delivery.len(), keys.len());
    second.stop().await;
    f.finish().await;
}

#[tokio::test]
async fn the_endpoint_wants_the_filter_token_and_a_sound_request() {
    let f = Fixture::new(Backend::Sqlite, &[]).await;
    let url = f.url("hooks.example.com");
    let anon = f
        .server
        .http
        .post(f.server.url("/v1/internal/forward"))
        .json(&request("x", &url))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), 401);
    let mut bad_cid = request("x", &url);
    bad_cid["canon"] = json!(r#"{"amount":13}"#);
    let mut unknown = request("x", &url);
    unknown["tenant"] = json!("nobody");
    let mut bad_trace = request("x", &url);
    bad_trace["trace_id"] = json!("a b");
    for (body, code) in [
        (bad_cid, "BAD_REQUEST"),
        (unknown, "UNKNOWN_TENANT"),
        (bad_trace, "BAD_TRACE_ID"),
    ] {
        let r = f.server.internal("forward", &body).await;
        assert_eq!(r.body["code"], code, "{}", r.body);
    }
    assert!(f.receiver.received().is_empty());
    let _ = FILTER_TOKEN;
    f.finish().await;
}

/// A receipt whose `forwarded` is the first attempt's outcome, as the filter signs it.
fn forwarded_receipt(trace: &str, forwarded: &Value) -> Value {
    use signet_protocol::receipt::{self, Policy, ReceiptDraft};
    let mut extensions = serde_json::Map::new();
    extensions.insert("forwarded".into(), forwarded.clone());
    let draft = ReceiptDraft {
        trace_id: trace.into(),
        hop: 1,
        ts: signet_protocol::time::rfc3339_millis(signet_control_plane::now_ms() as u64),
        tenant: "demo".into(),
        cid: cid::cid(CANON.as_bytes()),
        canon: Some(CANON.into()),
        prev_receipt_hash: None,
        policy: Policy {
            engine: "HEL".into(),
            allowed: true,
            reason: "ok".into(),
        },
        extensions,
    };
    Value::Object(receipt::sign(&draft, &common::signing_key()).unwrap())
}

/// A finished delivery goes with its idempotency key's retention (then the key is new again
/// and delivers anew); one still owed to its receiver stays.
#[tokio::test]
async fn finished_deliveries_are_swept_with_the_retention_and_owed_ones_stay() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let f = Fixture::new(backend, &[("SP_FORWARD_RETRY_BASE_MS", "60000")]).await;
        let url = f.url("hooks.example.com");
        assert_eq!(
            f.forward("sw-1", &url).await.body["forwarded"]["status_code"],
            200
        );
        f.receiver.answer(503, &[]);
        assert_eq!(
            f.forward("sw-2", &url).await.body["forwarded"]["status_code"],
            503
        );
        let storage = &f.server.cp.storage;
        let future = signet_control_plane::now_ms() + 1000;
        assert_eq!(
            storage.forward_sweep(future, 10).await.unwrap(),
            1,
            "only the delivered one"
        );
        assert!(storage
            .forward_find("demo", "sw-1")
            .await
            .unwrap()
            .is_none());
        assert_eq!(
            f.deliveries(&trace_of("sw-1")).await["deliveries"],
            json!([])
        );
        assert!(
            storage
                .forward_find("demo", "sw-2")
                .await
                .unwrap()
                .is_some(),
            "still owed"
        );
        // the key is new again
        let again = f.forward("sw-1", &url).await;
        assert_eq!(again.body["replay"], false, "{}", again.body);
        assert_eq!(f.receiver.received().len(), 3);
        f.finish().await;
    }
}
