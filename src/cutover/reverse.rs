//! The way back: with `[cutover] reverse_replication = true`, every write made on
//! the new database after the switch flows back to the old one, so that a cutover
//! back loses nothing.
//!
//! - Before the pause, a publication on the target of the tables the forward
//!   subscriptions replicate. It must exist before the slot: pgoutput looks
//!   publications up as of each decoded change, and a change decoded before its
//!   publication existed is an error the subscriber retries forever.
//! - Inside the pause, after catch-up (the source is fenced and the target has
//!   applied everything, and no client writes reach the target yet), a logical
//!   slot on the target: its consistent point is the switch point. Creating it
//!   waits for transactions running on the target to end, within max_pause.
//! - After resume, a subscription on the source that uses that slot, with no
//!   initial copy. The source stays fenced: an apply worker writes regardless of
//!   `default_transaction_read_only`, and it logs in as the admin user, whose
//!   LOGIN the fence never takes.
//!
//! The publication and the slot are journaled before they are made, and a rollback
//! drops them. The subscription is made after the point of no return; one that
//! cannot be made is reported with the statement that would make it.

use tokio_postgres::Client;

use super::journal::{Entry, Journal};
use super::preflight::Check;
use super::CutoverError;
use crate::config::{BackendConfig, BackendTlsMode};
use crate::session::migrate::{quote_ident, quote_literal};

/// The names of one database's way back: the publication on the target and the
/// subscription on the source share `name`, the slot on the target too (slot
/// names are cluster-wide, so each database of a cutover has its own).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reverse {
    pub database: String,
    pub name: String,
}

impl Reverse {
    pub fn new(cutover_id: &str, index: usize, database: &str) -> Reverse {
        let id: String = cutover_id.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
        Reverse { database: database.into(), name: format!("pgcutover_back_{id}_{index}") }
    }
}

