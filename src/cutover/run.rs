//! One cutover's run: its state, and the steps from preflight to commit or
//! rollback. The physical switchover's and the fleet's own steps are in their
//! modules ([`super::physical`], [`super::fleet`]).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::error::{CutoverError, Failure, Phase};
use super::hooks::Hooks;
use super::journal::{Entry, Journal};
use super::recovery::undo;
use super::report::{self, ms, Catchup, CutoverReport, Outcome};
use super::{catchup, control, fence, fleet, physical, preflight, reverse, sequences, sessions, MOVE_TIMEOUT, PREPARE_TIMEOUT, UNDO_TIMEOUT};
use crate::backend::BackendTarget;
use crate::config::Config;
use crate::gate::Owner;
use crate::server::Proxy;

/// Per database: the cutover's connections to both sides and the subscriptions
/// from the source.
pub(super) struct Database {
    pub(super) name: String,
    pub(super) src: Client,
    pub(super) dst: Client,
    pub(super) subscriptions: Vec<catchup::Subscription>,
    /// With reverse replication: its names and the tables it publishes back.
    pub(super) reverse: Option<(reverse::Reverse, Vec<String>)>,
}

pub(super) struct Run {
    pub(super) proxy: Arc<Proxy>,
    pub(super) config: Arc<Config>,
    pub(super) report: CutoverReport,
    pub(super) id: String,
    pub(super) application_name: String,
    pub(super) source: Arc<BackendTarget>,
    pub(super) target: Arc<BackendTarget>,
    pub(super) journal: Journal,
    pub(super) databases: Vec<Database>,
    /// The gate is closed by this cutover.
    pub(super) paused: bool,
    pub(super) hooks: Hooks,
    /// The sessions on the source when the cutover began.
    pub(super) sessions: Vec<Arc<crate::session::registry::SessionInfo>>,
    /// Where it is (a failure is reported against it).
    pub(super) phase: Phase,
    /// Stop before the repoint and roll back on purpose.
    pub(super) rehearse: bool,
    /// The target is a physical standby of the source: a switchover.
    pub(super) physical: bool,
    /// A fleet cutover: this instance leads it or takes part.
    pub(super) fleet: Option<fleet::FleetRun>,
}

impl Run {
    pub(super) fn record(&mut self, phase: Phase, since: Instant) {
        self.report.phases.push(report::Phase { name: phase.as_str(), ms: ms(since.elapsed()) });
    }

    /// The roles the application logs in as: the fence takes their LOGIN on the
    /// source, and a target fenced earlier gets it back.
    fn roles(&self) -> Vec<String> {
        let mut roles: Vec<String> = self.proxy.sessions.list().iter().map(|s| s.user.clone()).collect();
        roles.extend(self.config.auth.users.iter().map(|u| u.name.clone()));
        roles.extend(self.config.cutover.fence_roles.iter().cloned());
        roles.sort();
        roles.dedup();
        roles
    }

    pub(super) fn on_source(&self) -> Vec<Arc<crate::session::registry::SessionInfo>> {
        self.proxy.sessions.on(&self.source.name)
    }

    pub(super) async fn execute(&mut self, force: bool) -> CutoverReport {
        let proxy = self.proxy.clone();
        let max_pause = self.config.cutover.max_pause;
        // Everything before the repoint can be abandoned: at an injected fault, an
        // error, max_pause or a shutdown. Cancellation safety: the journal holds
        // every side effect made so far, and the rollback undoes it.
        let stop = proxy.cutover.stop.notified();
        tokio::pin!(stop);
        stop.as_mut().enable();
        let outcome = if proxy.cutover.stopping.load(Ordering::SeqCst) {
            Err(CutoverError::Shutdown)
        } else {
            let steps = async {
                self.before_pause(force).await?;
                let deadline = Instant::now() + max_pause;
                match tokio::time::timeout_at(deadline.into(), self.paused_steps()).await {
                    Ok(r) => r,
                    Err(_) => Err(CutoverError::MaxPause(max_pause)),
                }
            };
            tokio::select! {
                r = steps => r,
                _ = &mut stop => Err(CutoverError::Shutdown),
            }
        };
        let outcome = match outcome {
            // In a fleet, one decision stands, whoever wrote it.
            Err(error) if self.fleet.is_some() && self.fleet_settle(&error).await => {
                tracing::warn!(error = %error, "fleet: this member failed after the fleet decided to commit: committing");
                Ok(())
            }
            other => other,
        };
        let mut report = match outcome {
            Ok(()) => {
                self.commit().await;
                self.fleet_finish().await;
                std::mem::replace(&mut self.report, CutoverReport::new(0, "", ""))
            }
            Err(error) => {
                let phase = self.phase;
                self.rollback(Failure { phase, error }).await
            }
        };
        if self.fleet.is_some() && report.fleet.is_none() && !report.committed() {
            std::mem::swap(&mut self.report, &mut report);
            self.fleet_finish().await;
            std::mem::swap(&mut self.report, &mut report);
        }
        report
    }

