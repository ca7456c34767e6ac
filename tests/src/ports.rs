//! Free loopback ports for the many stacks that tests start in parallel.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::{Mutex, OnceLock};

/// A port that was free a moment ago and that this process has not handed out before. The kernel
/// does not reuse a just-released ephemeral port soon, and the set rules out collisions between
/// the tests of one binary (cargo runs test binaries one after the other).
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("bind an ephemeral port")
            .port();
        if given.lock().expect("port set").insert(port) {
            return port;
        }
    }
}
