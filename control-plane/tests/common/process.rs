//! The real binary as a child process on free loopback ports, for the restart tests.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Bases, Client, TestDb};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `signet-control-plane`; killed when dropped.
pub struct Process(pub Child);

impl Process {
    /// SIGKILL: no shutdown, no flush, whatever it was doing.
    pub fn kill_9(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary on free ports (public, internal, admin) and waits until it serves.
/// Another test may grab one of them between our probe and the bind; then the process exits
/// and we try other ports.
pub async fn spawn(db: &TestDb) -> (Process, Client) {
    let storage = db.env["SP_STORAGE"].clone();
    for _ in 0..5 {
        let ports = [free_port(), free_port(), free_port()];
        let mut process = Process(
            Command::new(env!("CARGO_BIN_EXE_signet-control-plane"))
                .env_clear()
                .envs(&db.env)
                .env("PORT", ports[0].to_string())
                .env("SP_INTERNAL_PORT", ports[1].to_string())
                .env("SP_ADMIN_PORT", ports[2].to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let base = |port: u16| format!("http://127.0.0.1:{port}");
        let client = Client::new(Bases {
            public: base(ports[0]),
            internal: base(ports[1]),
            admin: base(ports[2]),
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if process.0.try_wait().unwrap().is_some() {
                break; // did not start (port taken): next port
            }
            let health = client.http.get(client.url("/healthz")).send().await;
            if let Ok(health) = health {
                let body: serde_json::Value = health.json().await.unwrap_or_default();
                // The storage kind tells our instance from another test's on a reused port.
                if body["storage"] == storage.as_str() && body["status"] == "ok" {
                    return (process, client);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    panic!("the control plane did not come up");
}