    /// Preflight and prewarm: nothing is paused yet.
    async fn before_pause(&mut self, force: bool) -> Result<(), CutoverError> {
        if self.fleet.as_ref().is_some_and(|f| !f.leader) {
            // A member: the leader checked and changes the databases.
            self.fleet_joined().await?;
            self.prewarm().await?;
            self.phase = Phase::Fleet;
            return self.fleet_prepared().await;
        }
        // A fleet's members join first: the preflight spares their backends.
        self.phase = Phase::Fleet;
        let members = self.fleet_plan().await?;
        self.phase = Phase::Preflight;
        self.preflight(force, members).await?;
        self.hooks.at("preflight").await?;

        // A target an earlier cutover fenced (the way back) takes logins and
        // writes again before sessions log in there.
        self.phase = Phase::OpenTarget;
        let t = Instant::now();
        let roles = self.roles();
        let admin_user = self.target.config.admin_user.clone();
        let db = &self.databases[0];
        // A standby's roles are the source's (and it cannot change them): only its
        // own postgresql.auto.conf may hold an earlier fence.
        let roles = if self.physical { Vec::new() } else { roles };
        self.report.opened_target = fence::open_target(&db.dst, &db.name, &roles, &admin_user, &mut self.journal, self.config.cutover.max_pause).await?;
        if !self.report.opened_target.is_empty() {
            self.record(Phase::OpenTarget, t);
        }

        self.prewarm().await?;
        if self.config.cutover.reverse_replication && !self.physical {
            self.phase = Phase::ReversePublication;
            let t = Instant::now();
            for db in &self.databases {
                if let Some((r, tables)) = &db.reverse {
                    reverse::publish(&db.dst, r, tables, &mut self.journal).await?;
                }
            }
            self.record(Phase::ReversePublication, t);
        }
        self.hooks.at("prewarm").await?;
        self.phase = Phase::Fleet;
        self.fleet_prepared().await
    }

    /// Prewarm: a logged-in target connection per session, the session's state
    /// copied onto it, before anything pauses.
    async fn prewarm(&mut self) -> Result<(), CutoverError> {
        self.phase = Phase::Prewarm;
        let t = Instant::now();
        self.sessions = self.on_source();
        let prewarm = sessions::prewarm(&self.sessions, &self.target, PREPARE_TIMEOUT).await;
        self.report.sessions_prepared = prewarm.copied;
        self.record(Phase::Prewarm, t);
        if !prewarm.failures.is_empty() {
            return Err(CutoverError::Refused(prewarm.failures.join("; ")));
        }
        Ok(())
    }