/// The tables the forward subscriptions replicate into the target's database.
pub async fn tables(dst: &Client, subscriptions: &[u32]) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = dst
        .query(
            "SELECT DISTINCT format('%I.%I', n.nspname, c.relname) FROM pg_subscription_rel r \
             JOIN pg_class c ON c.oid = r.srrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE r.srsubid = ANY($1) ORDER BY 1",
            &[&subscriptions],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// What the way back needs, checked before anything is touched: logical WAL, a free
/// slot and walsender on the target, replication rights there, and on the source
/// a superuser (CREATE SUBSCRIPTION) and a free apply worker.
pub async fn check(db: &str, src: &Client, dst: &Client, tables: &[String]) -> Result<Vec<Check>, tokio_postgres::Error> {
    let mut missing = Vec::new();
    let row = dst
        .query_one(
            "SELECT current_setting('wal_level'), \
                    current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)::int, \
                    current_setting('max_wal_senders')::int - (SELECT count(*) FROM pg_stat_replication)::int, \
                    (SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user)",
            &[],
        )
        .await?;
    let (wal_level, slots, senders, replication): (String, i32, i32, bool) = (row.get(0), row.get(1), row.get(2), row.get(3));
    if wal_level != "logical" {
        missing.push(format!("the target's wal_level is {wal_level}, not logical (a restart is needed to change it)"));
    }
    if slots < 1 {
        missing.push("the target has no free replication slot (max_replication_slots)".to_string());
    }
    if senders < 1 {
        missing.push("the target has no free walsender (max_wal_senders)".to_string());
    }
    if !replication {
        missing.push("the target's admin user has neither SUPERUSER nor REPLICATION".to_string());
    }
    if tables.is_empty() {
        missing.push("the forward subscriptions replicate no table".to_string());
    }
    let row = src
        .query_one(
            "SELECT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user), \
                    current_setting('max_logical_replication_workers')::int - (SELECT count(*) FROM pg_stat_subscription)::int, \
                    current_setting('server_version_num')::int, \
                    EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pg_create_subscription' AND pg_has_role(current_user, oid, 'MEMBER')), \
                    has_database_privilege(current_database(), 'CREATE')",
            &[],
        )
        .await?;
    let (superuser, workers, version, may_subscribe, may_create): (bool, i32, i32, bool, bool) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    // CREATE SUBSCRIPTION: a superuser before PostgreSQL 16; from 16 on, a member
    // of pg_create_subscription with CREATE on the database (the connection to the
    // target then needs a password, which the way back's connection carries).
    if !superuser && version < 160000 {
        missing.push("the source's admin user is not a superuser, and PostgreSQL before 16 lets only superusers CREATE SUBSCRIPTION (a managed service's own way back, or reverse_replication = false)".to_string());
    } else if !superuser && !may_subscribe {
        missing.push("the source's admin user may not CREATE SUBSCRIPTION: GRANT pg_create_subscription TO it".to_string());
    } else if !superuser && !may_create {
        missing.push("the source's admin user lacks CREATE on the database, which CREATE SUBSCRIPTION needs: GRANT CREATE ON DATABASE to it".to_string());
    }
    if workers < 1 {
        missing.push("the source has no free logical replication worker (max_logical_replication_workers)".to_string());
    }
    let problem = (!missing.is_empty()).then(|| missing.join("; "));
    Ok(vec![Check::new(format!("{db}: reverse replication possible (target → source after the switch)"), true, problem)])
}

fn journal_err(e: std::io::Error) -> CutoverError {
    CutoverError::Journal(e.to_string())
}

/// Creates the publication on the target (before the pause).
pub async fn publish(dst: &Client, r: &Reverse, tables: &[String], journal: &mut Journal) -> Result<(), CutoverError> {
    journal.record(Entry::ReversePublication { database: r.database.clone(), name: r.name.clone() }).await.map_err(journal_err)?;
    dst.batch_execute(&format!("SET default_transaction_read_only = off; CREATE PUBLICATION {} FOR TABLE {}", quote_ident(&r.name), tables.join(", "))).await?;
    Ok(())
}

/// Creates the slot on the target at the switch point (inside the pause, after
/// catch-up); returns its consistent point.
pub async fn slot(dst: &Client, r: &Reverse, journal: &mut Journal) -> Result<String, CutoverError> {
    journal.record(Entry::ReverseSlot { database: r.database.clone(), name: r.name.clone() }).await.map_err(journal_err)?;
    let row = dst.query_one("SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')", &[&r.name]).await?;
    Ok(row.get(0))
}

/// The connection string the source's subscription uses to reach the target.
pub fn conninfo(target: &BackendConfig, configured: Option<&str>, database: &str) -> String {
    let base = match configured {
        Some(c) => c.to_string(),
        None => {
            let mut s = format!("host={} port={} user={}", quote_literal(&target.host), target.port, quote_literal(&target.admin_user));
            if let Some(p) = &target.admin_password {
                s.push_str(&format!(" password={}", quote_literal(p)));
            }
            s.push_str(&format!(" sslmode={}", target.tls.as_str()));
            // The CA file must be at the same path on the server that subscribes.
            if let (BackendTlsMode::VerifyFull, Some(ca)) = (target.tls, &target.tls_ca) {
                s.push_str(&format!(" sslrootcert={}", quote_literal(&ca.to_string_lossy())));
            }
            s
        }
    };
    format!("{base} dbname={}", quote_literal(database))
}

/// The statement that makes the source subscribe to the target through the slot.
pub fn subscription_sql(r: &Reverse, conninfo: &str) -> String {
    format!(
        "CREATE SUBSCRIPTION {name} CONNECTION {conn} PUBLICATION {name} WITH (create_slot = false, slot_name = {slot}, copy_data = false)",
        name = quote_ident(&r.name),
        conn = quote_literal(conninfo),
        slot = quote_literal(&r.name),
    )
}

/// Makes the source subscribe (after the switch). Safe to run again: an existing
/// subscription of that name is left as it is.
pub async fn subscribe(src: &Client, r: &Reverse, conninfo: &str) -> Result<(), CutoverError> {
    src.batch_execute("SET default_transaction_read_only = off").await?;
    let exists = src.query_opt("SELECT 1 FROM pg_subscription WHERE subname = $1 AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())", &[&r.name]).await?;
    if exists.is_none() {
        src.batch_execute(&subscription_sql(r, conninfo)).await?;
    }
    Ok(())
}

/// Drops a subscription here without touching its slot (which lives elsewhere, and
/// may be unreachable): disabled, its slot detached, then dropped.
pub async fn drop_subscription(c: &Client, name: &str) -> Result<(), tokio_postgres::Error> {
    let name = quote_ident(name);
    c.batch_execute(&format!("ALTER SUBSCRIPTION {name} DISABLE")).await?;
    c.batch_execute(&format!("ALTER SUBSCRIPTION {name} SET (slot_name = NONE)")).await?;
    c.batch_execute(&format!("DROP SUBSCRIPTION {name}")).await
}

/// Drops a forward subscription that a committed cutover disabled: on the new
/// active backend `dst` (its slot detached first, so that the drop does not need
/// the old source), then on the old source `src` its slot — retried while the
/// stopping walsender still holds it, bounded — and, for an earlier cutover's way
/// back, the publication it read.
pub async fn drop_forward(src: &Client, dst: &Client, sub: &super::catchup::Subscription) -> Result<(), String> {
    let name = quote_ident(&sub.name);
    let local = async {
        dst.batch_execute("SET default_transaction_read_only = off").await?;
        drop_subscription(dst, &sub.name).await
    };
    local.await.map_err(|e| super::control::describe(&e))?;
    // The way back of an earlier cutover read a publication of its own name there.
    if sub.name.starts_with("pgcutover_back_") {
        src.batch_execute("SET default_transaction_read_only = off").await.map_err(|e| super::control::describe(&e))?;
        src.batch_execute(&format!("DROP PUBLICATION IF EXISTS {name}")).await.map_err(|e| format!("its publication on the old source: {}", super::control::describe(&e)))?;
    }
    let Some(slot) = &sub.slot else { return Ok(()) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let dropped = src
            .query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()", &[slot])
            .await;
        match dropped {
            Ok(_) => return Ok(()),
            // 55006: the walsender of the disabled subscription has not exited yet.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) && std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => return Err(format!("its slot {slot} on the old source: {}", super::control::describe(&e))),
        }
    }
}

/// Drops what the journal says was made on the target: the slot, then the
/// publication. Safe to run twice, and on steps journaled but not made.
pub async fn undo(dst: &Client, entries: &[Entry]) -> Result<(), CutoverError> {
    dst.batch_execute("SET default_transaction_read_only = off").await?;
    for e in entries.iter().rev() {
        match e {
            Entry::ReverseSlot { name, .. } => {
                dst.query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", &[name]).await?;
            }
            Entry::ReversePublication { name, .. } => {
                dst.batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(name))).await?;
            }
            _ => {}
        }
    }
    Ok(())
}
