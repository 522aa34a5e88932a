//! The admin console: the PostgreSQL protocol on the proxy's own socket, database
//! `pgcutover`, so that `psql -h <socket_dir> -p <port> -d pgcutover` works as it
//! does for PgBouncer. Simple queries only; each command answers with a result set
//! or an ERROR, and the console session goes on either way.

mod backends;
mod fleet;
pub mod command;
mod pause;
mod reload;
mod resultset;
mod sessions;
mod stats;
mod status;

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::net::Stream;
use crate::protocol::read::{read_message, take_cstr, ReadError};
use crate::protocol::startup::{CancelKey, StartupMessage};
use crate::protocol::{sqlstate, write, PgError};
use crate::server::Proxy;
use command::{Command, Show};
pub use resultset::ResultSet;

/// The database name that reaches the console instead of a backend.
pub const DATABASE: &str = "pgcutover";
const MESSAGE_LIMIT: u32 = 1024 * 1024;

pub async fn serve(proxy: Arc<Proxy>, mut stream: Stream, startup: StartupMessage) {
    let mut out = BytesMut::new();
    let app = startup.get("application_name").unwrap_or_default().to_owned();
    for (name, value) in [
        ("server_version", "15.0 (pgcutover admin console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", app.as_str()),
    ] {
        write::parameter_status(&mut out, name, value);
    }
    write::backend_key_data(&mut out, CancelKey { pid: 0, secret: 0 });
    write::ready_for_query(&mut out, b'I');
    if stream.write_all(&out).await.is_err() {
        return;
    }
    let mut skipping_to_sync = false;
    loop {
        out.clear();
        let (tag, mut body) = match read_message(&mut stream, MESSAGE_LIMIT).await {
            Ok(m) => m,
            Err(ReadError::Protocol(p)) => {
                crate::session::fail(&mut stream, &p).await;
                return;
            }
            Err(_) => return,
        };
        match tag {
            b'Q' => {
                let sql = take_cstr(&mut body).unwrap_or_default();
                match execute(&proxy, &sql).await {
                    Ok(rs) => rs.encode(&mut out),
                    Err(e) => write::error_response(&mut out, &e),
                }
                write::ready_for_query(&mut out, b'I');
            }
            b'X' => return,
            b'S' => {
                skipping_to_sync = false;
                write::ready_for_query(&mut out, b'I');
            }
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'F' => {
                if !skipping_to_sync {
                    skipping_to_sync = true;
                    write::error_response(&mut out, &PgError::error(sqlstate::FEATURE_NOT_SUPPORTED, "the admin console accepts simple queries only"));
                }
            }
            other => {
                let e = PgError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("unexpected message type {:?}", other as char));
                crate::session::fail(&mut stream, &e).await;
                return;
            }
        }
        if !out.is_empty() && stream.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// Runs one console command.
pub async fn execute(proxy: &Arc<Proxy>, sql: &str) -> Result<ResultSet, PgError> {
    let command = command::parse(sql).map_err(|e| PgError::error(sqlstate::SYNTAX_ERROR, e.0))?;
    tracing::info!(command = sql.trim(), "admin command");
    match command {
        Command::Show(Show::Status) => Ok(status::show(proxy)),
        Command::Show(Show::Sessions) => Ok(sessions::show(proxy)),
        Command::Show(Show::Backends) => Ok(backends::show(proxy)),
        Command::Show(Show::Stats) => Ok(stats::show(proxy)),
        Command::Show(Show::Fleet) => Ok(fleet::show(proxy)),
        Command::Pause(timeout) => pause::pause(proxy, timeout).await,
        Command::Resume => pause::resume(proxy),
        Command::Reload => reload::reload(proxy).await,
        Command::Show(Show::Cutover) => Ok(match proxy.cutover.last_report() {
            Some(r) => ResultSet::key_values(r.pairs()),
            None => ResultSet::key_values(Vec::<(String, String)>::new()),
        }),
        Command::Cutover { target, force, rehearse } => {
            let report = crate::cutover::run(proxy, crate::cutover::Options { to: target, force, rehearse, follow: None }).await;
            Ok(ResultSet::key_values(report.pairs()).tag("CUTOVER"))
        }
        Command::Check { target, force } => {
            let checks = crate::cutover::check(proxy, target.as_deref()).await.map_err(|e| PgError::error(sqlstate::CONNECTION_FAILURE, format!("{e:#}")))?;
            let mut rs = ResultSet::new(&["check", "status", "detail"]);
            for c in checks {
                let status = if c.ok && c.detail.starts_with("note: ") {
                    "note"
                } else if c.ok {
                    "ok"
                } else if c.guards_data || !force {
                    "fail"
                } else {
                    "skipped (--force)"
                };
                rs.row(vec![Some(c.name), Some(status.into()), Some(c.detail)]);
            }
            Ok(rs.tag("CHECK"))
        }
    }
}
