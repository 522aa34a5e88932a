//! The cutover: moves every session from the active backend (the source, a logical
//! replication publisher) to the target (its subscriber).
//!
//! preflight → prewarm → pause → drain → fence → catch-up → sequences → repoint →
//! move sessions → resume. Any failure before the repoint rolls back: unfence,
//! reopen the gate on the source, report why. The pause is bounded by `max_pause`.

mod catchup;
mod control;
mod fence;
pub mod preflight;
pub mod report;
mod sequences;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::stream::{self, StreamExt};
use tokio_postgres::Client;

use crate::backend::BackendTarget;
use crate::server::Proxy;
use crate::session::registry::{Control, SessionInfo};
pub use report::{CutoverReport, Outcome};
use report::{ms, Catchup, Phase};

/// How many logins run at once while prewarming.
const PREWARM_CONCURRENCY: usize = 32;
/// How long moving the sessions may take before stragglers are closed.
const MOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Sessions moved and closed during the current cutover.
#[derive(Default)]
pub struct Tally {
    moved: Mutex<HashSet<u64>>,
    closed: Mutex<HashMap<u64, String>>,
}

impl Tally {
    fn reset(&self) {
        self.moved.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.closed.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub fn moved(&self, id: u64) {
        self.moved.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
    }

    pub fn closed(&self, id: u64, why: String) {
        self.closed.lock().unwrap_or_else(|p| p.into_inner()).insert(id, why);
    }

    fn settled(&self, id: u64) -> bool {
        self.moved.lock().unwrap_or_else(|p| p.into_inner()).contains(&id) || self.closed.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&id)
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Per database: the cutover's connections to both sides and the subscription.
struct Database {
    name: String,
    src: Client,
    dst: Client,
    subscription: String,
}

struct Run<'a> {
    proxy: &'a Arc<Proxy>,
    report: CutoverReport,
    source: Arc<BackendTarget>,
    target: Arc<BackendTarget>,
    databases: Vec<Database>,
    fence: Option<fence::Fence>,
    paused: bool,
}

/// Runs one cutover to `to` (default: `[cutover] target`). Never panics on a
/// failure: every outcome is a report.
pub async fn run(proxy: &Arc<Proxy>, to: Option<&str>, force: bool) -> CutoverReport {
    let config = proxy.config();
    let source = proxy.active_backend();
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let to_name = to.map(str::to_owned).or_else(|| config.cutover.target.clone()).unwrap_or_default();
    let report = CutoverReport {
        id,
        from: source.name.clone(),
        to: to_name.clone(),
        started_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        outcome: Outcome::Refused,
        failed_phase: None,
        reason: None,
        phases: Vec::new(),
        pause_ms: 0.0,
        databases: Vec::new(),
        sessions_moved: 0,
        sessions_cancelled: 0,
        sessions_closed: 0,
        closed: Vec::new(),
        held_requests: 0,
        longest_hold_ms: 0.0,
        sequences_copied: 0,
        catchup: Vec::new(),
        preflight: Vec::new(),
    };
    let refuse = |mut report: CutoverReport, phase: &str, why: String| {
        tracing::warn!(phase, reason = %why, "cutover refused");
        report.failed_phase = Some(phase.into());
        report.reason = Some(why);
        report
    };
    let Ok(_one_at_a_time) = proxy.cutover_lock.try_lock() else {
        return refuse(report, "start", "a cutover is already running".into());
    };
    let Some(target) = proxy.backend(&to_name) else {
        return refuse(report, "start", format!("no backend named {to_name:?} (set --to or [cutover] target)"));
    };
    if target.name == source.name {
        return refuse(report, "start", format!("{to_name} is already the active backend"));
    }
    tracing::info!(id, from = %source.name, to = %target.name, "cutover starting");
    let mut run = Run { proxy, report, source, target, databases: Vec::new(), fence: None, paused: false };
    let outcome = run.execute(force).await;
    let report = match outcome {
        Ok(()) => run.report,
        Err((phase, why)) => run.rollback(phase, why).await,
    };
    proxy.set_cutover_running(false);
    tracing::info!(report = %serde_json::to_string(&report).unwrap_or_default(), "cutover {}", report.outcome.as_str());
    proxy.set_last_report(report.clone());
    report
}

type Failure = (&'static str, String);

fn fail(phase: &'static str) -> impl Fn(anyhow::Error) -> Failure {
    move |e| (phase, format!("{e:#}"))
}

impl Run<'_> {
    fn record(&mut self, name: &'static str, since: Instant) {
        self.report.phases.push(Phase { name, ms: ms(since.elapsed()) });
    }

    fn on_source(&self) -> Vec<Arc<SessionInfo>> {
        self.proxy.sessions.list().into_iter().filter(|s| s.backend().target.name == self.source.name).collect()
    }

    async fn execute(&mut self, force: bool) -> Result<(), Failure> {
        let config = self.proxy.config();
        let cut = &config.cutover;

        // Preflight: refuse with every reason found.
        let t = Instant::now();
        let mut names: BTreeSet<String> = cut.databases.iter().cloned().collect();
        names.extend(self.proxy.sessions.list().iter().map(|s| s.database.clone()));
        if names.is_empty() {
            return Err(("preflight", "no database to cut over: no session is open and [cutover] databases is empty".into()));
        }
        self.report.databases = names.iter().cloned().collect();
        for name in &names {
            let src = control::connect(&self.source.config, name).await.map_err(fail("preflight"))?;
            let dst = control::connect(&self.target.config, name).await.map_err(fail("preflight"))?;
            let subscription = catchup::subscription(&dst).await.map_err(fail("preflight"))?.map(|s| s.0).unwrap_or_default();
            self.databases.push(Database { name: name.clone(), src, dst, subscription });
        }
        let our_pids: Vec<i32> = self.on_source().iter().map(|s| s.backend().key.pid).collect();
        let mut problems = Vec::new();
        for db in &self.databases {
            let checks = preflight::check_database(&db.name, &db.src, &db.dst, &our_pids, &self.source.config.admin_user, cut.drain_timeout, cut.max_lag_bytes, Some(&self.proxy.lag))
                .await
                .map_err(fail("preflight"))?;
            for c in checks {
                if !c.ok && (c.guards_data || !force) {
                    problems.push(c.to_string());
                }
                self.report.preflight.push(c.to_string());
            }
        }
        self.record("preflight", t);
        if !problems.is_empty() {
            return Err(("preflight", problems.join("; ")));
        }

        // Prewarm: a logged-in target connection per session, before anything pauses.
        let t = Instant::now();
        let sessions = self.on_source();
        let target = self.target.clone();
        let failures: Vec<String> = stream::iter(sessions.iter().cloned())
            .map(|s| {
                let target = target.clone();
                async move {
                    match crate::session::prewarm(&s, &target).await {
                        Ok(conn) => {
                            s.set_prewarmed(target, conn);
                            None
                        }
                        Err(e) => Some(format!("session {} ({}@{}): {e}", s.id, s.user, s.database)),
                    }
                }
            })
            .buffer_unordered(PREWARM_CONCURRENCY)
            .filter_map(|r| async move { r })
            .collect()
            .await;
        self.record("prewarm", t);
        if !failures.is_empty() {
            return Err(("prewarm", failures.join("; ")));
        }

        // Pause and drain.
        self.proxy.set_cutover_running(true);
        self.proxy.cutover_tally().reset();
        let t = Instant::now();
        let deadline = t + cut.max_pause;
        let drained = crate::gate::pause_with_watchdog(self.proxy, Some(cut.drain_timeout), cut.on_drain_timeout, cut.max_pause + Duration::from_secs(30))
            .await
            .map_err(|e| ("drain", e.to_string()))?;
        self.paused = true;
        self.report.sessions_cancelled = drained.cancelled.len();
        self.record("drain", t);
        // Sessions copy their state onto the target while the source is fenced
        // and caught up: at the switch only the swap remains.
        let sessions = self.on_source();
        for s in &sessions {
            s.control(Control::Prepare);
        }

        // Everything up to the repoint fits in max_pause, or rolls back.
        let bounded = tokio::time::timeout_at(deadline.into(), self.fence_catch_up_sequences()).await;
        match bounded {
            Ok(r) => r?,
            Err(_) => return Err(("max_pause", format!("the cutover would have paused traffic longer than max_pause ({:?})", cut.max_pause))),
        }
        // A session that has not copied its state by now copies it at the switch.
        let t = Instant::now();
        let _ = tokio::time::timeout_at(deadline.min(t + MOVE_TIMEOUT).into(), async {
            while sessions.iter().any(|s| s.prepared() == Some(crate::session::registry::Prepared::No)) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        self.record("prepare_sessions", t);

        // The point of no return.
        let t = Instant::now();
        self.proxy.set_active(self.target.clone());
        let config_path = self.proxy.config_path();
        if let Some(path) = crate::state::path(&config, config_path.as_deref()) {
            if let Err(e) = crate::state::save(&path, &self.target.name) {
                tracing::error!(file = %path.display(), error = %e, "could not record the new active backend");
            }
        }
        self.record("repoint", t);

        let t = Instant::now();
        self.move_sessions().await;
        self.record("move_sessions", t);

        // The holds end as the gate opens: measure them now.
        let held: Vec<Duration> = self.proxy.sessions.list().iter().filter_map(|s| s.held_since()).map(|t| t.elapsed().unwrap_or_default()).collect();
        let paused = self.proxy.gate().resume().unwrap_or_default();
        self.paused = false;
        self.report.pause_ms = ms(paused);
        self.report.held_requests = held.len() as u64;
        self.report.longest_hold_ms = ms(held.into_iter().max().unwrap_or_default());
        self.report.outcome = Outcome::Committed;
        self.proxy.set_cutover_running(false);

        // After the switch, a stray write on the source must not replicate over
        // new data on the target.
        let t = Instant::now();
        for db in &self.databases {
            if !db.subscription.is_empty() {
                let sql = format!("ALTER SUBSCRIPTION {} DISABLE", crate::session::migrate::quote_ident(&db.subscription));
                if let Err(e) = db.dst.batch_execute(&sql).await {
                    tracing::error!(database = %db.name, error = %e, "could not disable the subscription on the new active backend");
                }
            }
        }
        self.record("disable_subscription", t);
        Ok(())
    }

    async fn fence_catch_up_sequences(&mut self) -> Result<(), Failure> {
        let config = self.proxy.config();
        let cut = &config.cutover;
        if cut.fence_source {
            let t = Instant::now();
            let mut roles: Vec<String> = self.on_source().iter().map(|s| s.user.clone()).collect();
            roles.extend(config.auth.users.iter().map(|u| u.name.clone()));
            roles.sort();
            roles.dedup();
            let keep: Vec<i32> = self.on_source().iter().map(|s| s.backend().key.pid).collect();
            let src = &self.databases[0].src;
            let fenced = fence::fence(src, &roles, &keep, &self.source.config.admin_user).await;
            match fenced {
                Ok(f) => self.fence = Some(f),
                Err(e) => {
                    // Whatever part of it took effect is undone by the rollback.
                    self.fence = Some(fence::Fence { read_only: true, roles: Vec::new(), terminated: 0 });
                    return Err(("fence", format!("{e:#}")));
                }
            }
            self.record("fence", t);
        }

        let t = Instant::now();
        let catchup_deadline = Instant::now() + cut.catchup_timeout;
        let id = self.report.id;
        let results = futures::future::join_all(self.databases.iter().map(|db| async move {
            let lsn = catchup::mark(&db.src, id).await?;
            let (after, by) = catchup::wait_replayed(&db.src, &db.dst, &db.subscription, &lsn, catchup_deadline).await?;
            Ok::<_, anyhow::Error>(Catchup { database: db.name.clone(), subscription: db.subscription.clone(), lsn, reached_after_ms: ms(after), detected_by: by })
        }))
        .await;
        for r in results {
            self.report.catchup.push(r.map_err(fail("catchup"))?);
        }
        self.record("catchup", t);

        let t = Instant::now();
        let margin = cut.sequence_margin;
        let copied = futures::future::join_all(self.databases.iter().map(|db| sequences::copy(&db.src, &db.dst, margin))).await;
        for c in copied {
            self.report.sequences_copied += c.map_err(fail("sequences"))?;
        }
        self.record("sequences", t);
        Ok(())
    }

    /// Asks every session still on the source to move, and waits for each to settle.
    async fn move_sessions(&mut self) {
        let sessions = self.on_source();
        for s in &sessions {
            s.control(Control::Migrate);
        }
        let tally = self.proxy.cutover_tally();
        let deadline = Instant::now() + MOVE_TIMEOUT;
        let live = |s: &Arc<SessionInfo>| self.proxy.sessions.list().iter().any(|x| x.id == s.id);
        loop {
            let pending: Vec<&Arc<SessionInfo>> = sessions.iter().filter(|s| !tally.settled(s.id) && live(s)).collect();
            if pending.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for s in pending {
                    tally.closed(s.id, "did not reach an idle point in time to move".into());
                    s.control(Control::Kill);
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let moved = tally.moved.lock().unwrap_or_else(|p| p.into_inner()).len();
        let closed = tally.closed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.report.sessions_moved = moved;
        self.report.sessions_closed = closed.len();
        self.report.closed = closed.into_iter().map(|(id, why)| format!("session {id}: {why}")).collect();
    }

    /// Leaves everything on the source: unfenced, gate open, prewarmed connections
    /// closed.
    async fn rollback(mut self, phase: &'static str, why: String) -> CutoverReport {
        tracing::warn!(phase, reason = %why, "cutover failed; rolling back");
        if let Some(f) = self.fence.take() {
            if let Some(db) = self.databases.first() {
                if let Err(e) = fence::unfence(&db.src, &f).await {
                    tracing::error!(error = %format!("{e:#}"), "UNFENCE FAILED: the source may still be read-only");
                    self.report.reason = Some(format!("{why}; and unfencing failed: {e:#}"));
                }
            }
        }
        // Only a pause this cutover made: an operator's PAUSE stays as it is.
        if self.paused {
            if let Ok(paused) = self.proxy.gate().resume() {
                self.report.pause_ms = ms(paused);
            }
        }
        for s in self.proxy.sessions.list() {
            drop(s.take_prewarmed());
        }
        self.report.outcome = if phase == "preflight" { Outcome::Refused } else { Outcome::RolledBack };
        self.report.failed_phase = Some(phase.into());
        if self.report.reason.is_none() {
            self.report.reason = Some(why);
        }
        self.report
    }
}

/// Preflight on its own (`pgcutover check`): every check for every database served.
pub async fn check(proxy: &Arc<Proxy>, to: Option<&str>) -> anyhow::Result<Vec<preflight::Check>> {
    let config = proxy.config();
    let source = proxy.active_backend();
    let name = to.map(str::to_owned).or_else(|| config.cutover.target.clone()).unwrap_or_default();
    let target = proxy.backend(&name).ok_or_else(|| anyhow::anyhow!("no backend named {name:?} (set --to or [cutover] target)"))?;
    let mut names: BTreeSet<String> = config.cutover.databases.iter().cloned().collect();
    names.extend(proxy.sessions.list().iter().map(|s| s.database.clone()));
    if names.is_empty() {
        anyhow::bail!("no database to check: no session is open and [cutover] databases is empty");
    }
    let our_pids: Vec<i32> = proxy.sessions.list().iter().filter(|s| s.backend().target.name == source.name).map(|s| s.backend().key.pid).collect();
    let mut all = Vec::new();
    for db in names {
        let src = control::connect(&source.config, &db).await?;
        let dst = control::connect(&target.config, &db).await?;
        all.extend(preflight::check_database(&db, &src, &dst, &our_pids, &source.config.admin_user, config.cutover.drain_timeout, config.cutover.max_lag_bytes, Some(&proxy.lag)).await?);
    }
    Ok(all)
}
