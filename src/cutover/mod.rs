//! The cutover: moves every session from the active backend (the source, a logical
//! replication publisher) to the target (its subscriber).
//!
//! preflight → prewarm (a target connection per session, the session's state
//! copied onto it) → pause → drain ∥ fence → reload → catch-up → sequences → repoint →
//! resume → sessions adopt their prepared connections. Nothing per session runs
//! inside the pause: a session whose copy is current swaps connections at its next
//! request; one that ran anything since its copy copies again then.
//!
//! The [`Controller`] owns the cutover's state. A run is a task of its own, so it
//! ends in commit or rollback even when whoever asked goes away; it talks to
//! sessions through requests that carry their reply. Every side effect on a
//! database is journaled before it is made ([`journal`]); a failure at any await
//! point before the repoint, a timeout, SIGTERM or a crash is undone from the
//! journal (after a crash, by the next start: [`recover`]).
//!
//! A target that is a physical standby of the source (`standby_of`, or found in
//! recovery) gets a switchover instead ([`physical`]): the same steps, with WAL
//! replay for the catch-up, no sequence copy, and the promotion as the point of no
//! return.

mod catchup;
pub mod cleanup;
mod control;
pub mod control_tls;
mod error;
pub mod fence;
mod fleet;
pub mod hooks;
pub mod journal;
mod physical;
pub mod preflight;
pub mod report;
mod recovery;
pub mod reverse;
mod run;
use run::Run;
mod sequences;
mod sessions;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::Config;
use crate::server::Proxy;
pub use error::{CutoverError, Failure, Phase};
use hooks::{Hook, Hooks};
use journal::{Entry, Journal};
pub use preflight::check;
pub use recovery::recover;
pub use report::{CutoverReport, Outcome};

/// How long sessions get to copy their state before the pause; one that has not by
/// then (a long transaction) copies at the switch.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the report waits for sessions to say they moved.
const MOVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a rollback keeps trying to undo the fence on fresh connections before
/// it leaves the rest to a background retry and the next start.
const UNDO_TIMEOUT: Duration = Duration::from_secs(15);

/// The cutover's own state. The data path never reads it: sessions see only the
/// gate, the active backend and their own control channel.
#[derive(Default)]
pub struct Controller {
    /// One cutover at a time.
    lock: tokio::sync::Mutex<()>,
    running: AtomicBool,
    /// Set by a shutdown: a run that has not reached the repoint rolls back.
    stop: tokio::sync::Notify,
    stopping: AtomicBool,
    last_report: Mutex<Option<CutoverReport>>,
    /// Cutovers by outcome: committed, rolled back, refused, rehearsed.
    pub counts: [AtomicU64; 4],
    /// The target's replication lag (bytes) per database, as the last preflight saw it.
    pub lag: Mutex<std::collections::BTreeMap<String, i64>>,
    hook: Mutex<Option<Hook>>,
}

