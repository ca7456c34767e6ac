//! Serves one API on one listener, with the limits that keep slow or many clients from
//! exhausting it (`SP_MAX_CONNECTIONS`, `SP_IDLE_TIMEOUT_SECS`; the request timeout is a layer
//! of the router, see `api`). HTTP/1.1 only, like the filter's callouts.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::Limits;

/// Accepts connections until `shutdown` completes, then lets open ones finish their request.
///
/// At most `limits.max_connections` connections are open at once: beyond that the listener
/// stops accepting and new clients wait in the kernel's backlog, so one flood cannot take the
/// memory or file descriptors of the others (each listener has its own limit). A connection
/// that takes longer than `limits.idle_timeout` to send a request's headers (from when it
/// opens or finished its previous request) is closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = accept(&listener, &slots) => accepted,
        };
        let Some((stream, slot)) = accepted else {
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // a client that goes away or times out ends its own connection, nothing more
            let _ = connection.await;
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The next connection once a slot is free. `None` after an accept error (e.g. out of file
/// descriptors), after a short pause so that the loop does not spin.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> Option<(tokio::net::TcpStream, tokio::sync::OwnedSemaphorePermit)> {
    let slot = slots.clone().acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((stream, _)) => Some((stream, slot)),
        Err(e) => {
            tracing::warn!("accept failed: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}