    /// From the pause to the point of no return, bounded by max_pause.
    async fn paused_steps(&mut self) -> Result<(), CutoverError> {
        let config = self.config.clone();
        let cut = &config.cutover;
        // Pause; new logins go to the target from now (the source is being fenced).
        self.phase = Phase::Drain;
        let proxy = self.proxy.clone();
        let watchdog = cut.max_pause + Duration::from_secs(30);
        // The gate closes before the fence begins: a pause that is not the
        // cutover's own (an operator's) refuses it with nothing done.
        let closed = crate::gate::close(&proxy, watchdog, Owner::Cutover)?;
        let closed_at = crate::fleet::now_us();
        self.paused = true;
        self.proxy.set_logins(Some(self.target.clone()));
        self.fleet_closed(closed_at).await?;
        let drain = crate::gate::drain(&proxy, closed, Some(cut.drain_timeout), cut.on_drain_timeout);
        if self.fleet.as_ref().is_some_and(|f| !f.leader) {
            // A member: drains, then waits for the leader's decision.
            let drained = drain.await?;
            self.report.sessions_cancelled = drained.cancelled.len();
            self.report.phases.push(report::Phase { name: Phase::Drain.as_str(), ms: ms(drained.drain) });
            self.phase = Phase::Fleet;
            return self.fleet_drained(drained.drain, drained.cancelled.len(), cut.max_pause).await;
        }
        // The fence runs while the drain does, all but its reload, which waits for
        // the drain (see fence::reload).
        let roles = self.roles();
        let databases: Vec<String> = self.databases.iter().map(|d| d.name.clone()).collect();
        let keep: Vec<i32> = self.proxy.sessions.pids_on(&self.source.name);
        let (journal, hooks, db, fleet) = (&mut self.journal, &self.hooks, &self.databases[0], &self.fleet);
        let admin_user = &self.source.config.admin_user;
        let fence = async {
            let started = Instant::now();
            hooks.at("pause").await?;
            if !cut.fence_source {
                return Ok((None, started.elapsed()));
            }
            // In a fleet, every member's gate is closed before the fence, and the
            // fence spares every member's backends.
            let others = Run::fleet_all_closed(fleet, cut.drain_timeout + Duration::from_secs(5)).await?;
            let keep: Vec<i32> = keep.iter().chain(&others.pids).copied().collect();
            let plan = fence::Plan { database: &db.name, roles: &roles, keep_pids: &keep, also_ours: &others.ports, admin_user, databases: &databases };
            fence::fence(&db.src, &plan, journal, hooks).await.map(|f| (Some(f), started.elapsed()))
        };
        let (drained, fenced) = tokio::join!(drain, fence);
        let drained = drained?;
        let drain_took = drained.drain;
        self.report.sessions_cancelled = drained.cancelled.len();
        self.report.phases.push(report::Phase { name: Phase::Drain.as_str(), ms: ms(drained.drain) });
        self.phase = Phase::Fence;
        let fence_took = match fenced? {
            (Some(f), took) => {
                self.report.fenced_roles = f.roles;
                self.report.terminated = f.terminated;
                self.report.fence = Some(f.kind);
                Some((took, f.kind))
            }
            (None, _) => None,
        };
        self.hooks.at("drain").await?;
        // The leader goes on once every member has drained.
        self.phase = Phase::Fleet;
        self.fleet_drained(drain_took, self.report.sessions_cancelled, cut.drain_timeout + Duration::from_secs(5)).await?;
        if let Some((took, kind)) = fence_took {
            // Read-only from here: nothing of the application's runs or waits on
            // the source any more (see fence::reload). A role-level fence has no
            // reload: its roles' new sessions are read-only, their others gone.
            self.phase = Phase::Fence;
            let started = Instant::now();
            if kind == fence::FenceKind::ServerWide {
                fence::reload(&self.databases[0].src, cut.max_pause, &self.hooks).await?;
            }
            self.report.phases.push(report::Phase { name: Phase::Fence.as_str(), ms: ms(took + started.elapsed()) });
        }
        if self.physical {
            return self.switchover_steps().await;
        }

        // Catch-up: every subscription from the source, in every database.
        self.phase = Phase::Catchup;
        let t = Instant::now();
        let catchup_deadline = Instant::now() + cut.catchup_timeout;
        let id = self.id.clone();
        let results = futures::future::join_all(self.databases.iter().map(|db| {
            let id = id.clone();
            async move {
                let lsn = catchup::mark(&db.src, &id).await?;
                let (after, by) = catchup::wait_replayed(&db.src, &db.dst, &db.subscriptions, &lsn, catchup_deadline).await?;
                let names: Vec<&str> = db.subscriptions.iter().map(|s| s.name.as_str()).collect();
                Ok::<_, CutoverError>(Catchup { database: db.name.clone(), subscription: names.join(","), lsn, reached_after_ms: ms(after), detected_by: by })
            }
        }))
        .await;
        for r in results {
            self.report.catchup.push(r?);
        }
        self.record(Phase::Catchup, t);
        self.hooks.at("catchup").await?;

        // Sequences: read on the source, set on the target, one round trip each.
        self.phase = Phase::Sequences;
        let t = Instant::now();
        let margin = cut.sequence_margin;
        let rehearse = self.rehearse;
        let copied = futures::future::join_all(self.databases.iter().map(|db| async move {
            let positions = sequences::read(&db.src, margin).await?;
            sequences::apply(&db.dst, &positions, rehearse).await
        }))
        .await;
        for c in copied {
            self.report.sequences_copied += c?;
        }
        self.record(Phase::Sequences, t);
        self.hooks.at("sequences").await?;
        // The way back starts here: the target has everything the source had, and
        // no client has written to it yet.
        if self.config.cutover.reverse_replication {
            self.phase = Phase::ReverseSlot;
            let t = Instant::now();
            for db in &self.databases {
                if let Some((r, _)) = &db.reverse {
                    reverse::slot(&db.dst, r, &mut self.journal).await?;
                }
            }
            self.record(Phase::ReverseSlot, t);
        }
        if self.rehearse {
            return Err(CutoverError::Rehearsal);
        }
        self.phase = Phase::Repoint;
        self.hooks.at("repoint").await?;
        // The point of no return, journaled first: a crash after this line rolls
        // forward at the next start.
        let subscriptions = self.databases.iter().flat_map(|db| db.subscriptions.iter().map(|s| (db.name.clone(), s.name.clone()))).collect();
        let reverse = self.databases.iter().filter_map(|db| db.reverse.as_ref().map(|(r, _)| r.clone())).collect();
        self.journal.record(Entry::Repoint { target: self.target.name.clone(), subscriptions, reverse }).await.map_err(|e| CutoverError::Journal(e.to_string()))?;
        // A fleet's point of no return is its decision in etcd: a crash before it
        // is read back as an abort at the next start, a crash after as a commit.
        self.phase = Phase::Fleet;
        self.fleet_decide().await
    }