impl Controller {
    pub fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    pub fn last_report(&self) -> Option<CutoverReport> {
        self.last_report.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn finished(&self, report: &CutoverReport) {
        let i = match report.outcome {
            Outcome::Committed => 0,
            Outcome::RolledBack => 1,
            Outcome::Refused => 2,
            Outcome::Rehearsed => 3,
        };
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        *self.last_report.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
    }

    /// Arms a fault-injection hook for the next cutovers (tests).
    pub fn set_hook(&self, hook: Option<Hook>) {
        *self.hook.lock().unwrap_or_else(|p| p.into_inner()) = hook;
    }

    fn hooks(&self) -> Hooks {
        Hooks(self.hook.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// A shutdown: a running cutover rolls back (unless past its repoint), and this
    /// returns once it has ended, or after `bound`.
    pub async fn stop(&self, bound: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stop.notify_waiters();
        let _ = tokio::time::timeout(bound, self.lock.lock()).await;
    }
}

/// How to run a cutover.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The backend to move to (default: `[cutover] target`).
    pub to: Option<String>,
    /// Go ahead despite failed checks that do not guard data.
    pub force: bool,
    /// Run every phase up to the point of no return, then roll back on purpose.
    pub rehearse: bool,
    /// This instance's part in a fleet cutover another member leads.
    pub follow: Option<crate::fleet::Plan>,
}

/// This instance's part in a fleet cutover that another member leads (started by
/// the fleet's watch when the leader publishes its plan).
pub async fn follow(proxy: &Arc<Proxy>, plan: crate::fleet::Plan) -> CutoverReport {
    let rehearse = plan.rehearse;
    run(proxy, Options { to: Some(plan.target.clone()), force: true, rehearse, follow: Some(plan) }).await
}

/// Runs one cutover as a task of its own and waits for its report. Dropping the
/// returned future does not stop the cutover: it still ends in commit or rollback.
/// In a fleet, the instance asked leads a cutover of every member. The task runs
/// on the control plane's runtime, whoever asks (a console session runs on an
/// event loop that relays other sessions).
pub async fn run(proxy: &Arc<Proxy>, opts: Options) -> CutoverReport {
    let proxy2 = proxy.clone();
    let task = proxy.spawn_control(async move { supervise(&proxy2, opts).await });
    match task.await {
        Ok(report) => report,
        Err(e) => {
            tracing::error!(error = %e, "the cutover task failed");
            let mut report = CutoverReport::new(0, "", "");
            report.outcome = Outcome::RolledBack;
            report.reason = Some(format!("the cutover task failed: {e}"));
            report
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

async fn supervise(proxy: &Arc<Proxy>, opts: Options) -> CutoverReport {
    let config = proxy.config();
    let source = proxy.active_backend();
    let seq = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let to = opts.to.clone().or_else(|| config.cutover.target.clone()).unwrap_or_default();
    let mut report = CutoverReport::new(seq, &source.name, &to);
    let refuse = |mut report: CutoverReport, f: Failure| {
        tracing::warn!(phase = %f.phase, kind = f.error.kind(), reason = %f.error, "cutover refused");
        report.failed_phase = Some(f.phase.as_str().into());
        report.reason = Some(f.error.to_string());
        proxy.cutover.finished(&report);
        report
    };
    let Ok(_one_at_a_time) = proxy.cutover.lock.try_lock() else {
        return refuse(report, Failure { phase: Phase::Start, error: CutoverError::Busy });
    };
    if proxy.cutover.stopping.load(Ordering::SeqCst) {
        return refuse(report, Failure { phase: Phase::Start, error: CutoverError::Shutdown });
    }
    let Some(target) = proxy.backend(&to) else {
        let known = proxy.config().backends.keys().cloned().collect();
        return refuse(report, Failure { phase: Phase::Start, error: CutoverError::NoBackend(to, known) });
    };
    if target.name == source.name {
        return refuse(report, Failure { phase: Phase::Start, error: CutoverError::AlreadyActive(to) });
    }
    let (id, fleet) = match (proxy.fleet(), opts.follow) {
        (None, _) => (format!("{seq}-{:08x}", rand::random::<u32>()), None),
        (Some(fleet), Some(plan)) => {
            if plan.source != source.name {
                let mut run = fleet::FleetRun::follow(fleet, plan.clone());
                run.mine.reason = Some(format!("this member serves on {}, not on {}", source.name, plan.source));
                let _ = run.fleet.report(&plan.id, &crate::fleet::Report { progress: Some(crate::fleet::Progress::Failed), ..run.mine.clone() }).await;
                return refuse(report, Failure { phase: Phase::Start, error: CutoverError::Fleet(run.mine.reason.unwrap_or_default()) });
            }
            (plan.id.clone(), Some(fleet::FleetRun::follow(fleet, plan)))
        }
        (Some(fleet), None) => {
            let id = format!("{}-{seq}-{:08x}", fleet.name, rand::random::<u32>());
            match fleet.lock(&id).await {
                Ok(lock) => (id.clone(), Some(fleet::FleetRun::lead(fleet, lock, &id, &source.name, &target.name, opts.rehearse))),
                Err(reason) => return refuse(report, Failure { phase: Phase::Start, error: CutoverError::Fleet(reason) }),
            }
        }
    };
    let application_name = control::application_name(&id);
    let following = fleet.as_ref().is_some_and(|f| !f.leader);
    // A member makes no change to any database: it has nothing to journal.
    let journal = if following {
        Journal::detached()
    } else {
        let journal_path = journal_path(&config, proxy.config_path());
        let begin = Entry::Begin { id: id.clone(), source: source.name.clone(), target: target.name.clone(), application_name: application_name.clone() };
        match Journal::create(journal_path, begin) {
            Ok(j) => j,
            Err(e) => return refuse(report, Failure { phase: Phase::Start, error: CutoverError::Journal(e.to_string()) }),
        }
    };
    report.id = seq;
    tracing::info!(id, from = %source.name, to = %target.name, "cutover starting");
    proxy.cutover.running.store(true, Ordering::SeqCst);
    let mut run = Run {
        proxy: proxy.clone(),
        config,
        report,
        id,
        application_name,
        source,
        target,
        journal,
        databases: Vec::new(),
        paused: false,
        hooks: proxy.cutover.hooks(),
        sessions: Vec::new(),
        phase: Phase::Start,
        rehearse: opts.rehearse,
        physical: false,
        fleet,
    };
    let report = run.execute(opts.force).await;
    proxy.cutover.running.store(false, Ordering::SeqCst);
    tracing::info!(report = %serde_json::to_string(&report).unwrap_or_default(), "cutover {}", report.outcome.as_str());
    proxy.cutover.finished(&report);
    report
}

pub use catchup::refresh_subscriptions_from;
pub use control::connect as control_connect;

/// The journal of a configuration: next to its state file, if it has one.
pub fn journal_path(config: &Config, config_path: Option<PathBuf>) -> Option<PathBuf> {
    crate::state::path(config, config_path.as_deref()).map(|p| journal::path_for(&p))
}

