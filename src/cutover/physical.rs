//! A switchover to a physical (streaming) standby of the source.
//!
//! Everything a logical cutover does around the pause stays — prewarm, the gate,
//! the drain, the fence — and only the catch-up differs:
//! - T is the source's WAL insert position once the fence and the drain are done,
//!   and a transaction committed right after it with `synchronous_commit = on`
//!   flushes everything up to T (the walsender sends flushed WAL only); every
//!   commit of the application is before T.
//! - The standby has everything once `pg_last_wal_replay_lsn() >= T`. The
//!   position T names the start of the next record while a replayed position is
//!   the end of the last one; they meet at our own commit record, which starts at
//!   or after T.
//! - Then `pg_promote(wait => false)` and a 1 ms poll of `pg_is_in_recovery()`,
//!   bounded (`wait => true` polls every 100 ms inside the server, which would be
//!   most of the pause).
//!
//! Physical replication carries sequences, roles and everything else: nothing is
//! copied. It also carries the fence's `ALTER ROLE … NOLOGIN` to the standby, so
//! the promoted server gives those roles LOGIN back before anything is served
//! there; the fence's `ALTER SYSTEM` lives in the source's postgresql.auto.conf
//! and stays there.
//!
//! A connection opened on the standby before the promotion is read-only until
//! then and read-write after (a transaction's read-only state is decided when it
//! starts, from the server's recovery state); LISTEN is refused during recovery,
//! so sessions copy their channels after the promotion, when they move.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::journal::Entry;
use super::preflight::{self, Check};
use super::report::{ms, Catchup};
use super::{fence, CutoverError, Phase, Run};

/// Whether the server is in recovery (a standby).
pub async fn in_recovery(c: &Client) -> Result<bool, tokio_postgres::Error> {
    Ok(c.query_one("SELECT pg_is_in_recovery()", &[]).await?.get(0))
}

/// The application_name a standby's WAL receiver shows on its primary: its
/// primary_conninfo's application_name, else cluster_name, else "walreceiver".
fn receiver_name(conninfo: &str, cluster_name: &str) -> String {
    let mut fallback = None;
    for pair in conninfo.split_whitespace() {
        match pair.split_once('=') {
            Some(("application_name", v)) => return v.trim_matches('\'').to_string(),
            Some(("fallback_application_name", v)) => fallback = Some(v.trim_matches('\'').to_string()),
            _ => {}
        }
    }
    if !cluster_name.is_empty() {
        return cluster_name.to_string();
    }
    fallback.unwrap_or_else(|| "walreceiver".into())
}

/// The checks of a switchover from `src` (a primary) to `dst` (its standby).
/// `max_lag`: replay lag in bytes above which the switchover is refused (not with
/// --force). Returns the checks and the replay lag, if known.
pub async fn check(target: &str, src: &Client, dst: &Client, max_lag: u64) -> anyhow::Result<(Vec<Check>, Option<i64>)> {
    let mut checks = Vec::new();
    let row = dst
        .query_one(
            "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END, \
                    (SELECT system_identifier::text FROM pg_control_system()), \
                    has_function_privilege('pg_catalog.pg_promote(boolean, integer)', 'EXECUTE'), \
                    pg_last_wal_replay_lsn()::text, current_setting('cluster_name')",
            &[],
        )
        .await?;
    let (recovering, paused, dst_id, may_promote, replayed, cluster_name): (bool, bool, String, bool, Option<String>, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5));
    checks.push(Check::new(
        format!("{target} is a standby (in recovery) and replaying"),
        true,
        if !recovering {
            Some("it is not in recovery: promoted already, or not a standby".into())
        } else if paused {
            Some("WAL replay is paused there (pg_wal_replay_resume() first)".into())
        } else {
            None
        },
    ));
    let row = src
        .query_one(
            "SELECT (SELECT system_identifier::text FROM pg_control_system()), \
                    ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int, \
                    pg_current_wal_lsn()::text, \
                    current_setting('wal_log_hints') = 'on' OR current_setting('data_checksums') = 'on'",
            &[],
        )
        .await?;
    let (src_id, timeline, current, rewindable): (String, i32, String, bool) = (row.get(0), row.get(1), row.get(2), row.get(3));
    checks.push(Check::new(
        format!("{target} is a copy of the source (same system identifier)"),
        true,
        (src_id != dst_id).then(|| format!("the source is system {src_id}, {target} is system {dst_id}")),
    ));
    let receiver = dst.query_opt("SELECT status, received_tli, coalesce(slot_name, ''), coalesce(conninfo, '') FROM pg_stat_wal_receiver", &[]).await?;
    let streaming = match receiver {
        None => Some(format!("{target} has no WAL receiver: it does not stream from a primary")),
        Some(r) => {
            let (status, tli, slot, conninfo): (String, Option<i32>, String, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
            let walsender = if slot.is_empty() {
                let name = receiver_name(&conninfo, &cluster_name);
                src.query("SELECT state FROM pg_stat_replication WHERE application_name = $1", &[&name]).await?.iter().map(|r| r.get::<_, Option<String>>(0)).collect::<Vec<_>>()
            } else {
                src.query("SELECT r.state FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = $1", &[&slot])
                    .await?
                    .iter()
                    .map(|r| r.get::<_, Option<String>>(0))
                    .collect()
            };
            if status != "streaming" {
                Some(format!("its WAL receiver is {status}, not streaming"))
            } else if tli != Some(timeline) {
                Some(format!("it receives timeline {}, the source is on timeline {timeline}", tli.map_or("?".into(), |t| t.to_string())))
            } else if !walsender.iter().any(|s| s.as_deref() == Some("streaming")) {
                Some("the source shows no streaming walsender for it in pg_stat_replication (does it stream from another server?)".into())
            } else {
                None
            }
        }
    };
    checks.push(Check::new(format!("{target} streams from the source on its timeline"), true, streaming));
    let lag: Option<i64> = match &replayed {
        Some(lsn) => src.query_one("SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)::int8", &[&current, lsn]).await?.get(0),
        None => None,
    };
    checks.push(Check::new(
        format!("{target}'s replay lag under {max_lag} bytes"),
        false,
        match lag {
            None => Some("it has replayed nothing yet".into()),
            Some(l) if l.max(0) as u64 > max_lag => Some(format!("{l} bytes behind")),
            _ => None,
        },
    ));
    checks.push(Check::new(
        format!("{target} can be promoted by the admin user"),
        true,
        (!may_promote).then(|| "the admin user may not run pg_promote() there (a superuser, or GRANT EXECUTE ON FUNCTION pg_promote)".into()),
    ));
    // Advice, not a condition: the switchover does not need it.
    if !rewindable {
        checks.push(Check {
            name: "the source can be rewound into a standby afterwards (the way back)".into(),
            ok: true,
            guards_data: false,
            detail: "note: pg_rewind needs wal_log_hints = on or data checksums on the source; without them the way back is a new pg_basebackup".into(),
        });
    }
    Ok((checks, lag))
}

