//! The cutover's own connections to source and target, as the backend's admin user.
//!
//! They carry the cutover's application_name, so that a proxy restarted after a
//! crash can end its predecessor's orphaned statements before undoing anything, and
//! preflight never counts them as sessions bypassing the proxy. The whole login is
//! bounded: a server that accepts and then says nothing times out. They use TLS as
//! the backend's sessions do (`tls`, `tls_ca`): the admin password and the fence's
//! statements never cross the network in clear where the sessions' would not.

use std::time::Duration;

use anyhow::Context;

use tokio_postgres::config::SslMode;

use crate::config::{BackendConfig, BackendTlsMode};

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
    let what = || format!("cannot connect to {}:{} database {db} as {} (tls = {})", b.host, b.port, b.admin_user, b.tls.as_str());
    let tls = crate::tls::client_tls(b.tls, b.tls_ca.as_deref()).with_context(what)?;
    // A Unix socket is never encrypted, by libpq or by the sessions.
    let tls = tls.filter(|_| !b.host.starts_with('/'));
    cfg.ssl_mode(match (&tls, b.tls) {
        (None, _) => SslMode::Disable,
        (Some(_), BackendTlsMode::Prefer) => SslMode::Prefer,
        (Some(_), _) => SslMode::Require,
    });
    let login = async {
        match tls {
            None => cfg.connect(tokio_postgres::NoTls).await.map(|(client, conn)| {
                tokio::spawn(drive(conn));
                client
            }),
            Some(config) => cfg.connect(super::control_tls::MakeRustls::new(config)).await.map(|(client, conn)| {
                tokio::spawn(drive(conn));
                client
            }),
        }
    };
    match tokio::time::timeout(bound * 2, login).await {
        Ok(r) => r.with_context(what),
        Err(_) => anyhow::bail!("{}: the server did not complete the login within {:?}", what(), bound * 2),
    }
}

/// Runs a control connection until it ends.
async fn drive<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(conn: F) {
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "control connection ended");
    }
}

/// A database error with its SQLSTATE and message (and the server's detail and
/// hint), or the transport error; for a missing privilege, what to do about it.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} ({})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                s.push_str(&format!("; {detail}"));
            }
            if let Some(hint) = db.hint() {
                s.push_str(&format!("; hint: {hint}"));
            }
            if db.code() == &tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE {
                s.push_str("; the admin user lacks a right this step needs: `pgcutover check` names the rights and the GRANTs that give them (docs/managed-services.md)");
            }
            s
        }
        None => e.to_string(),
    }
}
