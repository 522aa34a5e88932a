//! The cutover report: what happened, phase by phase, for the CLI, `--json`, SHOW
//! CUTOVER and the log.

use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Committed,
    RolledBack,
    /// Refused before anything was touched (preflight, another cutover running).
    Refused,
    /// A rehearsal: every phase up to the point of no return ran, then it rolled
    /// back on purpose.
    Rehearsed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Committed => "committed",
            Outcome::RolledBack => "rolled back",
            Outcome::Refused => "refused",
            Outcome::Rehearsed => "rehearsed",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: &'static str,
    pub ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Catchup {
    pub database: String,
    pub subscription: String,
    pub lsn: String,
    pub reached_after_ms: f64,
    /// `replay_lsn` (source) or `latest_end_lsn` (target).
    pub detected_by: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct CutoverReport {
    pub id: u64,
    pub from: String,
    pub to: String,
    /// "logical" (to a subscriber) or "physical" (a switchover to a standby).
    pub kind: &'static str,
    pub started_at: String,
    pub outcome: Outcome,
    pub failed_phase: Option<String>,
    pub reason: Option<String>,
    pub phases: Vec<Phase>,
    /// From the gate closing to the gate opening.
    pub pause_ms: f64,
    pub databases: Vec<String>,
    /// Sessions whose state was copied onto a target connection before the pause.
    pub sessions_prepared: usize,
    pub sessions_moved: usize,
    /// Sessions that had not said they moved when the report was written (they
    /// move at their next request).
    pub sessions_pending: usize,
    pub sessions_cancelled: usize,
    pub sessions_closed: usize,
    pub closed: Vec<String>,
    /// Roles whose LOGIN the fence took on the source.
    pub fenced_roles: Vec<String>,
    /// Which fence ran (None: none did).
    pub fence: Option<super::fence::FenceKind>,
    /// Backends on the source that did not come through the proxy, terminated by the fence.
    pub terminated: usize,
    pub held_requests: u64,
    pub longest_hold_ms: f64,
    pub sequences_copied: u64,
    pub catchup: Vec<Catchup>,
    pub preflight: Vec<String>,
    /// What a cutover to a target fenced by an earlier one did to open it.
    pub opened_target: Vec<String>,
    /// The way back, per database: the source's subscription to the target, or
    /// why it could not be made and the statement that would make it.
    pub reverse_replication: Vec<String>,
    /// What the operator should know: what was not done and why, what to do next.
    pub notes: Vec<String>,
    /// A fleet cutover: every member's part, and the fleet's pause.
    pub fleet: Option<FleetReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    /// The instance that led (took the lock, fenced, caught up, decided).
    pub leader: String,
    /// First gate closed → last gate open, over every member (wall clocks).
    pub pause_ms: f64,
    pub decision: String,
    pub members: Vec<MemberOutcome>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemberOutcome {
    pub name: String,
    /// "committed", "rolled back", "rehearsed", "failed: …", or "no report".
    pub outcome: String,
    pub drain_ms: f64,
    pub pause_ms: f64,
    pub held_requests: u64,
    pub longest_hold_ms: f64,
    pub sessions_moved: usize,
}

pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

impl CutoverReport {
    pub fn new(id: u64, from: &str, to: &str) -> CutoverReport {
        CutoverReport {
            id,
            from: from.into(),
            to: to.into(),
            kind: "logical",
            started_at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            outcome: Outcome::Refused,
            failed_phase: None,
            reason: None,
            phases: Vec::new(),
            pause_ms: 0.0,
            databases: Vec::new(),
            sessions_prepared: 0,
            sessions_moved: 0,
            sessions_pending: 0,
            sessions_cancelled: 0,
            sessions_closed: 0,
            closed: Vec::new(),
            fenced_roles: Vec::new(),
            fence: None,
            terminated: 0,
            held_requests: 0,
            longest_hold_ms: 0.0,
            sequences_copied: 0,
            catchup: Vec::new(),
            preflight: Vec::new(),
            opened_target: Vec::new(),
            reverse_replication: Vec::new(),
            notes: Vec::new(),
            fleet: None,
        }
    }

    pub fn committed(&self) -> bool {
        self.outcome == Outcome::Committed
    }

    /// `name | value` pairs for the console and the CLI.
    pub fn pairs(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = vec![
            ("outcome".into(), self.outcome.as_str().into()),
            ("from".into(), self.from.clone()),
            ("to".into(), self.to.clone()),
            ("kind".into(), self.kind.into()),
            ("started_at".into(), self.started_at.clone()),
            ("failed_phase".into(), self.failed_phase.clone().unwrap_or_default()),
            ("reason".into(), self.reason.clone().unwrap_or_default()),
            ("pause_ms".into(), format!("{:.3}", self.pause_ms)),
        ];
        for p in &self.phases {
            v.push((format!("phase_{}_ms", p.name), format!("{:.3}", p.ms)));
        }
        v.extend([
            ("databases".into(), self.databases.join(",")),
            ("sessions_prepared".into(), self.sessions_prepared.to_string()),
            ("sessions_moved".into(), self.sessions_moved.to_string()),
            ("sessions_pending".into(), self.sessions_pending.to_string()),
            ("sessions_cancelled".into(), self.sessions_cancelled.to_string()),
            ("sessions_closed".into(), self.sessions_closed.to_string()),
            ("fenced_roles".into(), self.fenced_roles.join(",")),
            ("fence".into(), self.fence.map(|k| k.as_str()).unwrap_or("none").to_string()),
            ("terminated".into(), self.terminated.to_string()),
            ("held_requests".into(), self.held_requests.to_string()),
            ("longest_hold_ms".into(), format!("{:.3}", self.longest_hold_ms)),
            ("sequences_copied".into(), self.sequences_copied.to_string()),
        ]);
        for c in &self.catchup {
            v.push((format!("catchup_{}", c.database), format!("{} reached after {:.3} ms ({})", c.lsn, c.reached_after_ms, c.detected_by)));
        }
        if !self.opened_target.is_empty() {
            v.push(("opened_target".into(), self.opened_target.join("; ")));
        }
        for (i, r) in self.reverse_replication.iter().enumerate() {
            v.push((format!("reverse_replication_{}", i + 1), r.clone()));
        }
        for (i, n) in self.notes.iter().enumerate() {
            v.push((format!("note_{}", i + 1), n.clone()));
        }
        if let Some(f) = &self.fleet {
            v.push(("fleet_leader".into(), f.leader.clone()));
            v.push(("fleet_decision".into(), f.decision.clone()));
            v.push(("fleet_pause_ms".into(), format!("{:.3}", f.pause_ms)));
            for m in &f.members {
                v.push((
                    format!("member_{}", m.name),
                    format!(
                        "{}: drain {:.3} ms, pause {:.3} ms, {} held (longest {:.3} ms), {} moved",
                        m.outcome, m.drain_ms, m.pause_ms, m.held_requests, m.longest_hold_ms, m.sessions_moved
                    ),
                ));
            }
        }
        for (i, p) in self.preflight.iter().enumerate() {
            v.push((format!("preflight_{}", i + 1), p.clone()));
        }
        v.push(("json".into(), serde_json::to_string(self).unwrap_or_default()));
        v
    }
}
