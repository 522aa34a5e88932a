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

pub async fn fence(src: &Client, roles: &[String], keep_pids: &[i32], admin_user: &str) -> anyhow::Result<Fence> {
    let mut f = Fence::default();
    src.batch_execute("SET default_transaction_read_only = off").await?;
    src.batch_execute("ALTER SYSTEM SET default_transaction_read_only = on").await.context("ALTER SYSTEM")?;
    f.read_only = true;
    src.batch_execute("SELECT pg_reload_conf()").await?;
    let rows = src
        .query("SELECT rolname::text FROM pg_roles WHERE rolname = ANY($1) AND rolcanlogin AND rolname <> $2", &[&roles, &admin_user])
        .await?;
    for row in rows {
        let role: String = row.get(0);
        src.batch_execute(&format!("ALTER ROLE {} NOLOGIN", crate::session::migrate::quote_ident(&role))).await?;
        f.roles.push(role);
    }
    f.terminated = src
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND usename = ANY($1) AND pid <> pg_backend_pid() AND NOT (pid = ANY($2))",
            &[&f.roles, &keep_pids],
        )
        .await?
        .get(0);
    Ok(f)
}

pub async fn unfence(src: &Client, f: &Fence) -> anyhow::Result<()> {
    for role in &f.roles {
        src.batch_execute(&format!("ALTER ROLE {} LOGIN", crate::session::migrate::quote_ident(role))).await?;
    }
    if f.read_only {
        src.batch_execute("ALTER SYSTEM RESET default_transaction_read_only").await?;
        src.batch_execute("SELECT pg_reload_conf()").await?;
        // Backends take the reload when the postmaster forwards the signal; give it
        // that moment before held sessions write again.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    Ok(())
}
