//! The `signet` binary end to end: exit codes, stdout and stderr of every command.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};
use signet_protocol::receipt::{self, Policy, ReceiptDraft};
use signet_protocol::{bundle, cid, Jwks, SigningKey};

fn signet(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_signet"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command that fails before reading stdin closes it: a broken pipe is expected then.
    let _ = child.stdin.take().unwrap().write_all(stdin);
    child.wait_with_output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/vectors")
}

/// A scratch directory for this test binary.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("signet-cli")
        .join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn signed_chain(key: &SigningKey) -> Vec<Value> {
    let mut chain: Vec<Value> = Vec::new();
    for hop in 1..=3u64 {
        let canon = format!("{{\"n\":{hop}}}");
        let draft = ReceiptDraft {
            trace_id: "cli-trace".into(),
            hop,
            ts: "2026-11-25T17:00:00.000Z".into(),
            tenant: "acme".into(),
            cid: cid::cid(canon.as_bytes()),
            canon: Some(canon),
            prev_receipt_hash: chain
                .last()
                .map(|r| r["receipt_hash"].as_str().unwrap().into()),
            policy: Policy {
                engine: "HEL".into(),
                allowed: true,
                reason: "ok".into(),
            },
            extensions: Default::default(),
        };
        chain.push(Value::Object(receipt::sign(&draft, key).unwrap()));
    }
    chain
}

#[test]
fn canon_reproduces_the_rfc8785_vectors() {
    for name in [
        "arrays",
        "french",
        "structures",
        "values",
        "weird",
        "unicode",
    ] {
        let input = std::fs::read(vectors().join(format!("cyberphone/input/{name}.json"))).unwrap();
        let expected =
            std::fs::read(vectors().join(format!("cyberphone/output/{name}.json"))).unwrap();
        let output = signet(&["canon", "--rfc8785"], &input);
        assert!(output.status.success(), "{name}: {}", stderr(&output));
        assert_eq!(output.stdout, expected, "{name}");
    }
    // The default profile normalizes to NFC.
    let output = signet(&["canon"], "[\"e\u{301}\"]".as_bytes());
    assert_eq!(stdout(&output), "[\"\u{e9}\"]");
}

