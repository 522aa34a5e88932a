//! Fencing the source: no write may land there any more.
//!
//! `default_transaction_read_only` (ALTER SYSTEM + reload) makes existing sessions
//! fail on their next write; a session could undo that with SET, so the
//! application roles also lose LOGIN and their remaining client backends that did
//! not come through the proxy are terminated (never the walsender). Rollback undoes
//! all of it.

use std::time::Duration;

use anyhow::Context;
use tokio_postgres::Client;

/// What a fence changed, so that it can be undone exactly.
#[derive(Debug, Default)]
pub struct Fence {
    pub read_only: bool,
    pub roles: Vec<String>,
    pub terminated: i64,
}

/// Reloads the server's configuration and returns once every backend will have
/// reloaded before its next command.
///
/// `pg_conf_load_time()` is when *this* backend last loaded the files; it changes
/// on our next command only after the postmaster has re-read them and signalled
/// every child, so from then on no backend runs a command under the old settings.
pub async fn reload(c: &Client) -> anyhow::Result<()> {
    let before = start_reload(c).await?;
    reloaded(c, &before).await
}

/// Asks for a reload; returns the load time to wait past.
async fn start_reload(c: &Client) -> anyhow::Result<String> {
    let before: String = c.query_one("SELECT pg_conf_load_time()::text", &[]).await?.get(0);
    c.batch_execute("SELECT pg_reload_conf()").await?;
    Ok(before)
}

/// Waits until this backend has reloaded since `before` (see [`reload`]).
async fn reloaded(c: &Client, before: &str) -> anyhow::Result<()> {
    for _ in 0..5000 {
        let now: String = c.query_one("SELECT pg_conf_load_time()::text", &[]).await?.get(0);
        if now != *before {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    anyhow::bail!("the server did not reload its configuration within 5 s")
}

pub async fn fence(src: &Client, roles: &[String], keep_pids: &[i32], admin_user: &str) -> anyhow::Result<Fence> {
    let mut f = Fence::default();
    src.batch_execute("SET default_transaction_read_only = off").await?;
    src.batch_execute("ALTER SYSTEM SET default_transaction_read_only = on").await.context("ALTER SYSTEM")?;
    f.read_only = true;
    // The postmaster reloads while the roles are changed; the fence is complete
    // only once it has (checked at the end).
    let before = start_reload(src).await?;
    let rows = src
        .query("SELECT rolname::text FROM pg_roles WHERE rolname = ANY($1) AND rolcanlogin AND rolname <> $2", &[&roles, &admin_user])
        .await?;
    // One round trip for every role (ALTER ROLE is transactional: all or none).
    f.roles = rows.iter().map(|r| r.get::<_, String>(0)).collect();
    let sql: String = f.roles.iter().map(|r| format!("ALTER ROLE {} NOLOGIN;", crate::session::migrate::quote_ident(r))).collect();
    if !sql.is_empty() {
        if let Err(e) = src.batch_execute(&sql).await {
            f.roles.clear();
            return Err(e.into());
        }
    }
    f.terminated = src
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND usename = ANY($1) AND pid <> pg_backend_pid() AND NOT (pid = ANY($2))",
            &[&f.roles, &keep_pids],
        )
        .await?
        .get(0);
    reloaded(src, &before).await?;
    Ok(f)
}

pub async fn unfence(src: &Client, f: &Fence) -> anyhow::Result<()> {
    let sql: String = f.roles.iter().map(|r| format!("ALTER ROLE {} LOGIN;", crate::session::migrate::quote_ident(r))).collect();
    if !sql.is_empty() {
        src.batch_execute(&sql).await?;
    }
    if f.read_only {
        src.batch_execute("ALTER SYSTEM RESET default_transaction_read_only").await?;
        // Held sessions write again as soon as the gate opens.
        reload(src).await?;
    }
    Ok(())
}
