//! `signet-control-plane`: configuration from the environment (see README.md), then serve.

use std::process::ExitCode;

use signet_control_plane::config::Config;
use signet_control_plane::{api, server, ControlPlane};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::from_env()?;
    let (listeners, limits) = (config.listeners, config.limits);
    let storage = config.storage.kind();
    let kid = config.signing_key.kid().to_owned();
    let (keys, tenants) = (config.tenants.key_count(), config.tenants.tenant_count());
    let state = ControlPlane::start(config).await?;
    let routers = api::Routers::new(state);
    let apis = [
        ("public", listeners.public, routers.public),
        ("internal", listeners.internal, routers.internal),
        ("admin", listeners.admin, routers.admin),
    ];
    // Bind all three before serving any: a port taken stops the start.
    let mut bound = Vec::new();
    for (api, addr, router) in apis {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} ({api} API): {e}"))?;
        bound.push((listener, router));
    }
    tracing::info!(
        public = %listeners.public, internal = %listeners.internal, admin = %listeners.admin,
        storage, kid, api_keys = keys, tenants, "signet control plane started"
    );
    let (stop, stopped) = tokio::sync::watch::channel(());
    let servers: Vec<_> = bound
        .into_iter()
        .map(|(listener, router)| {
            let mut stopped = stopped.clone();
            tokio::spawn(server::serve(listener, router, limits, async move {
                let _ = stopped.changed().await;
            }))
        })
        .collect();
    shutdown_signal().await;
    let _ = stop.send(());
    for server in servers {
        server.await?;
    }
    tracing::info!("signet control plane stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
