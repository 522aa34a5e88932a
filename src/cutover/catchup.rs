//! Catch-up: the target has applied everything committed on the source.
//!
//! A transactional logical message, committed with `synchronous_commit = on` (the
//! walsender only sends flushed WAL), then `T = pg_current_wal_insert_lsn()`. The
//! target has caught up when either
//! - the subscription's walsender on the source reports `replay_lsn >= T` (a missing
//!   row means not caught up), or
//! - the target's apply worker has processed a keepalive at or past T
//!   (`pg_stat_subscription.latest_end_lsn >= T`): it handles messages strictly in
//!   order, so everything before T is applied by then.
//!
//! The second answers at once; the first only once the subscriber has flushed its
//! asynchronous apply commits, which under load means its `wal_writer_delay`
//! (about 200 ms): while commits wait for that flush the worker reports the last
//! applied transaction, not the marker's empty one. `confirmed_flush_lsn` is not used.

use std::time::{Duration, Instant};

use anyhow::bail;
use tokio_postgres::Client;

/// Writes the marker on the source database and returns T.
pub async fn mark(src: &Client, id: u64) -> anyhow::Result<String> {
    src.batch_execute("SET default_transaction_read_only = off; SET synchronous_commit = on").await?;
    src.query_one("SELECT pg_logical_emit_message(true, 'pgcutover', $1)::text", &[&format!("cutover {id}")]).await?;
    Ok(src.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await?.get(0))
}

/// Polls both sides until `subscription` has applied everything up to `lsn`;
/// returns how long that took and which side said so.
pub async fn wait_replayed(src: &Client, dst: &Client, subscription: &str, lsn: &str, deadline: Instant) -> anyhow::Result<(Duration, &'static str)> {
    let started = Instant::now();
    let on_source = src
        .prepare("SELECT coalesce(bool_or(replay_lsn >= $1::text::pg_lsn), false) FROM pg_stat_replication WHERE application_name = $2")
        .await?;
    let on_target = dst
        .prepare("SELECT coalesce(bool_or(latest_end_lsn >= $1::text::pg_lsn), false) FROM pg_stat_subscription WHERE subname = $2 AND relid IS NULL")
        .await?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&lsn, &subscription];
    loop {
        let (a, b) = tokio::join!(src.query_one(&on_source, &params), dst.query_one(&on_target, &params));
        if a?.get::<_, bool>(0) {
            return Ok((started.elapsed(), "replay_lsn"));
        }
        if b?.get::<_, bool>(0) {
            return Ok((started.elapsed(), "latest_end_lsn"));
        }
        if Instant::now() >= deadline {
            bail!("subscription {subscription} had not replayed {lsn} by the catch-up deadline");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The subscription that feeds the target's database `db`.
pub async fn subscription(dst: &Client) -> anyhow::Result<Option<(String, bool)>> {
    let row = dst
        .query_opt(
            "SELECT subname::text, subenabled FROM pg_subscription WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database()) ORDER BY subname LIMIT 1",
            &[],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}
