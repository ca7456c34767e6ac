//! The real binary killed with SIGKILL while it reports to Stripe, and started again: every
//! band's units reach Stripe exactly once, with the identifiers fixed before the kill.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::billing::*;
use common::fake_stripe::{FakeStripe, Faults};
use common::*;

both_backends!(a_kill_9_mid_report_loses_and_doubles_nothing);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Process(Child);

impl Process {
    /// SIGKILL: no shutdown, no flush, whatever it was doing.
    fn kill_9(mut self) {
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

/// Starts the binary on free ports and waits until it is healthy.
async fn spawn(db: &TestDb) -> (Process, Client) {
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
                break;
            }
            if let Ok(r) = client.http.get(client.url("/healthz")).send().await {
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                if body["storage"] == db.env["SP_STORAGE"].as_str() && body["status"] == "ok" {
                    return (process, client);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    panic!("the control plane did not come up");
}

async fn until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn a_kill_9_mid_report_loses_and_doubles_nothing(backend: Backend) {
    let stripe = FakeStripe::start().await;
    let fake = stripe.fake.clone();
    let mut db = TestDb::new(backend).await;
    let _openai = billing_env(&mut db, &stripe.base_url).await;
    let n = 1_000;

    // 1. Killed while Stripe has recorded an event and not answered.
    fake.set_faults(Faults {
        hang_after_record: true,
        ..Faults::default()
    });
    let (process, client) = spawn(&db).await;
    exchanges(&client, "acme", 0..n / 2).await;
    until("a send", Duration::from_secs(30), || {
        fake.counts(|c| c.hung) > 0
    })
    .await;
    process.kill_9();

    // 2. Killed again somewhere in the middle of reporting the rest, through failures.
    fake.set_faults(Faults {
        error_500: 0.1,
        drop_after_record: 0.2,
        ..Faults::default()
    });
    let (process, client) = spawn(&db).await;
    // counted from the restart: the reporter sends closed windows while the exchanges go on
    let recorded = fake.events().len();
    exchanges(&client, "acme", n / 2..n).await;
    until("progress", Duration::from_secs(60), || {
        fake.events().len() > recorded + 3
    })
    .await;
    process.kill_9();

    // 3. A last start finishes it.
    fake.set_faults(Faults::default());
    let (_process, client) = spawn(&db).await;
    let usage = settled(&client, "acme", Duration::from_secs(90)).await;
    assert_exact(&fake, &usage, n);
    assert!(
        fake.counts(|c| c.replays) >= 1,
        "the event recorded before the first kill was sent again with its key, answered from Stripe's cache"
    );
    drop(_process);
    db.cleanup().await;
}
