//! One complete deployment per test: demo upstream, control plane and Envoy with the filter, on
//! free ports, with a temp dir that holds their configs, logs and (SQLite) database.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::{json, Value};
use tempfile::TempDir;

use crate::control_plane::{ControlPlane, Storage};
use crate::envoy::{Envoy, EnvoySettings};
use crate::http::{Client, Response};
use crate::postgres::TestDatabase;
use crate::process::Service;
use crate::{binaries, random_hex};

/// API keys of the tenants every stack has (`SP_API_KEYS`).
pub const DEMO_KEY: &str = "demo-key";
pub const DEMO_TENANT: &str = "demo";
pub const OTHER_KEY: &str = "other-key";
pub const OTHER_TENANT: &str = "other";
/// `SP_ADMIN_KEY` of every stack (usage counters).
pub const ADMIN_KEY: &str = "e2e-admin-key-0123456789";

#[derive(Clone, Debug)]
pub struct StackOptions {
    pub storage: Storage,
    /// The filter's plugin configuration; `envoy/signet-plugin.json` when `None`.
    pub plugin_config: Option<Value>,
    /// Extra or overriding control-plane variables, e.g. `SP_CHAIN_MAX`.
    pub control_plane_env: Vec<(String, String)>,
    /// Text replacements in the Envoy template (see [`EnvoySettings::template_edits`]).
    pub envoy_template_edits: Vec<(String, String)>,
    /// Overrides of the filter's variables in Envoy's environment (`SP_KID`, …), e.g. a key or
    /// token the control plane does not know.
    pub envoy_env: Vec<(String, String)>,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            storage: Storage::Sqlite,
            plugin_config: None,
            control_plane_env: Vec::new(),
            envoy_template_edits: Vec::new(),
            envoy_env: Vec::new(),
        }
    }
}

/// The signing key shared by the filter (through Envoy's environment) and the control plane.
#[derive(Clone, Debug)]
pub struct TestKey {
    pub kid: String,
    pub seed_b64url: String,
}

impl TestKey {
    pub fn generate() -> TestKey {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).expect("random seed");
        let kid = format!("e2e-{}", random_hex(4));
        let key = signet_protocol::keys::SigningKey::from_seed(seed, &kid);
        TestKey {
            kid,
            seed_b64url: key.seed_b64url(),
        }
    }
}

// Fields drop in order: Envoy first, the temp dir last.
pub struct Stack {
    pub envoy: Envoy,
    pub control_plane: ControlPlane,
    pub upstream: Service,
    pub upstream_port: u16,
    pub key: TestKey,
    pub filter_token: String,
    pub client: Client,
    _database: Option<TestDatabase>,
    pub dir: TempDir,
}

impl Stack {
    pub fn start(storage: Storage) -> Stack {
        Stack::with_options(StackOptions {
            storage,
            ..StackOptions::default()
        })
    }

    pub fn with_options(options: StackOptions) -> Stack {
        let dir = tempfile::Builder::new()
            .prefix("signet-e2e-")
            .tempdir()
            .expect("temp dir");
        let key = TestKey::generate();
        let filter_token = format!("e2e-filter-token-{}", random_hex(16));

        let (upstream, upstream_port) = start_upstream(dir.path());

        let database = (options.storage == Storage::Postgres).then(TestDatabase::create);
        let mut env = control_plane_env(&key, &filter_token, dir.path(), database.as_ref());
        env.extend(options.control_plane_env.iter().cloned());
        let control_plane = ControlPlane::start(dir.path(), env);

        let settings = EnvoySettings {
            control_plane_port: control_plane.internal_port,
            control_plane_public_port: control_plane.port,
            upstream_port,
            plugin_config: options
                .plugin_config
                .clone()
                .unwrap_or_else(crate::envoy::default_plugin_config),
            wasm: binaries::filter_wasm(),
            template_edits: options.envoy_template_edits.clone(),
        };
        let mut env = envoy_env(&key, &filter_token);
        for (name, value) in &options.envoy_env {
            env.retain(|(n, _)| n != name);
            env.push((name.clone(), value.clone()));
        }
        let envoy = Envoy::start(dir.path(), &settings, &env);

        Stack {
            envoy,
            control_plane,
            upstream,
            upstream_port,
            key,
            filter_token,
            client: Client::new(),
            _database: database,
            dir,
        }
    }