    async fn preflight(&mut self, force: bool, members: fleet::Others) -> Result<(), CutoverError> {
        let cut = &self.config.cutover;
        let t = Instant::now();
        let mut names: BTreeSet<String> = cut.databases.iter().cloned().collect();
        names.extend(members.databases);
        names.extend(self.proxy.sessions.list().iter().map(|s| s.database.clone()));
        if names.is_empty() {
            return Err(CutoverError::Refused("no database to cut over: no session is open and [cutover] databases is empty".into()));
        }
        self.report.databases = names.iter().cloned().collect();
        for name in &names {
            let src = control::connect(&self.source.config, name, &self.application_name).await?;
            let dst = control::connect(&self.target.config, name, &self.application_name).await?;
            let subscriptions = catchup::subscriptions(&src, &dst).await?;
            self.databases.push(Database { name: name.clone(), src, dst, subscriptions, reverse: None });
        }
        let our_pids: Vec<i32> = self.proxy.sessions.pids_on(&self.source.name);
        let mut problems = Vec::new();
        let mut settings = preflight::Settings::of(&self.config, &self.source.config.admin_user);
        settings.members_pids = members.pids;
        settings.members_ports = members.ports;
        settings.quiescent_pids = self.proxy.sessions.quiescent_pids_on(&self.source.name);
        self.physical = physical::physical_mode(&self.source.name, &self.target.name, &self.target.config, &self.databases[0].dst).await?;
        if self.physical {
            self.report.kind = "physical";
            let checks = self.physical_preflight(&our_pids, &settings).await?;
            for c in checks {
                if !c.ok && (c.guards_data || !force) {
                    problems.push(c.to_string());
                }
                if c.ok && c.detail.starts_with("note: ") {
                    self.report.notes.push(c.detail.trim_start_matches("note: ").to_string());
                }
                self.report.preflight.push(c.to_string());
            }
            self.record(Phase::Preflight, t);
            if !problems.is_empty() {
                return Err(CutoverError::Refused(problems.join("; ")));
            }
            return Ok(());
        }
        for db in &mut self.databases {
            let checks = preflight::check_database(&db.name, &db.src, &db.dst, &db.subscriptions, &our_pids, &settings, Some(&self.proxy.cutover.lag)).await?;
            for c in checks {
                if !c.ok && (c.guards_data || !force) {
                    problems.push(c.to_string());
                }
                self.report.preflight.push(c.to_string());
            }
            // Only the subscriptions from the source are waited for and disabled.
            db.subscriptions.retain(|s| s.from_source);
        }
        if cut.reverse_replication {
            for (i, db) in self.databases.iter_mut().enumerate() {
                let oids: Vec<u32> = db.subscriptions.iter().map(|s| s.oid).collect();
                let tables = reverse::tables(&db.dst, &oids).await?;
                for c in reverse::check(&db.name, &db.src, &db.dst, &tables).await? {
                    if !c.ok {
                        problems.push(c.to_string());
                    }
                    self.report.preflight.push(c.to_string());
                }
                db.reverse = Some((reverse::Reverse::new(&self.id, i, &db.name), tables));
            }
        }
        self.record(Phase::Preflight, t);
        if !problems.is_empty() {
            return Err(CutoverError::Refused(problems.join("; ")));
        }
        Ok(())
    }