#[test]
fn invalid_input_gives_exit_1_and_one_line() {
    for input in [
        &br#"{"a":1,"a":2}"#[..],
        br#"["\ud800"]"#,
        b"[1e999]",
        b"{",
        b"\xff",
    ] {
        let output = signet(&["canon"], input);
        assert_eq!(output.status.code(), Some(1), "{input:?}");
        assert!(output.stdout.is_empty());
        let reason = stderr(&output);
        assert_eq!(reason.trim_end().lines().count(), 1, "{reason}");
    }
    let output = signet(&["canon"], br#"{"a":1,"a":2}"#);
    assert!(stderr(&output).contains("DUPLICATE_KEY"));
}

#[test]
fn cid_prints_the_sha256_of_the_canonical_form() {
    let output = signet(&["cid"], br#"{ "b": 2, "a": 1 }"#);
    assert!(output.status.success());
    assert_eq!(
        stdout(&output),
        format!("{}\n", cid::cid(br#"{"a":1,"b":2}"#))
    );
}

#[test]
fn keygen_prints_a_seed_and_its_jwk() {
    let output = signet(&["keygen", "--kid", "k-2026"], b"");
    assert!(output.status.success());
    let printed: Value = serde_json::from_slice(&output.stdout).unwrap();
    let key = SigningKey::from_seed_b64url(printed["seed"].as_str().unwrap(), "k-2026").unwrap();
    assert_eq!(
        printed["jwk"],
        serde_json::to_value(key.public_jwk()).unwrap()
    );
    assert_eq!(printed["kid"], "k-2026");

    // Two runs give two keys.
    let again: Value = serde_json::from_slice(&signet(&["keygen"], b"").stdout).unwrap();
    assert_ne!(again["seed"], printed["seed"]);
    assert!(again["kid"].as_str().unwrap().starts_with("signet-"));
}

#[test]
fn verify_upstream_vectors_unsigned() {
    let receipt = vectors().join("signet-upstream/basic-receipt.json");
    let chain = vectors().join("signet-upstream/simple-chain.json");
    let output = signet(&["verify", "receipt", receipt.to_str().unwrap()], b"");
    assert_eq!(
        (output.status.code(), stdout(&output).as_str()),
        (Some(0), "valid\n")
    );
    let output = signet(&["verify", "chain", chain.to_str().unwrap()], b"");
    assert_eq!(
        (output.status.code(), stdout(&output).as_str()),
        (Some(0), "valid\n")
    );

    let output = signet(
        &["verify", "chain", chain.to_str().unwrap(), "--require-sig"],
        b"",
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("receipt 0 (hop 1)"),
        "{}",
        stderr(&output)
    );
    assert!(stderr(&output).contains("MISSING_SIGNATURE"));
}

#[test]
fn verify_signed_chain_and_bundle_with_a_jwks_file() {
    let dir = scratch("signed");
    let key = SigningKey::from_seed([3; 32], "k1");
    let jwks: Jwks = [key.public_jwk()].into_iter().collect();
    let jwks_path = dir.join("jwks.json");
    std::fs::write(&jwks_path, jwks.to_json()).unwrap();
    let jwks_arg = jwks_path.to_str().unwrap();

    let chain = signed_chain(&key);
    let exported =
        bundle::export("cli-trace", chain.clone(), "2026-11-25T18:00:00.000Z", &key).unwrap();
    let chain_path = dir.join("chain.json");
    std::fs::write(&chain_path, serde_json::to_vec(&chain).unwrap()).unwrap();
    let bundle_path = dir.join("bundle.json");
    std::fs::write(&bundle_path, serde_json::to_vec(&exported).unwrap()).unwrap();

    for (kind, path) in [("chain", &chain_path), ("bundle", &bundle_path)] {
        let args = [
            "verify",
            kind,
            path.to_str().unwrap(),
            "--jwks",
            jwks_arg,
            "--require-sig",
        ];
        let output = signet(&args, b"");
        assert_eq!(stdout(&output), "valid\n", "{kind}: {}", stderr(&output));
        assert_eq!(output.status.code(), Some(0));
    }
    // A receipt from stdin.
    let one = serde_json::to_vec(&chain[1]).unwrap();
    let output = signet(
        &[
            "verify",
            "receipt",
            "-",
            "--jwks",
            jwks_arg,
            "--require-sig",
        ],
        &one,
    );
    assert_eq!(stdout(&output), "valid\n", "{}", stderr(&output));

    // Receipt 2 tampered: the failure names it and the rule.
    let mut tampered = chain.clone();
    tampered[2]["tenant"] = json!("mallory");
    std::fs::write(&chain_path, serde_json::to_vec(&tampered).unwrap()).unwrap();
    let output = signet(
        &[
            "verify",
            "chain",
            chain_path.to_str().unwrap(),
            "--jwks",
            jwks_arg,
        ],
        b"",
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    let reason = stderr(&output);
    assert!(
        reason.contains("receipt 2 (hop 3)") && reason.contains("RECEIPT_HASH"),
        "{reason}"
    );

    // The wrong key: signatures fail.
    let other: Jwks = [SigningKey::from_seed([4; 32], "k1").public_jwk()]
        .into_iter()
        .collect();
    std::fs::write(&jwks_path, other.to_json()).unwrap();
    let output = signet(
        &[
            "verify",
            "bundle",
            bundle_path.to_str().unwrap(),
            "--jwks",
            jwks_arg,
        ],
        b"",
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("SIGNATURE"), "{}", stderr(&output));
}

#[test]
fn verify_fetches_the_jwks_from_a_url() {
    let key = SigningKey::from_seed([5; 32], "k-url");
    let jwks = Jwks::from_iter([key.public_jwk()]).to_json();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/.well-known/jwks.json",
        listener.local_addr().unwrap()
    );
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0u8; 4096];
        let n = stream.read(&mut request).unwrap();
        assert!(String::from_utf8_lossy(&request[..n]).starts_with("GET /.well-known/jwks.json"));
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{jwks}",
            jwks.len()
        );
        stream.write_all(response.as_bytes()).unwrap();
    });
    let receipt = serde_json::to_vec(&signed_chain(&key)[0]).unwrap();
    let output = signet(
        &["verify", "receipt", "-", "--jwks", &url, "--require-sig"],
        &receipt,
    );
    server.join().unwrap();
    assert_eq!(stdout(&output), "valid\n", "{}", stderr(&output));
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &[][..],
        &["frobnicate"],
        &["verify", "receipt"],
        &["verify", "thing", "x"],
        &["canon", "--nope"],
    ] {
        let output = signet(args, b"{}");
        assert_eq!(output.status.code(), Some(2), "{args:?}");
    }
    let output = signet(&["verify", "receipt", "/nonexistent/receipt.json"], b"");
    assert_eq!(output.status.code(), Some(2));
}

