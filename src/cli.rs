//! The subcommands that run in the foreground: `serve`.

use std::path::Path;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;

pub async fn serve(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let mut handle = crate::server::start(config).await?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    handle.stop_accepting().await;
    Ok(())
}
