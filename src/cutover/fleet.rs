//! A fleet cutover: this instance's part in it, as its leader or as a member.
//!
//! The leader (the instance asked for the cutover) takes the fleet's lock, runs the
//! preflight and publishes the plan: the members alive now. Every member (the
//! leader too) prewarms and says `prepared`; the leader says pause; every member
//! closes its gate (`closed`, with its backends on the source, so the fence spares
//! them) and drains (`drained`). The leader fences once every gate is closed,
//! waits for every drain, catches up and copies sequences once, and writes the
//! decision with the active backend in one etcd transaction, taken only while it
//! still holds the lock. Members apply the decision and say `done`.
//!
//! Before the decision any failure aborts: a member that fails says so, a member
//! whose lease expires is gone, a leader whose lock expires is gone (a member then
//! writes the abort and, from the journal the leader mirrored to etcd, undoes the
//! fence). An abort is itself a transaction that succeeds only while nothing is
//! decided, so exactly one decision stands, and every member follows it — a member
//! that cannot learn it keeps its gate closed until it can (or its watchdog).

use std::sync::Arc;
use std::time::Duration;

use super::journal::Entry;
use super::report::{ms, FleetReport, MemberOutcome};
use super::{CutoverError, Run, MOVE_TIMEOUT, PREPARE_TIMEOUT, UNDO_TIMEOUT};
use crate::fleet::{now_us, Fleet, LockGuard, Plan, Progress, Report, View};

/// The other members' sessions: their backends on the source (pids, and local
/// ports of connections logging in or out), which the preflight and the fence
/// spare, and their databases, which the leader cuts over too.
#[derive(Debug, Default)]
pub(super) struct Others {
    pub pids: Vec<i32>,
    pub ports: Vec<i32>,
    pub databases: Vec<String>,
}

/// This instance's part in a fleet cutover.
pub(super) struct FleetRun {
    pub fleet: Arc<Fleet>,
    pub leader: bool,
    pub plan: Plan,
    /// The leader's lock: released when the run ends.
    pub lock: Option<LockGuard>,
    /// What this member reported last.
    pub mine: Report,
}

impl FleetRun {
    pub fn lead(fleet: Arc<Fleet>, lock: LockGuard, id: &str, source: &str, target: &str, rehearse: bool) -> FleetRun {
        let plan = Plan { id: id.into(), leader: fleet.name.clone(), source: source.into(), target: target.into(), members: Vec::new(), rehearse };
        FleetRun { fleet, leader: true, plan, lock: Some(lock), mine: Report::default() }
    }

    pub fn follow(fleet: Arc<Fleet>, plan: Plan) -> FleetRun {
        FleetRun { fleet, leader: false, plan, lock: None, mine: Report::default() }
    }

    /// Why the cutover cannot go on, as far as the other members tell: one failed,
    /// one left, someone decided already, the leader is gone.
    fn trouble(&self, view: &View) -> Option<String> {
        let id = &self.plan.id;
        let board = view.board(id);
        if let Some(d) = board.and_then(|b| b.decision.as_ref()) {
            if !d.commit {
                return Some(format!("{} aborted the cutover: {}", d.by, d.reason.clone().unwrap_or_default()));
            }
        }
        for m in self.plan.members.iter().filter(|m| **m != self.fleet.name) {
            if let Some(r) = board.and_then(|b| b.reports.get(m)) {
                if r.progress == Some(Progress::Failed) {
                    return Some(format!("member {m} failed: {}", r.reason.clone().unwrap_or_default()));
                }
            }
            if view.connected && !view.members.contains_key(m) {
                return Some(format!("member {m} left the fleet (its lease expired)"));
            }
        }
        if !self.leader && view.leader_gone(id) && board.and_then(|b| b.decision.as_ref()).is_none() {
            return Some(format!("the leader {} left the fleet before deciding", self.plan.leader));
        }
        None
    }

    /// Waits until every other member has reported at least `progress`.
    async fn all(&self, progress: Progress, bound: Duration) -> Result<View, CutoverError> {
        let what = format!("every member {progress:?}").to_lowercase();
        self.fleet
            .wait(bound, &what, |v| {
                if let Some(t) = self.trouble(v) {
                    return Some(Err(t));
                }
                let board = v.board(&self.plan.id)?;
                let mut others = self.plan.members.iter().filter(|m| **m != self.fleet.name);
                let missing = others.any(|m| board.reports.get(m).and_then(|r| r.progress).is_none_or(|p| p < progress));
                (!missing).then(|| Ok(v.clone()))
            })
            .await
            .map_err(CutoverError::Fleet)
    }