/// Serves `status` and `body` to one request on a fresh port; the URL of `/healthz` there.
fn serve_once(status: &'static str, body: &'static str) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/healthz", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0u8; 4096];
        let n = stream.read(&mut request).unwrap();
        assert!(String::from_utf8_lossy(&request[..n]).starts_with("GET /healthz"));
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).unwrap();
    });
    (url, server)
}

#[test]
fn health_exits_0_only_for_a_200_ok() {
    let (url, server) = serve_once("200 OK", r#"{"status":"ok","storage":"sqlite"}"#);
    let output = signet(&["health", &url], b"");
    server.join().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stdout(&output).contains(r#""status":"ok""#));

    let (url, server) = serve_once(
        "503 Service Unavailable",
        r#"{"status":"unavailable","reason":"sqlite writer panicked"}"#,
    );
    let output = signet(&["health", &url], b"");
    server.join().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("sqlite writer panicked"));

    // 200 with a body that does not say ok is not healthy either
    let (url, server) = serve_once("200 OK", r#"{"status":"starting"}"#);
    assert_eq!(signet(&["health", &url], b"").status.code(), Some(1));
    server.join().unwrap();

    // nothing listening
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let output = signet(&["health", &format!("http://{port}/healthz")], b"");
    assert_eq!(output.status.code(), Some(1));
}

/// A delivery as a receiver captures it: the request line and headers, and the body.
#[test]
fn verify_delivery_checks_a_captured_delivery_against_the_jwks() {
    use signet_protocol::http_signature as sig;
    let key = SigningKey::from_seed([9; 32], "k-del");
    let dir = tempfile_dir("verify-delivery");
    let body = br#"{"amount":12}"#;
    let digest = sig::content_digest(body);
    let cid = cid::cid(body);
    let fields = [
        ("content-type", "application/json"),
        ("content-digest", digest.as_str()),
        ("x-signet-delivery", "dlv_1"),
        ("x-signet-trace", "t-1"),
        ("x-signet-hop", "1"),
        ("x-signet-cid", cid.as_str()),
        ("x-signet-attempt", "1"),
    ];
    let signed = sig::sign(
        "POST",
        "https://hooks.example.com:8443/in?x=1",
        &fields,
        1_700_000_000,
        &key,
    );
    let mut headers = String::from("POST /in?x=1 HTTP/1.1\r\nHost: hooks.example.com:8443\r\n");
    for (n, v) in fields {
        headers.push_str(&format!("{n}: {v}\r\n"));
    }
    headers.push_str(&format!(
        "Signature-Input: {}\r\nSignature: {}\r\n",
        signed.signature_input, signed.signature
    ));
    let jwks: Jwks = [key.public_jwk()].into_iter().collect();
    let (h, b, j) = (dir.join("headers"), dir.join("body"), dir.join("jwks.json"));
    std::fs::write(&h, &headers).unwrap();
    std::fs::write(&b, body).unwrap();
    std::fs::write(&j, jwks.to_json()).unwrap();
    let run = |body_file: &Path| {
        signet(
            &[
                "verify-delivery",
                "--headers",
                h.to_str().unwrap(),
                "--body",
                body_file.to_str().unwrap(),
                "--jwks",
                j.to_str().unwrap(),
            ],
            b"",
        )
    };
    let ok = run(&b);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(stdout(&ok).starts_with("valid (kid k-del, created 1700000000, delivery dlv_1)"));
    let tampered = dir.join("tampered");
    std::fs::write(&tampered, br#"{"amount":13}"#).unwrap();
    let bad = run(&tampered);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("Content-Digest"), "{}", stderr(&bad));
    // another key's JWKS
    let other: Jwks = [SigningKey::from_seed([10; 32], "k-del").public_jwk()]
        .into_iter()
        .collect();
    std::fs::write(&j, other.to_json()).unwrap();
    assert_eq!(run(&b).status.code(), Some(1));
}

fn tempfile_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("signet-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
