//! The real `signet-control-plane` binary, configured through its environment
//! (control-plane/README.md).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::binaries;
use crate::http::Client;
use crate::process::Service;
use crate::prometheus::Metrics;

/// Where the control plane keeps receipts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Storage {
    /// A fresh SQLite file in the test's temp dir.
    Sqlite,
    /// A fresh database on the local PostgreSQL (127.0.0.1:5432, trust auth), dropped afterwards.
    Postgres,
}

/// The control plane's three listeners (control-plane/README.md): public (health, metrics,
/// JWKS, chains, exports), internal (the filter's callouts) and admin.
pub struct ControlPlane {
    pub port: u16,
    pub internal_port: u16,
    pub admin_port: u16,
    pub service: Service,
    env: Vec<(String, String)>,
    dir: std::path::PathBuf,
}

impl ControlPlane {
    /// Starts the control plane with `env` (the `SP_*` variables) on free ports and waits until
    /// it serves its JWKS and its other listeners accept connections.
    pub fn start(dir: &Path, env: Vec<(String, String)>) -> ControlPlane {
        let port = crate::ports::free_port();
        let internal_port = crate::ports::free_port();
        let admin_port = crate::ports::free_port();
        let mut env = env;
        env.push(("SP_INTERNAL_PORT".to_owned(), internal_port.to_string()));
        env.push(("SP_ADMIN_PORT".to_owned(), admin_port.to_string()));
        let service = Self::spawn(dir, port, &env);
        let mut control_plane = ControlPlane {
            port,
            internal_port,
            admin_port,
            service,
            env,
            dir: dir.to_path_buf(),
        };
        control_plane.wait_ready();
        control_plane
    }

    fn spawn(dir: &Path, port: u16, env: &[(String, String)]) -> Service {
        let mut command = Command::new(binaries::control_plane());
        command
            .current_dir(dir)
            .env("PORT", port.to_string())
            .env("SP_BIND", "127.0.0.1")
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)));
        Service::spawn(
            "signet-control-plane",
            command,
            &dir.join("control-plane.log"),
        )
    }

    fn wait_ready(&mut self) {
        let client = Client::new();
        let url = self.url("/.well-known/jwks.json");
        let ports = [self.port, self.internal_port, self.admin_port];
        self.service.wait_until(Duration::from_secs(20), || {
            ports
                .iter()
                .all(|&p| crate::process::accepts_connections(p))
                && client.get(&url, &[]).status == 200
        });
    }

    /// Stops the process (the port stays reserved for a restart).
    pub fn stop(&mut self) {
        self.service.stop();
    }

    /// Starts it again on the same ports and storage.
    pub fn restart(&mut self) {
        self.service.stop();
        self.service = Self::spawn(&self.dir, self.port, &self.env);
        self.wait_ready();
    }

    /// A URL of the public API.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// A URL of the admin API (`/v1/admin/*`).
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// A URL of the internal API (`/v1/internal/*`), the filter's.
    pub fn internal_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.internal_port)
    }

    pub fn metrics(&self) -> Metrics {
        let response = Client::new().get(&self.url("/metrics"), &[]);
        assert_eq!(response.status, 200, "{}", response.text());
        Metrics::parse(&response.text())
    }
}