/// Unlogged tables of one database: physical replication carries no rows of theirs,
/// so a promoted standby has them empty.
pub async fn unlogged(db: &str, src: &Client) -> anyhow::Result<Check> {
    let rows = src.query("SELECT format('%I.%I', relnamespace::regnamespace, relname) FROM pg_class WHERE relpersistence = 'u' AND relkind IN ('r', 'p')", &[]).await?;
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    Ok(Check::new(
        format!("{db}: no unlogged tables (a promoted standby has them empty)"),
        true,
        (!names.is_empty()).then(|| names.join(", ")),
    ))
}

/// T: the source's WAL insert position, then one synchronous commit after it that
/// flushes everything before it to the standby.
pub async fn mark(src: &Client) -> Result<String, tokio_postgres::Error> {
    src.batch_execute("SET default_transaction_read_only = off; SET synchronous_commit = on").await?;
    let lsn: String = src.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await?.get(0);
    // A transaction with an xid writes a commit record, and a synchronous one
    // returns once it is flushed.
    src.query_one("SELECT pg_current_xact_id()::text", &[]).await?;
    Ok(lsn)
}

/// Waits until the standby has replayed `lsn`; returns how long that took.
pub async fn wait_replayed(dst: &Client, lsn: &str, deadline: Instant) -> Result<Duration, CutoverError> {
    let started = Instant::now();
    let replayed = dst.prepare("SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)").await?;
    loop {
        if dst.query_one(&replayed, &[&lsn]).await?.get::<_, bool>(0) {
            return Ok(started.elapsed());
        }
        if Instant::now() >= deadline {
            return Err(CutoverError::Timeout { what: format!("the standby replaying {lsn}"), bound: deadline.saturating_duration_since(started) });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Promotes the standby and waits (bounded) until it has left recovery.
pub async fn promote(dst: &Client, bound: Duration) -> Result<Duration, CutoverError> {
    let started = Instant::now();
    let signalled: bool = dst.query_one("SELECT pg_promote(wait => false)", &[]).await?.get(0);
    if !signalled {
        return Err(CutoverError::Refused("pg_promote() could not signal the postmaster".into()));
    }
    loop {
        if !in_recovery(dst).await? {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= bound {
            return Err(CutoverError::Timeout { what: "the promotion".into(), bound });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// What the operator does to turn the old primary into a standby of the new one.
pub fn rewind_advice(source: &str, target: &str, target_cfg: &crate::config::BackendConfig) -> String {
    format!(
        "{source} stays fenced (read-only, application roles NOLOGIN). To make it a standby of {target}: run CHECKPOINT on {target} (pg_rewind reads its new timeline from the control file), stop {source}, run \
         pg_rewind -D <its data directory> --source-server='host={} port={} user={} dbname=postgres' -R as its OS user, and start it; \
         then `pgcutover check --to {source}` verifies it, and `pgcutover cutover --to {source}` is the way back",
        target_cfg.host, target_cfg.port, target_cfg.admin_user,
    )
}

impl Run {
    /// The checks of a switchover: the standby's, once, and per database what every
    /// cutover checks and the unlogged tables a promotion would leave empty.
    pub(super) async fn physical_preflight(&mut self, our_pids: &[i32], settings: &preflight::Settings) -> Result<Vec<preflight::Check>, CutoverError> {
        let db = &self.databases[0];
        let (mut checks, lag) = check(&self.target.name, &db.src, &db.dst, settings.max_lag).await?;
        if let Some(l) = lag {
            self.proxy.cutover.lag.lock().unwrap_or_else(|p| p.into_inner()).insert(db.name.clone(), l);
        }
        for db in &mut self.databases {
            checks.extend(preflight::check_common(&db.name, &db.src, &db.dst, our_pids, settings).await?);
            checks.push(unlogged(&db.name, &db.src).await?);
            // Nothing replicates logically here: the standby's catalog is the source's.
            db.subscriptions.clear();
        }
        if self.config.cutover.reverse_replication {
            self.report.notes.push("reverse replication does not apply to a switchover: the way back is pg_rewind".into());
        }
        Ok(checks)
    }

    /// A switchover's catch-up: the standby has replayed the source's WAL up to T.
    /// Then the point of no return (the promotion) is journaled.
    pub(super) async fn switchover_steps(&mut self) -> Result<(), CutoverError> {
        self.phase = Phase::Catchup;
        let t = Instant::now();
        let deadline = Instant::now() + self.config.cutover.catchup_timeout;
        let db = &self.databases[0];
        let lsn = mark(&db.src).await?;
        let after = wait_replayed(&db.dst, &lsn, deadline).await?;
        self.report.catchup.push(Catchup { database: db.name.clone(), subscription: "physical replication".into(), lsn, reached_after_ms: ms(after), detected_by: "pg_last_wal_replay_lsn" });
        self.record(Phase::Catchup, t);
        self.hooks.at("catchup").await?;
        self.report.notes.push("sequences: not copied, physical replication carries them".into());
        if self.rehearse {
            return Err(CutoverError::Rehearsal);
        }
        self.phase = Phase::Repoint;
        self.hooks.at("repoint").await?;
        let roles = self.report.fenced_roles.clone();
        self.journal.record(Entry::Promote { target: self.target.name.clone(), roles }).await.map_err(|e| CutoverError::Journal(e.to_string()))
    }

    /// Past the point of no return of a switchover: promotes the target and gives
    /// the fenced roles LOGIN back there. A failure cannot roll back (the target
    /// may be a primary already, and the source must never be one again beside it):
    /// the report says what the operator must do.
    pub(super) async fn promote(&mut self) {
        let t = Instant::now();
        let bound = self.config.cutover.max_pause;
        let db = &self.databases[0];
        let roles = self.report.fenced_roles.clone();
        let entries = self.journal.entries().to_vec();
        let promoted = async {
            let took = promote(&db.dst, bound).await?;
            fence::give_login(&db.dst, &roles, &entries).await?;
            Ok::<_, CutoverError>(took)
        }
        .await;
        self.record(Phase::Promote, t);
        let advice = rewind_advice(&self.source.name, &self.target.name, &self.target.config);
        match promoted {
            Ok(took) => {
                self.report.notes.push(format!("{} promoted in {:.3} ms", self.target.name, ms(took)));
                self.report.notes.push(advice);
            }
            Err(e) => {
                tracing::error!(target = %self.target.name, error = %e, "the switchover's promotion failed after its point of no return");
                self.report.reason = Some(format!(
                    "the promotion of {target} was not confirmed ({e}). The proxy serves on {target}; {source} stays fenced and must stay so. \
                     Check {target}: if it is still in recovery, promote it (SELECT pg_promote(), or pg_ctl promote); then give LOGIN back to {roles} there",
                    target = self.target.name,
                    source = self.source.name,
                    roles = if roles.is_empty() { "the application roles".to_string() } else { roles.join(", ") },
                ));
                self.report.notes.push(advice);
            }
        }
    }
}

/// Whether a cutover from `source` to `target` is a switchover to a physical
/// standby: declared with `standby_of`, or found in recovery.
pub(super) async fn physical_mode(source: &str, target: &str, config: &crate::config::BackendConfig, dst: &Client) -> Result<bool, CutoverError> {
    let recovering = in_recovery(dst).await?;
    match &config.standby_of {
        Some(primary) if primary != source => Err(CutoverError::Refused(format!("{target} is declared a standby of {primary} (standby_of), but the active backend is {source}"))),
        Some(primary) if !recovering => Err(CutoverError::Refused(format!("{target} is declared a standby of {primary} (standby_of), but it is not in recovery: promoted already?"))),
        _ => Ok(recovering),
    }
}

#[cfg(test)]
mod tests {
    use super::receiver_name;

    #[test]
    fn the_receiver_is_named_as_the_walsender_sees_it() {
        let basebackup = "user=postgres passfile=/x/.pgpass dbname=replication host=/tmp port=5432 fallback_application_name=walreceiver sslmode=prefer";
        assert_eq!(receiver_name(basebackup, ""), "walreceiver");
        assert_eq!(receiver_name(basebackup, "east"), "east");
        assert_eq!(receiver_name("host=a application_name=standby1 fallback_application_name=walreceiver", "east"), "standby1");
    }
}