    /// What the other members last reported of their sessions.
    fn others(&self, view: &View) -> Others {
        let mut o = Others::default();
        if let Some(board) = view.board(&self.plan.id) {
            for r in board.reports.iter().filter(|(n, _)| **n != self.fleet.name).map(|(_, r)| r) {
                o.pids.extend(&r.pids);
                o.ports.extend(&r.ports);
                o.databases.extend(r.databases.iter().cloned());
            }
        }
        o
    }

    /// Reports this member's progress. The leader waits for no one on its own
    /// account: it writes only its end (failed or done), which the report reads;
    /// its steps inside the pause cost no etcd round trip.
    async fn say(&mut self, progress: Progress) -> Result<(), CutoverError> {
        self.mine.progress = Some(progress);
        if self.leader && !matches!(progress, Progress::Failed | Progress::Done) {
            return Ok(());
        }
        self.fleet.report(&self.plan.id, &self.mine).await.map_err(|e| CutoverError::Fleet(format!("{e:#}")))
    }
}

impl Run {
    /// The leader, before its preflight: the plan names the members alive now;
    /// each says it joined, with its sessions' backends and databases.
    pub(super) async fn fleet_plan(&mut self) -> Result<Others, CutoverError> {
        let Some(f) = &mut self.fleet else { return Ok(Default::default()) };
        if !f.leader {
            return Ok(Default::default());
        }
        let view = f.fleet.view();
        let mut members: Vec<String> = view.members.keys().cloned().collect();
        if !members.contains(&f.fleet.name) {
            members.push(f.fleet.name.clone());
        }
        for m in view.members.values() {
            if m.active != self.source.name {
                return Err(CutoverError::Refused(format!("member {} serves on {}, not on {}", m.name, m.active, self.source.name)));
            }
        }
        f.plan.members = members;
        // The journal's every later entry is in etcd before its side effect.
        let (fleet, id) = (f.fleet.clone(), f.plan.id.clone());
        self.journal.record(Entry::Fleet { id: id.clone() }).await.map_err(|e| CutoverError::Journal(e.to_string()))?;
        let mirror: super::journal::Mirror = Box::new(move |entries| {
            let (fleet, id) = (fleet.clone(), id.clone());
            Box::pin(async move { fleet.publish_journal(&id, &entries).await })
        });
        self.journal.mirror_to(mirror).await.map_err(|e| CutoverError::Journal(e.to_string()))?;
        f.fleet.publish_plan(&f.plan).await.map_err(|e| CutoverError::Fleet(format!("{e:#}")))?;
        self.fleet_joined().await?;
        let Some(f) = &self.fleet else { return Ok(Default::default()) };
        let view = f.all(Progress::Joined, PREPARE_TIMEOUT).await?;
        Ok(f.others(&view))
    }

    /// Says this member has the plan, with its backends on the source.
    pub(super) async fn fleet_joined(&mut self) -> Result<(), CutoverError> {
        let sessions = self.on_source();
        let pids: Vec<i32> = sessions.iter().map(|s| s.backend().key.pid).collect();
        let mut databases: Vec<String> = sessions.iter().map(|s| s.database.clone()).collect();
        databases.sort();
        databases.dedup();
        let Some(f) = &mut self.fleet else { return Ok(()) };
        f.mine.pids = pids;
        f.mine.databases = databases;
        f.mine.ports = crate::backend::ports::ours_since(std::time::Instant::now());
        f.say(Progress::Joined).await
    }

    /// After the prewarm: says so, and waits for the pause (a member) or for every
    /// member to be prepared (the leader).
    pub(super) async fn fleet_prepared(&mut self) -> Result<(), CutoverError> {
        let prepared = self.report.sessions_prepared;
        let Some(f) = &mut self.fleet else { return Ok(()) };
        f.mine.sessions_prepared = prepared;
        f.say(Progress::Prepared).await?;
        let bound = PREPARE_TIMEOUT * 2;
        if f.leader {
            f.all(Progress::Prepared, bound).await?;
            return f.fleet.publish_pause(&f.plan.id).await.map_err(|e| CutoverError::Fleet(format!("{e:#}")));
        }
        let f = &*f;
        f.fleet
            .wait(bound, "the leader's pause", |v| {
                if let Some(t) = f.trouble(v) {
                    return Some(Err(t));
                }
                v.board(&f.plan.id).is_some_and(|b| b.paused).then_some(Ok(()))
            })
            .await
            .map_err(CutoverError::Fleet)
    }