    /// The sample invoice to the `inline` route (`/invoices`) with the demo tenant's key.
    pub fn post_invoice(&self) -> Response {
        self.post(
            "/invoices",
            &[
                ("X-SIGNET-API-Key", DEMO_KEY),
                ("content-type", "application/json"),
            ],
            crate::payloads::sample_invoice().to_string().as_bytes(),
        )
    }

    /// `POST /v1/exchange` with the demo tenant's key and a fresh idempotency key.
    pub fn exchange(&self, body: &Value) -> Response {
        let idempotency_key = new_idempotency_key();
        self.exchange_with(
            &[
                ("X-SIGNET-API-Key", DEMO_KEY),
                ("X-SIGNET-Idempotency-Key", &idempotency_key),
            ],
            body.to_string().as_bytes(),
        )
    }

    /// `POST /v1/exchange` with exactly these headers and raw body.
    pub fn exchange_with(&self, headers: &[(&str, &str)], body: &[u8]) -> Response {
        let mut all = vec![("content-type", "application/json")];
        all.extend_from_slice(headers);
        self.client
            .post(&self.envoy.url("/v1/exchange"), &all, body)
    }

    /// `GET /v1/receipts/export/{trace_id}` from the control plane, as the demo tenant.
    pub fn export_bundle(&self, trace_id: &str) -> Response {
        self.client.get(
            &self
                .control_plane
                .url(&format!("/v1/receipts/export/{trace_id}")),
            &[("X-SIGNET-API-Key", DEMO_KEY)],
        )
    }

    /// The receipts of a demo-tenant trace (`GET /v1/receipts/chain/{trace_id}`).
    pub fn chain(&self, trace_id: &str) -> Vec<Value> {
        let response = self.client.get(
            &self
                .control_plane
                .url(&format!("/v1/receipts/chain/{trace_id}")),
            &[("X-SIGNET-API-Key", DEMO_KEY)],
        );
        assert_eq!(
            response.status,
            200,
            "chain of {trace_id}: {}",
            response.text()
        );
        match response.json() {
            Value::Array(receipts) => receipts,
            other => panic!("the chain of {trace_id} is not an array: {other}"),
        }
    }

    /// `POST` to an Envoy route other than the exchange API.
    pub fn post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        self.client.post(&self.envoy.url(path), headers, body)
    }

    /// The tenant's month-to-date usage row from the control plane's admin API (persistent, so
    /// it also tells what a restarted control plane counted).
    pub fn usage(&self, tenant: &str) -> Value {
        let response = self.client.get(
            &self
                .control_plane
                .admin_url(&format!("/v1/admin/usage/{tenant}")),
            &[("X-SIGNET-Admin-Key", ADMIN_KEY)],
        );
        assert_eq!(response.status, 200, "usage: {}", response.text());
        response.json()
    }

    /// Verified exchanges the control plane counted for `tenant` this month.
    pub fn vex_count(&self, tenant: &str) -> u64 {
        let usage = self.usage(tenant);
        usage["vex"]
            .as_u64()
            .unwrap_or_else(|| panic!("no VEx count in the usage answer: {usage}"))
    }

    /// Opens `POST path` with `headers` and sends only the first half of `body`, so that the
    /// request stays in flight inside Envoy; returns once Envoy has decoded its headers (the
    /// filter ran on them). [`HeldRequest::finish`] sends the rest.
    pub fn hold_request(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> HeldRequest {
        let active = [("envoy_http_conn_manager_prefix", "ingress")];
        let before = self
            .envoy
            .stats()
            .value("envoy_http_downstream_rq_active", &active);
        let mut stream =
            TcpStream::connect(("127.0.0.1", self.envoy.port)).expect("connect to Envoy");
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let (first, rest) = body.split_at(body.len() / 2);
        stream
            .write_all(head.as_bytes())
            .expect("send request headers");
        stream.write_all(first).expect("send half of the body");
        self.envoy
            .wait_for_stat("envoy_http_downstream_rq_active", &active, before + 1.0);
        HeldRequest {
            stream,
            rest: rest.to_vec(),
        }
    }

    pub fn jwks_url(&self) -> String {
        self.control_plane.url("/.well-known/jwks.json")
    }

    /// Runs the real `signet` CLI: `signet verify bundle <file> --jwks <url>`.
    pub fn verify_bundle_with_cli(&self, bundle: &[u8]) -> Output {
        let path = self
            .dir
            .path()
            .join(format!("bundle-{}.json", random_hex(4)));
        std::fs::write(&path, bundle).expect("write bundle");
        signet(&[
            "verify",
            "bundle",
            path.to_str().expect("utf-8 path"),
            "--jwks",
            &self.jwks_url(),
        ])
    }

    /// Envoy's, the control plane's and the upstream's logs, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- envoy ---\n{}\n--- control plane ---\n{}\n--- upstream ---\n{}",
            self.envoy.service.log_tail(),
            self.control_plane.service.log_tail(),
            self.upstream.log_tail()
        )
    }
}