    /// After the point of no return: repoint, resume, let sessions move, disable the
    /// subscriptions. Nothing here rolls back.
    async fn commit(&mut self) {
        // Past the point of no return a fault cannot roll back: only a crash here
        // (a test's abort) means anything, and the next start rolls forward.
        let _ = self.hooks.at("repointed").await;
        if self.physical {
            self.promote().await;
        }
        let t = Instant::now();
        self.proxy.set_active(self.target.clone());
        if let Some(path) = crate::state::path(&self.config, self.proxy.config_path().as_deref()) {
            if let Err(e) = crate::state::save(&path, &self.target.name) {
                tracing::error!(file = %path.display(), error = %e, "could not record the new active backend");
            }
        }
        self.record(Phase::Repoint, t);
        self.resume();
        self.report.outcome = Outcome::Committed;

        // Sessions adopt their prepared connections at their next request; idle ones
        // are asked to now. Their answers make the report.
        let t = Instant::now();
        let moves = sessions::migrate(&self.sessions, MOVE_TIMEOUT).await;
        self.report.sessions_moved = moves.moved;
        self.report.sessions_closed = moves.closed.len();
        self.report.closed = moves.closed;
        self.report.sessions_pending = moves.pending;
        self.record(Phase::MoveSessions, t);

        // After the switch, a stray write on the source must not replicate over new
        // data on the target.
        let t = Instant::now();
        for db in &self.databases {
            for sub in &db.subscriptions {
                let sql = format!("ALTER SUBSCRIPTION {} DISABLE", crate::session::migrate::quote_ident(&sub.name));
                if let Err(e) = db.dst.batch_execute(&sql).await {
                    tracing::error!(database = %db.name, subscription = %sub.name, error = %control::describe(&e), "could not disable the subscription on the new active backend");
                }
            }
        }
        self.record(Phase::DisableSubscriptions, t);

        // The way back: the old database subscribes to the new one.
        if self.config.cutover.reverse_replication {
            let t = Instant::now();
            for db in &self.databases {
                let Some((r, _)) = &db.reverse else { continue };
                let conninfo = reverse::conninfo(&self.target.config, self.config.cutover.reverse_conninfo.as_deref(), &db.name);
                let line = match reverse::subscribe(&db.src, r, &conninfo).await {
                    Ok(()) => format!("{}: subscription {} on {} streams from slot {} on {}", db.name, r.name, self.source.name, r.name, self.target.name),
                    Err(e) => {
                        tracing::error!(database = %db.name, error = %e, "could not create the reverse subscription");
                        format!(
                            "{}: FAILED ({e}); slot {} on {} keeps the writes since the switch: run on {} (database {}): {}",
                            db.name,
                            r.name,
                            self.target.name,
                            self.source.name,
                            db.name,
                            reverse::subscription_sql(r, "<connection to the target>")
                        )
                    }
                };
                self.report.reverse_replication.push(line);
            }
            self.record(Phase::ReverseSubscription, t);
        }
        // The forward subscriptions have done their work: dropped, with their slots
        // on the old source, or those slots would pin its WAL for ever and the
        // next cutover back and forth would find a disabled subscription in its way.
        let t = Instant::now();
        for db in &self.databases {
            for sub in &db.subscriptions {
                let note = match reverse::drop_forward(&db.src, &db.dst, sub).await {
                    Ok(()) => format!("{}: subscription {} on {} dropped, and its slot on {}", db.name, sub.name, self.target.name, self.source.name),
                    Err(e) => {
                        tracing::warn!(database = %db.name, subscription = %sub.name, error = %e, "could not drop the old subscription");
                        format!("{}: subscription {} on {} (disabled) could not be dropped: {e}; `pgcutover cleanup` removes it and its slot", db.name, sub.name, self.target.name)
                    }
                };
                self.report.notes.push(note);
            }
        }
        self.record(Phase::DropSubscriptions, t);
        let journal = std::mem::replace(&mut self.journal, Journal::detached());
        if let Err(e) = journal.finish("committed") {
            tracing::error!(error = %e, "could not close the cutover journal");
        }
    }

