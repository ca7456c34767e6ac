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

pub struct ControlPlane {
    pub port: u16,
    pub service: Service,
    env: Vec<(String, String)>,
    dir: std::path::PathBuf,
}

impl ControlPlane {
    /// Starts the control plane with `env` (the `SP_*` variables) on a free port and waits until
    /// it serves its JWKS.
    pub fn start(dir: &Path, env: Vec<(String, String)>) -> ControlPlane {
        let port = crate::ports::free_port();
        let service = Self::spawn(dir, port, &env);
        let mut control_plane = ControlPlane {
            port,
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
        let port = self.port;
        self.service.wait_until(Duration::from_secs(20), || {
            crate::process::accepts_connections(port) && client.get(&url, &[]).status == 200
        });
    }

    /// Stops the process (the port stays reserved for a restart).
    pub fn stop(&mut self) {
        self.service.stop();
    }

    /// Starts it again on the same port and storage.
    pub fn restart(&mut self) {
        self.service.stop();
        self.service = Self::spawn(&self.dir, self.port, &self.env);
        self.wait_ready();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn metrics(&self) -> Metrics {
        let response = Client::new().get(&self.url("/metrics"), &[]);
        assert_eq!(response.status, 200, "{}", response.text());
        Metrics::parse(&response.text())
    }
}
