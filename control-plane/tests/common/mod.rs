//! Test harness: a control plane on a real database (SQLite in a temp dir, or PostgreSQL at
//! 127.0.0.1:5432 in a schema of its own), served on a loopback port, and a client that
//! plays the filter.

#![allow(dead_code)]

pub mod billing;
pub mod fake_openai;
pub mod fake_stripe;
pub mod process;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use signet_control_plane::config::Config;
use signet_control_plane::{api, ControlPlane};
use signet_protocol::keys::SigningKey;
use signet_protocol::receipt::{self, Policy, ReceiptDraft};

pub const SEED: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8";
pub const KID: &str = "test-k1";
pub const OTHER_SEED: &str = "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1-f4CBgoM";
pub const FILTER_TOKEN: &str = "filter-token-for-tests-0123456789";
pub const ADMIN_KEY: &str = "admin-key-for-tests-0123456789";
pub const DEMO_KEY: &str = "demo-key";
pub const OTHER_KEY: &str = "other-key";
pub const PG_BASE: &str = "postgres://postgres@127.0.0.1:5432/test";

pub fn api_keys_json() -> String {
    json!({
        DEMO_KEY: {"tenant": "demo", "allowlist": ["*.example.com"], "fallback_enabled": false,
                   "stripe_item_vex": "si_vex", "stripe_item_fu": "si_fu"},
        OTHER_KEY: {"tenant": "other", "allowlist": []},
    })
    .to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh database: its own temp dir or PostgreSQL schema.
pub struct TestDb {
    pub backend: Backend,
    pub env: HashMap<String, String>,
    schema: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TestDb {
    pub async fn new(backend: Backend) -> Self {
        let mut env: HashMap<String, String> = [
            ("SP_PRIVATE_KEY_B64", SEED),
            ("SP_KID", KID),
            ("SP_FILTER_TOKEN", FILTER_TOKEN),
            ("SP_ADMIN_KEY", ADMIN_KEY),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        env.insert("SP_API_KEYS".into(), api_keys_json());
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                env.insert("SP_STORAGE".into(), "sqlite".into());
                env.insert(
                    "SP_DB_PATH".into(),
                    dir.path()
                        .join("data/signet.db")
                        .to_string_lossy()
                        .into_owned(),
                );
                TestDb {
                    backend,
                    env,
                    schema: None,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .subsec_nanos();
                let schema = format!(
                    "cp_test_{}_{}_{}",
                    std::process::id(),
                    COUNTER.fetch_add(1, Ordering::Relaxed),
                    nanos
                );
                admin_sql(&format!("CREATE SCHEMA {schema}")).await;
                env.insert("SP_STORAGE".into(), "postgres".into());
                env.insert(
                    "SP_POSTGRES_URL".into(),
                    format!("{PG_BASE}?options=-csearch_path%3D{schema}"),
                );
                TestDb {
                    backend,
                    env,
                    schema: Some(schema),
                    _dir: None,
                }
            }
        }
    }

    pub fn set(&mut self, name: &str, value: &str) {
        self.env.insert(name.into(), value.into());
    }

    pub fn config(&self) -> Config {
        Config::from_lookup(|name| self.env.get(name).cloned()).expect("valid test config")
    }

    /// Drops the PostgreSQL schema (the SQLite temp dir goes with `self`).
    pub async fn cleanup(self) {
        if let Some(schema) = &self.schema {
            admin_sql(&format!("DROP SCHEMA {schema} CASCADE")).await;
        }
    }
}

async fn admin_sql(sql: &str) {
    let (client, conn) = tokio_postgres::connect(PG_BASE, tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL at 127.0.0.1:5432 (trust auth, database test)");
    let task = tokio::spawn(conn);
    client.batch_execute(sql).await.unwrap();
    drop(client);
    let _ = task.await;
}

/// The service on three loopback ports (public, internal, admin), in this process.
pub struct Server {
    pub client: Client,
    pub cp: Arc<ControlPlane>,
    stop: Option<tokio::sync::watch::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::ops::Deref for Server {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

/// Plays the filter (and the operator) against a control plane: each path goes to the
/// listener of its API ([`Client::url`]).
pub struct Client {
    pub bases: Bases,
    pub http: reqwest::Client,
}

/// `http://host:port` of each API.
#[derive(Clone, Debug)]
pub struct Bases {
    pub public: String,
    pub internal: String,
    pub admin: String,
}

impl Server {
    pub async fn start(db: &TestDb) -> Server {
        Self::start_with(db, |_| {}).await
    }

    /// With the configuration changed by `edit` first (e.g. its limits).
    pub async fn start_with(db: &TestDb, edit: impl FnOnce(&mut Config)) -> Server {
        let mut config = db.config();
        edit(&mut config);
        let limits = config.limits;
        let cp = ControlPlane::start(config)
            .await
            .expect("control plane starts");
        let routers = api::Routers::new(cp.clone());
        let (stop, stopped) = tokio::sync::watch::channel(());
        let mut bases = Vec::new();
        let mut tasks = Vec::new();
        for router in [routers.public, routers.internal, routers.admin] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            bases.push(format!("http://{}", listener.local_addr().unwrap()));
            let mut stopped = stopped.clone();
            tasks.push(tokio::spawn(signet_control_plane::server::serve(
                listener,
                router,
                limits,
                async move {
                    let _ = stopped.changed().await;
                },
            )));
        }
        let [public, internal, admin] = <[String; 3]>::try_from(bases).unwrap();
        Server {
            client: Client::new(Bases {
                public,
                internal,
                admin,
            }),
            cp,
            stop: Some(stop),
            tasks,
        }
    }

    /// Stops serving and releases the storage.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        for task in self.tasks.drain(..) {
            task.await.unwrap();
        }
    }
}

impl Client {
    pub fn new(bases: Bases) -> Client {
        Client {
            bases,
            http: reqwest::Client::new(),
        }
    }

    /// The URL of `path` on the listener of its API: `/v1/internal/*` on the internal one,
    /// `/v1/admin/*` on the admin one, everything else on the public one.
    pub fn url(&self, path: &str) -> String {
        let base = if path.starts_with("/v1/internal/") {
            &self.bases.internal
        } else if path.starts_with("/v1/admin/") {
            &self.bases.admin
        } else {
            &self.bases.public
        };
        format!("{base}{path}")
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Reply {
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn internal(&self, call: &str, body: &Value) -> Reply {
        self.send(
            self.http
                .post(self.url(&format!("/v1/internal/{call}")))
                .header("X-SIGNET-Filter-Token", FILTER_TOKEN)
                .json(body),
        )
        .await
    }

    pub async fn commit(
        &self,
        tenant: &str,
        key: &str,
        fp: &str,
        receipt: &Value,
        fu: u64,
    ) -> Reply {
        let commit = json!({"tenant": tenant, "idempotency_key": key, "fingerprint": fp,
                "receipt": receipt, "response": response_for(receipt), "fu_tokens": fu});
        let batch = self
            .internal("commits", &json!({ "commits": [commit] }))
            .await;
        // a batch of one: its only result is the commit's answer
        assert_eq!(batch.status, 200, "{}", batch.body);
        let result = &batch.body["results"][0];
        Reply {
            status: result["status"].as_u64().unwrap() as u16,
            headers: batch.headers,
            body: result["body"].clone(),
        }
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = self.http.get(self.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req).await
    }

    pub async fn get_text(&self, path: &str) -> String {
        self.http
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn usage(&self, tenant: &str) -> Value {
        let r = self
            .get(
                &format!("/v1/admin/usage/{tenant}"),
                &[("X-SIGNET-Admin-Key", ADMIN_KEY)],
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.body
    }

    /// The filter's exchange on a trace this worker has not seen: sign hop 1, commit, and on a
    /// 409 `CHAIN_CONFLICT` that names a head re-sign on it and commit once more (same key,
    /// same fingerprint). `fu` tokens.
    pub async fn exchange(&self, tenant: &str, key: &str, trace_id: &str, fu: u64) -> Reply {
        let fp = fingerprint(key.as_bytes());
        let receipt = sign_receipt(&signing_key(), trace_id, 1, None, tenant);
        let first = self.commit(tenant, key, &fp, &receipt, fu).await;
        let head = &first.body["head"];
        if first.status != 409 || first.body["code"] != "CHAIN_CONFLICT" || head.is_null() {
            return first;
        }
        let receipt = sign_receipt(
            &signing_key(),
            trace_id,
            head["hop"].as_u64().unwrap() + 1,
            head["receipt_hash"].as_str(),
            tenant,
        );
        self.commit(tenant, key, &fp, &receipt, fu).await
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub fn signing_key() -> SigningKey {
    SigningKey::from_seed_b64url(SEED, KID).unwrap()
}

pub fn fingerprint(body: &[u8]) -> String {
    signet_protocol::cid::cid(body)
}

pub fn sign_receipt(
    key: &SigningKey,
    trace_id: &str,
    hop: u64,
    prev: Option<&str>,
    tenant: &str,
) -> Value {
    sign_receipt_at(key, trace_id, hop, prev, tenant, ts_base() + hop)
}

/// A receipt's `ts` near now (the control plane refuses one beyond `SP_RECEIPT_MAX_SKEW_SECS`).
pub fn ts_base() -> u64 {
    signet_control_plane::now_ms() as u64
}

/// A receipt with its `ts` at `unix_ms` (two signers of one hop differ in their ts).
pub fn sign_receipt_at(
    key: &SigningKey,
    trace_id: &str,
    hop: u64,
    prev: Option<&str>,
    tenant: &str,
    unix_ms: u64,
) -> Value {
    let payload = json!({"hop": hop, "trace": trace_id});
    let canon =
        signet_protocol::canonical::to_canonical(&payload, signet_protocol::Profile::Signet)
            .unwrap();
    let draft = ReceiptDraft {
        trace_id: trace_id.into(),
        hop,
        ts: signet_protocol::time::rfc3339_millis(unix_ms),
        tenant: tenant.into(),
        cid: signet_protocol::cid::cid(canon.as_bytes()),
        canon: Some(canon),
        prev_receipt_hash: prev.map(String::from),
        policy: Policy {
            engine: "HEL".into(),
            allowed: true,
            reason: "no_forward".into(),
        },
        extensions: Default::default(),
    };
    Value::Object(receipt::sign(&draft, key).unwrap())
}

/// The 200 body the filter would store for this receipt (SPEC §4 shape).
pub fn response_for(receipt: &Value) -> Value {
    json!({
        "trace_id": receipt["trace_id"],
        "normalized": {"ok": true},
        "policy": receipt["policy"],
        "receipt": {
            "ts": receipt["ts"], "cid": receipt["cid"], "receipt_hash": receipt["receipt_hash"],
            "prev_receipt_hash": receipt["prev_receipt_hash"], "hop": receipt["hop"],
            "kid": receipt["kid"], "sig": receipt["sig"],
        },
    })
}

/// Runs an async test body once per backend.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name($crate::common::Backend::Sqlite).await }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name($crate::common::Backend::Postgres).await }
            )*
        }
    };
}
