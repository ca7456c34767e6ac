//! The real binary killed with SIGKILL while it reports to Stripe, and started again: every
//! band's units reach Stripe exactly once, with the identifiers fixed before the kill.

mod common;

use std::time::{Duration, Instant};

use common::billing::*;
use common::fake_stripe::{FakeStripe, Faults};
use common::process::spawn;
use common::*;

both_backends!(a_kill_9_mid_report_loses_and_doubles_nothing);

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
