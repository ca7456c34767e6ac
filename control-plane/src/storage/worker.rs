//! Liveness of a backend's background threads and tasks (the SQLite writer, the PostgreSQL
//! commit batcher, the retention sweep): a worker that ends while its storage is in use turns
//! `ping`, hence `/healthz`, red with the reason, instead of leaving a green service that
//! cannot commit.

use std::sync::{Arc, Mutex};

use super::StoreError;

/// What a storage knows of one worker; [`Worker::start`] gives the [`Alive`] the worker holds.
#[derive(Debug, Clone)]
pub(crate) struct Worker {
    name: &'static str,
    /// `Some(reason)` once the worker has ended.
    ended: Arc<Mutex<Option<String>>>,
}

/// Held by the worker for as long as it runs: dropping it (a return or a panic) marks the
/// worker ended.
pub(crate) struct Alive(Worker);

impl Worker {
    pub fn start(name: &'static str) -> (Worker, Alive) {
        let worker = Worker {
            name,
            ended: Arc::default(),
        };
        (worker.clone(), Alive(worker))
    }

    /// `Err` naming the worker and why it ended.
    pub fn check(&self) -> Result<(), StoreError> {
        match &*self.ended.lock().unwrap_or_else(|e| e.into_inner()) {
            None => Ok(()),
            Some(reason) => Err(StoreError::Database(format!("{} {reason}", self.name))),
        }
    }
}

/// Every worker of a storage, checked at each `ping`.
pub(crate) fn check_all(workers: &[Worker]) -> Result<(), StoreError> {
    workers.iter().try_for_each(Worker::check)
}

impl Drop for Alive {
    fn drop(&mut self) {
        let reason = if std::thread::panicking() {
            tracing::error!("{} panicked", self.0.name);
            "panicked"
        } else {
            // also the normal end, when the storage is dropped
            tracing::debug!("{} stopped", self.0.name);
            "stopped"
        };
        *self.0.ended.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_owned());
    }
}

/// What a caught panic says, for the error it becomes.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::storage::Storage;
    use crate::ControlPlane;

    /// The service with `storage` in place of its own, served on a loopback port: its base URL.
    /// `env` configures it (SQLite in `dir` unless `env` says otherwise).
    pub async fn serve(
        storage: std::sync::Arc<dyn Storage>,
        dir: &std::path::Path,
        env: &[(&str, &str)],
    ) -> String {
        let db_path = dir.join("service.db").to_string_lossy().into_owned();
        let mut vars = vec![
            (
                "SP_PRIVATE_KEY_B64",
                "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",
            ),
            ("SP_KID", "test-k1"),
            ("SP_FILTER_TOKEN", "filter-token-for-tests-0123456789"),
            (
                "SP_API_KEYS",
                r#"{"demo-key":{"tenant":"demo","allowlist":[]}}"#,
            ),
            ("SP_STORAGE", "sqlite"),
            ("SP_DB_PATH", &db_path),
        ];
        vars.extend_from_slice(env);
        let lookup = |name: &str| {
            let value = vars.iter().rev().find(|(n, _)| *n == name);
            value.map(|(_, v)| v.to_string())
        };
        let config = crate::config::Config::from_lookup(lookup).unwrap();
        let cp = ControlPlane::start(config).await.unwrap();
        let cp = std::sync::Arc::try_unwrap(cp).ok().unwrap();
        let cp = std::sync::Arc::new(ControlPlane { storage, ..cp });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(
            async move { axum::serve(listener, crate::api::Routers::new(cp).public).await },
        );
        base
    }

    async fn healthz(base: &str) -> (u16, serde_json::Value) {
        let r = reqwest::get(format!("{base}/healthz")).await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_sqlite_writer_turns_healthz_red() {
        let dir = tempfile::tempdir().unwrap();
        let storage = std::sync::Arc::new(
            crate::storage::SqliteStorage::open(&dir.path().join("t.db")).unwrap(),
        );
        let base = serve(storage.clone(), dir.path(), &[]).await;
        assert_eq!(healthz(&base).await.0, 200);
        storage.kill_writer();
        let (status, body) = healthz(&base).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(
            body["reason"],
            "database error: the SQLite writer thread panicked"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_postgres_batcher_turns_healthz_red() {
        let (admin, schema, url) =
            crate::storage::postgres::tests::fresh_schema("cp_unit_health").await;
        let mut storage = crate::storage::PostgresStorage::connect(&url, 2)
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        storage.stop_batcher().await;
        let base = serve(std::sync::Arc::new(storage), dir.path(), &[]).await;
        let (status, body) = healthz(&base).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(
            body["reason"],
            "database error: the PostgreSQL commit batcher stopped"
        );
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    }

    #[test]
    fn a_worker_that_panics_or_returns_is_reported_ended() {
        let (running, alive) = Worker::start("the test worker");
        assert_eq!(check_all(std::slice::from_ref(&running)), Ok(()));
        let _ = std::thread::spawn(move || {
            let _alive = alive;
            panic!("boom");
        })
        .join();
        assert_eq!(
            running.check(),
            Err(StoreError::Database("the test worker panicked".into()))
        );
        let (stopped, alive) = Worker::start("another");
        drop(alive);
        assert_eq!(
            check_all(&[stopped]),
            Err(StoreError::Database("another stopped".into()))
        );
    }
}
