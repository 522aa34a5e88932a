//! Catch-up: the target has applied everything committed on the source.
//!
//! A transactional logical message, committed with `synchronous_commit = on` (the
//! walsender only sends flushed WAL), then `T = pg_current_wal_insert_lsn()`. A
//! subscription has caught up when either
//! - its walsender on the source reports `replay_lsn >= T`, or
//! - its apply worker on the target has processed a keepalive at or past T
//!   (`pg_stat_subscription.latest_end_lsn >= T`): it handles messages strictly in
//!   order, so everything before T is applied by then.
//!
//! The second answers at once; the first only once the subscriber has flushed its
//! asynchronous apply commits (about 200 ms under load). `confirmed_flush_lsn` is not
//! used. Every subscription of the database that streams from the source is waited
//! for; stat rows are matched by subscription OID and walsender PID, never by name
//! (names repeat across databases and clusters).

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::CutoverError;

/// A subscription on the target, and where it streams from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub oid: u32,
    pub name: String,
    pub enabled: bool,
    pub slot: Option<String>,
    /// The walsender serving it on the source, if its slot is there and active.
    pub walsender: Option<i32>,
    /// Its slot is a logical slot of this database on the source.
    pub from_source: bool,
}

/// Every subscription of the target's current database, matched with the logical
/// slots of the source's same database.
///
/// Before PostgreSQL 15 a role that is not a superuser may read every column of
/// pg_subscription but its oid: the oid then comes from pg_stat_subscription by
/// name (names repeat across databases: the one with tables in this database).
pub async fn subscriptions(src: &Client, dst: &Client) -> Result<Vec<Subscription>, tokio_postgres::Error> {
    let oid_readable: bool = dst.query_one("SELECT has_column_privilege('pg_catalog.pg_subscription', 'oid', 'SELECT')", &[]).await?.get(0);
    let sql = if oid_readable {
        "SELECT oid, subname::text, subenabled, subslotname::text FROM pg_subscription \
         WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database()) ORDER BY subname"
    } else {
        "SELECT w.subid, s.subname::text, s.subenabled, s.subslotname::text FROM pg_subscription s \
         JOIN (SELECT DISTINCT subid, subname FROM pg_stat_subscription) w ON w.subname = s.subname \
         WHERE s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND (NOT EXISTS (SELECT 1 FROM pg_stat_subscription o WHERE o.subname = s.subname AND o.subid <> w.subid) \
                OR w.subid IN (SELECT srsubid FROM pg_subscription_rel)) \
         ORDER BY s.subname"
    };
    let rows = dst.query(sql, &[]).await?;
    let slots = src
        .query("SELECT slot_name::text, active_pid FROM pg_replication_slots WHERE slot_type = 'logical' AND database = current_database()", &[])
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let slot: Option<String> = r.get(3);
            let on_source = slot.as_ref().and_then(|s| slots.iter().find(|x| x.get::<_, String>(0) == *s));
            Subscription {
                oid: r.get(0),
                name: r.get(1),
                enabled: r.get(2),
                slot: slot.clone(),
                walsender: on_source.and_then(|x| x.get(1)),
                from_source: on_source.is_some(),
            }
        })
        .collect())
}

/// Writes the marker on the source database and returns T.
pub async fn mark(src: &Client, id: &str) -> Result<String, tokio_postgres::Error> {
    src.batch_execute("SET default_transaction_read_only = off; SET synchronous_commit = on").await?;
    src.query_one("SELECT pg_logical_emit_message(true, 'pgcutover', $1)::text", &[&format!("cutover {id}")]).await?;
    Ok(src.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await?.get(0))
}

/// Waits until every subscription in `subs` has applied everything up to `lsn`;
/// returns how long that took and which side said so last.
pub async fn wait_replayed(src: &Client, dst: &Client, subs: &[Subscription], lsn: &str, deadline: Instant) -> Result<(Duration, &'static str), CutoverError> {
    let started = Instant::now();
    // pg_stat_get_wal_senders() rather than pg_stat_replication: the view joins
    // every backend's status, which takes milliseconds with a thousand sessions.
    let on_source = src.prepare("SELECT coalesce(bool_or(replay_lsn >= $1::text::pg_lsn), false) FROM pg_stat_get_wal_senders() WHERE pid = $2").await?;
    let on_target = dst.prepare("SELECT coalesce(bool_or(latest_end_lsn >= $1::text::pg_lsn), false) FROM pg_stat_subscription WHERE subid = $2 AND relid IS NULL").await?;
    let mut by = "none";
    for sub in subs {
        let pid = sub.walsender.unwrap_or(0);
        loop {
            let (on_src, on_dst): ([&(dyn tokio_postgres::types::ToSql + Sync); 2], [&(dyn tokio_postgres::types::ToSql + Sync); 2]) = ([&lsn, &pid], [&lsn, &sub.oid]);
            let (a, b) = tokio::join!(src.query_one(&on_source, &on_src), dst.query_one(&on_target, &on_dst));
            if a?.get::<_, bool>(0) {
                by = "replay_lsn";
                break;
            }
            if b?.get::<_, bool>(0) {
                by = "latest_end_lsn";
                break;
            }
            if Instant::now() >= deadline {
                return Err(CutoverError::Timeout { what: format!("subscription {} replaying {lsn}", sub.name), bound: deadline.saturating_duration_since(started) });
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    Ok((started.elapsed(), by))
}

/// Refreshes the subscriptions on `dst` that stream from `src` (tables created
/// since they were made join them) and waits, up to `bound`, until every table of
/// theirs is synchronised. Returns their names.
pub async fn refresh_subscriptions_from(src: &Client, dst: &Client, bound: Duration) -> anyhow::Result<Vec<String>> {
    let subs: Vec<Subscription> = subscriptions(src, dst).await?.into_iter().filter(|s| s.from_source && s.enabled).collect();
    for s in &subs {
        dst.batch_execute(&format!("ALTER SUBSCRIPTION {} REFRESH PUBLICATION", crate::session::migrate::quote_ident(&s.name))).await?;
    }
    let oids: Vec<u32> = subs.iter().map(|s| s.oid).collect();
    let deadline = Instant::now() + bound;
    loop {
        let pending: i64 = dst.query_one("SELECT count(*) FROM pg_subscription_rel WHERE srsubid = ANY($1) AND srsubstate <> 'r'", &[&oids]).await?.get(0);
        if pending == 0 {
            return Ok(subs.into_iter().map(|s| s.name).collect());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("{pending} table(s) still copying after {bound:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