    /// The gate is closed: says so, with this instance's backends on the source.
    pub(super) async fn fleet_closed(&mut self, closed_at: u64) -> Result<(), CutoverError> {
        let pids: Vec<i32> = self.proxy.sessions.pids_on(&self.source.name);
        let Some(f) = &mut self.fleet else { return Ok(()) };
        f.mine.pids = pids;
        f.mine.ports = crate::backend::ports::ours_since(std::time::Instant::now());
        f.mine.gate_closed_at = Some(closed_at);
        f.say(Progress::Closed).await
    }

    /// The leader, before it fences: every gate is closed. Returns the other
    /// members' backends on the source (pids, local ports), which the fence spares.
    pub(super) async fn fleet_all_closed(fleet: &Option<FleetRun>, bound: Duration) -> Result<Others, CutoverError> {
        let Some(f) = fleet else { return Ok(Others::default()) };
        let view = f.all(Progress::Closed, bound).await?;
        Ok(f.others(&view))
    }

    /// Drained: says so; the leader then waits for every member's drain, a member
    /// for the decision.
    pub(super) async fn fleet_drained(&mut self, drain: Duration, cancelled: usize, bound: Duration) -> Result<(), CutoverError> {
        let Some(f) = &mut self.fleet else { return Ok(()) };
        f.mine.drain_ms = ms(drain);
        f.mine.cancelled = cancelled;
        f.say(Progress::Drained).await?;
        if f.leader {
            f.all(Progress::Drained, bound).await?;
            return Ok(());
        }
        let f = &*f;
        // Ok(true): the leader ended a rehearsal, which this member rolls back as one.
        let rehearsed = f
            .fleet
            .wait(Duration::from_secs(86_400), "the decision", |v| {
                let d = v.board(&f.plan.id).and_then(|b| b.decision.clone());
                match d {
                    Some(d) if d.commit => Some(Ok(false)),
                    Some(d) if d.rehearsal => Some(Ok(true)),
                    _ => f.trouble(v).map(Err),
                }
            })
            .await
            .map_err(CutoverError::Fleet)?;
        if rehearsed {
            return Err(CutoverError::Rehearsal);
        }
        Ok(())
    }

    /// The leader's decision to commit, with the active backend, in one etcd
    /// transaction that holds only while the lock is still ours.
    pub(super) async fn fleet_decide(&mut self) -> Result<(), CutoverError> {
        let target = self.target.name.clone();
        let Some(f) = &mut self.fleet else { return Ok(()) };
        let Some(lock) = &f.lock else { return Ok(()) };
        let d = f.fleet.commit(&f.plan.id, lock, &target).await.map_err(|e| CutoverError::Fleet(format!("{e:#}")))?;
        if d.commit {
            Ok(())
        } else {
            Err(CutoverError::Fleet(format!("{} aborted the cutover first: {}", d.by, d.reason.unwrap_or_default())))
        }
    }

