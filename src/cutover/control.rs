//! The cutover's own connections to source and target, as the backend's admin user.

use std::time::Duration;

use anyhow::Context;

use crate::config::BackendConfig;

pub async fn connect(b: &BackendConfig, db: &str) -> anyhow::Result<tokio_postgres::Client> {
    let mut cfg = tokio_postgres::Config::new();
    if b.host.starts_with('/') {
        cfg.host_path(&b.host);
    } else {
        cfg.host(&b.host);
    }
    cfg.port(b.port).user(&b.admin_user).dbname(db).application_name("pgcutover").connect_timeout(b.connect_timeout.max(Duration::from_secs(1)));
    if let Some(p) = &b.admin_password {
        cfg.password(p);
    }
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.with_context(|| format!("cannot connect to {}:{} database {db} as {}", b.host, b.port, b.admin_user))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "control connection ended");
        }
    });
    Ok(client)
}