    /// Opens the gate if this cutover closed it, and measures the holds.
    fn resume(&mut self) {
        self.proxy.set_logins(None);
        if !self.paused {
            return;
        }
        let held: Vec<Duration> = self.proxy.sessions.list().iter().filter_map(|s| s.held_since()).map(|t| t.elapsed().unwrap_or_default()).collect();
        if let Ok(paused) = self.proxy.gate().resume_as(Owner::Cutover) {
            self.report.pause_ms = ms(paused);
        }
        if let Some(f) = &mut self.fleet {
            f.mine.gate_opened_at = Some(crate::fleet::now_us());
        }
        self.paused = false;
        self.report.held_requests = held.len() as u64;
        self.report.longest_hold_ms = ms(held.into_iter().max().unwrap_or_default());
    }

    /// Leaves everything on the source: the fence undone from the journal (on fresh
    /// connections, retried), the gate open, prepared connections closed.
    async fn rollback(&mut self, f: Failure) -> CutoverReport {
        let rollback_started = Instant::now();
        if matches!(f.error, CutoverError::Rehearsal) {
            tracing::info!("rehearsal complete; rolling back on purpose");
        } else {
            tracing::warn!(phase = %f.phase, kind = f.error.kind(), reason = %f.error, "cutover failed; rolling back");
        }
        // A database's refusal says in which phase it came.
        let mut reason = match &f.error {
            CutoverError::Database(_) => format!("{}: {}", f.phase, f.error),
            _ => f.error.to_string(),
        };
        let entries = self.journal.entries().to_vec();
        let journal = std::mem::replace(&mut self.journal, Journal::detached());
        let undone = undo(&self.source.config, Some(&self.target.config), &entries, UNDO_TIMEOUT).await;
        let clean = undone.is_ok();
        match undone {
            Ok(()) => {
                if let Err(e) = journal.finish("rolled back") {
                    tracing::error!(error = %e, "could not close the cutover journal");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "UNDO FAILED: the source may still be fenced; retrying in the background, and the next start finishes it from the journal");
                reason = format!("{reason}; and undoing the fence failed so far: {e} (retrying)");
                let (source, target) = (self.source.config.clone(), self.target.config.clone());
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        if undo(&source, Some(&target), &entries, UNDO_TIMEOUT).await.is_ok() {
                            tracing::info!("the source's fence is undone");
                            let _ = journal.finish("rolled back");
                            return;
                        }
                    }
                });
            }
        }
        // A fleet's members resume once the source is writable again.
        self.fleet_unfenced(clean).await;
        self.resume();
        sessions::discard(&self.sessions);
        let mut report = std::mem::replace(&mut self.report, CutoverReport::new(0, "", ""));
        // A rehearsal whose undo failed is reported as the rollback it became.
        if matches!(f.error, CutoverError::Rehearsal) && clean {
            // What the real cutover would have cost, the rollback's undo not counted.
            report.outcome = Outcome::Rehearsed;
            report.phases.push(report::Phase { name: Phase::Rollback.as_str(), ms: ms(rollback_started.elapsed()) });
            return report;
        }
        report.outcome = if f.phase == Phase::Preflight { Outcome::Refused } else { Outcome::RolledBack };
        report.failed_phase = Some(f.phase.as_str().into());
        report.reason = Some(reason);
        report
    }
}