/// A request whose body is not complete yet (see [`Stack::hold_request`]).
pub struct HeldRequest {
    stream: TcpStream,
    rest: Vec<u8>,
}

impl HeldRequest {
    /// Sends the rest of the body and reads the answer (Envoy closes the connection after it).
    pub fn finish(mut self) -> Response {
        self.stream
            .write_all(&self.rest)
            .expect("send the rest of the body");
        let mut raw = Vec::new();
        self.stream
            .read_to_end(&mut raw)
            .expect("read the response");
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no response head: {}", String::from_utf8_lossy(&raw)));
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line: {head}"));
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Response {
            status,
            headers,
            body: raw[split + 4..].to_vec(),
        }
    }
}

pub fn new_idempotency_key() -> String {
    format!("e2e-{}", random_hex(12))
}

/// Runs the `signet` CLI with `args`.
pub fn signet(args: &[&str]) -> Output {
    Command::new(binaries::signet_cli())
        .args(args)
        .output()
        .expect("run signet")
}

fn start_upstream(dir: &Path) -> (Service, u16) {
    let port = crate::ports::free_port();
    let mut command = Command::new(binaries::demo_upstream());
    command.arg(format!("127.0.0.1:{port}"));
    let mut service = Service::spawn("demo-upstream", command, &dir.join("upstream.log"));
    service.wait_until(std::time::Duration::from_secs(10), || {
        crate::process::accepts_connections(port)
    });
    (service, port)
}

/// Tenants of every stack: `demo` may forward to `*.example.com`; `other` exists to own traces
/// that `demo` must not extend.
pub fn api_keys() -> Value {
    json!({
        DEMO_KEY: {"tenant": DEMO_TENANT, "allowlist": ["*.example.com"]},
        OTHER_KEY: {"tenant": OTHER_TENANT, "allowlist": []},
    })
}

fn control_plane_env(
    key: &TestKey,
    filter_token: &str,
    dir: &Path,
    database: Option<&TestDatabase>,
) -> Vec<(String, String)> {
    let mut env = vec![
        ("SP_PRIVATE_KEY_B64".to_owned(), key.seed_b64url.clone()),
        ("SP_KID".to_owned(), key.kid.clone()),
        ("SP_FILTER_TOKEN".to_owned(), filter_token.to_owned()),
        ("SP_API_KEYS".to_owned(), api_keys().to_string()),
        ("SP_ADMIN_KEY".to_owned(), ADMIN_KEY.to_owned()),
    ];
    match database {
        None => {
            env.push(("SP_STORAGE".to_owned(), "sqlite".to_owned()));
            let path = dir.join("signet.db");
            env.push(("SP_DB_PATH".to_owned(), path.display().to_string()));
        }
        Some(database) => {
            env.push(("SP_STORAGE".to_owned(), "postgres".to_owned()));
            env.push(("SP_POSTGRES_URL".to_owned(), database.url()));
            // Many stacks share one server during `cargo test`.
            env.push(("SP_PG_POOL_SIZE".to_owned(), "4".to_owned()));
        }
    }
    env
}

/// What the filter reads through `host_env_keys`.
fn envoy_env(key: &TestKey, filter_token: &str) -> Vec<(String, String)> {
    vec![
        ("SP_PRIVATE_KEY_B64".to_owned(), key.seed_b64url.clone()),
        ("SP_KID".to_owned(), key.kid.clone()),
        ("SP_FILTER_TOKEN".to_owned(), filter_token.to_owned()),
    ]
}
