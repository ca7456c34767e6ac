//! One PostgreSQL database per test, so that parallel tests and repeated runs never share rows.

use std::sync::atomic::{AtomicU32, Ordering};

/// The server `make test` expects (trust auth).
pub const SERVER: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";

pub struct TestDatabase {
    pub name: String,
}

impl TestDatabase {
    pub fn create() -> TestDatabase {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "signet_e2e_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            crate::random_hex(4)
        );
        admin()
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("create database {name} on {SERVER}: {e}"));
        TestDatabase { name }
    }

    /// A libpq URL for the control plane's `SP_POSTGRES_URL`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:5432/{}", self.name)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // FORCE closes the pool of a control plane that is still shutting down.
        if let Ok(mut client) = std::panic::catch_unwind(admin) {
            let _ = client.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

fn admin() -> postgres::Client {
    postgres::Client::connect(SERVER, postgres::NoTls).unwrap_or_else(|e| {
        panic!("PostgreSQL at {SERVER} is needed for the PostgreSQL end-to-end tests: {e}")
    })
}