    /// After a failure: aborts unless the fleet decided already, and says what
    /// stands (true: commit). A member that cannot reach etcd keeps trying, its
    /// gate closed, until its watchdog: it must not resume on a source the fleet
    /// may have left.
    pub(super) async fn fleet_settle(&mut self, error: &CutoverError) -> bool {
        let source = self.source.name.clone();
        let watchdog = self.config.cutover.max_pause + Duration::from_secs(30);
        let Some(f) = &mut self.fleet else { return false };
        if !matches!(error, CutoverError::Fleet(_)) && !matches!(error, CutoverError::Rehearsal) {
            f.mine.reason = Some(error.to_string());
            let _ = f.say(Progress::Failed).await;
        }
        let deadline = tokio::time::Instant::now() + watchdog;
        loop {
            let rehearsal = f.leader && matches!(error, CutoverError::Rehearsal);
            match f.fleet.abort(&f.plan.id, &source, &error.to_string(), rehearsal).await {
                Ok(d) => return d.commit,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    tracing::error!(error = %e, "fleet: the decision cannot be read; resuming on the source (fenced if the fleet moved)");
                    return false;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "fleet: the decision cannot be read yet; the gate stays closed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// After an abort, before the gate opens: the source's fence is undone. The
    /// leader has just undone its own and says so; a member waits for that, or
    /// undoes it from the mirrored journal if the leader is gone.
    pub(super) async fn fleet_unfenced(&mut self, clean: bool) {
        let (source, target) = (self.source.config.clone(), self.target.config.clone());
        let Some(f) = &mut self.fleet else { return };
        if f.leader {
            if !clean {
                return;
            }
            if let Err(e) = f.fleet.publish_undone(&f.plan.id).await {
                tracing::warn!(error = %e, "fleet: could not say the fence is undone; members wait for it until their bound");
            }
            return;
        }
        let id = f.plan.id.clone();
        let seen = f
            .fleet
            .wait(UNDO_TIMEOUT, "the leader's undo", |v| {
                let b = v.board(&id);
                if b.is_some_and(|b| b.undone || b.journal.is_empty()) {
                    return Some(Ok(None));
                }
                v.leader_gone(&id).then(|| Ok(b.map(|b| b.journal.clone())))
            })
            .await;
        if let Ok(Some(entries)) = seen {
            tracing::warn!(leader = %f.plan.leader, "fleet: the leader is gone; undoing its fence from the journal it left in etcd");
            match super::recovery::undo(&source, Some(&target), &entries, UNDO_TIMEOUT).await {
                Ok(()) => {
                    let _ = f.fleet.publish_undone(&id).await;
                }
                Err(e) => tracing::error!(error = %e, "fleet: could not undo the leader's fence; the leader's next start does"),
            }
        }
    }

    /// The end of this member's part: its outcome; the leader then collects every
    /// member's and releases the lock.
    pub(super) async fn fleet_finish(&mut self) {
        let (outcome, held, longest, moved) = (self.report.outcome.as_str().to_string(), self.report.held_requests, self.report.longest_hold_ms, self.report.sessions_moved);
        let reason = self.report.reason.clone();
        let Some(f) = &mut self.fleet else { return };
        // A gate that closed and never opened through `resume` (it could not): now.
        if f.mine.gate_closed_at.is_some() && f.mine.gate_opened_at.is_none() {
            f.mine.gate_opened_at = Some(now_us());
        }
        f.mine.held_requests = held;
        f.mine.longest_hold_ms = longest;
        f.mine.sessions_moved = moved;
        f.mine.outcome = Some(outcome);
        f.mine.reason = f.mine.reason.clone().or(reason);
        if let Err(e) = f.say(Progress::Done).await {
            tracing::warn!(error = %e, "fleet: could not report this member's outcome");
        }
        if !f.leader {
            return;
        }
        let id = f.plan.id.clone();
        let members = f.plan.members.clone();
        let view = f
            .fleet
            .wait(MOVE_TIMEOUT, "every member's outcome", |v| {
                let b = v.board(&id)?;
                let all = members.iter().all(|m| b.reports.get(m).is_some_and(|r| r.outcome.is_some()) || (v.connected && !v.members.contains_key(m)));
                all.then(|| Ok(v.clone()))
            })
            .await
            .unwrap_or_else(|_| f.fleet.view());
        let board = view.board(&id).cloned().unwrap_or_default();
        let mut first = u64::MAX;
        let mut last = 0;
        let members = members
            .iter()
            .map(|name| {
                let r = board.reports.get(name).cloned().unwrap_or_default();
                if let (Some(c), Some(o)) = (r.gate_closed_at, r.gate_opened_at) {
                    first = first.min(c);
                    last = last.max(o);
                }
                let outcome = match (&r.outcome, r.progress) {
                    (Some(o), _) => o.clone(),
                    (None, Some(Progress::Failed)) => format!("failed: {}", r.reason.clone().unwrap_or_default()),
                    (None, Some(p)) => format!("no outcome (last said {p:?}; left the fleet?)").to_lowercase(),
                    (None, None) => "no report".into(),
                };
                let pause = match (r.gate_closed_at, r.gate_opened_at) {
                    (Some(c), Some(o)) => o.saturating_sub(c) as f64 / 1000.0,
                    _ => 0.0,
                };
                MemberOutcome { name: name.clone(), outcome, drain_ms: r.drain_ms, pause_ms: pause, held_requests: r.held_requests, longest_hold_ms: r.longest_hold_ms, sessions_moved: r.sessions_moved }
            })
            .collect();
        let decision = match &board.decision {
            Some(d) if d.commit => format!("commit to {}", d.active),
            Some(d) if d.rehearsal => format!("rehearsed ({}): rolled back on purpose", d.by),
            Some(d) => format!("abort ({}): {}", d.by, d.reason.clone().unwrap_or_default()),
            None => "none".into(),
        };
        let pause_ms = if last >= first { (last - first) as f64 / 1000.0 } else { 0.0 };
        self.report.fleet = Some(FleetReport { leader: f.fleet.name.clone(), pause_ms, decision, members });
        f.fleet.prune(&id).await;
        f.lock = None;
    }
}
