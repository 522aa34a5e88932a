//! The cutover's own connections to source and target, as the backend's admin user.
//!
//! They carry the cutover's application_name, so that a proxy restarted after a
//! crash can end its predecessor's orphaned statements before undoing anything, and
//! preflight never counts them as sessions bypassing the proxy. The whole login is
//! bounded: a server that accepts and then says nothing times out.

use std::time::Duration;

use anyhow::Context;

use crate::config::BackendConfig;

/// The application_name of every control connection of the cutover `id`.
pub fn application_name(id: &str) -> String {
    format!("pgcutover cutover {id}")
}

pub async fn connect(b: &BackendConfig, db: &str, application_name: &str) -> anyhow::Result<tokio_postgres::Client> {
    let mut cfg = tokio_postgres::Config::new();
    if b.host.starts_with('/') {
        cfg.host_path(&b.host);
    } else {
        cfg.host(&b.host);
    }
    let bound = b.connect_timeout.max(Duration::from_secs(1));
    cfg.port(b.port).user(&b.admin_user).dbname(db).application_name(application_name).connect_timeout(bound);
    if let Some(p) = &b.admin_password {
        cfg.password(p);
    }
    let what = || format!("cannot connect to {}:{} database {db} as {}", b.host, b.port, b.admin_user);
    let (client, conn) = match tokio::time::timeout(bound * 2, cfg.connect(tokio_postgres::NoTls)).await {
        Ok(r) => r.with_context(what)?,
        Err(_) => anyhow::bail!("{}: the server did not complete the login within {:?}", what(), bound * 2),
    };
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "control connection ended");
        }
    });
    Ok(client)
}

/// A database error with its SQLSTATE and message, or the transport error.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}
