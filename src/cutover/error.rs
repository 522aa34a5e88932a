//! The cutover's phases and what can go wrong in them, typed: the report, the log
//! and the metrics name a phase and an error kind, never a loose string pair.

use std::time::Duration;

use serde::Serialize;

use crate::gate::PauseError;

/// A phase of the cutover, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Start,
    Preflight,
    Prewarm,
    Drain,
    Fence,
    Catchup,
    Sequences,
    Repoint,
    MoveSessions,
    DisableSubscriptions,
    /// After the switch: the forward subscriptions and their slots are dropped.
    DropSubscriptions,
    /// A target fenced by an earlier cutover is opened to the application.
    OpenTarget,
    ReversePublication,
    ReverseSlot,
    ReverseSubscription,
    Promote,
    /// A fleet: waiting for the other members, and the leader's decision.
    Fleet,
    /// A rehearsal's (or a failure's) way back.
    Rollback,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Start => "start",
            Phase::Preflight => "preflight",
            Phase::Prewarm => "prewarm",
            Phase::Drain => "drain",
            Phase::Fence => "fence",
            Phase::Catchup => "catchup",
            Phase::Sequences => "sequences",
            Phase::Repoint => "repoint",
            Phase::MoveSessions => "move_sessions",
            Phase::DisableSubscriptions => "disable_subscription",
            Phase::DropSubscriptions => "drop_subscriptions",
            Phase::Rollback => "rollback",
            Phase::OpenTarget => "open_target",
            Phase::ReversePublication => "reverse_publication",
            Phase::ReverseSlot => "reverse_slot",
            Phase::ReverseSubscription => "reverse_subscription",
            Phase::Promote => "promote",
            Phase::Fleet => "fleet",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CutoverError {
    #[error("a cutover is already running")]
    Busy,
    /// Not a failure: a rehearsal stops here and rolls back on purpose.
    #[error("rehearsal: stopped before the point of no return")]
    Rehearsal,
    #[error("{}", no_backend(.0, .1))]
    NoBackend(String, Vec<String>),
    #[error("{0} is already the active backend")]
    AlreadyActive(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Drain(#[from] PauseError),
    #[error("{0}")]
    Database(String),
    #[error("{what} did not answer within {bound:?}")]
    Timeout { what: String, bound: Duration },
    #[error("the cutover would have paused traffic longer than max_pause ({0:?})")]
    MaxPause(Duration),
    #[error("the proxy is shutting down")]
    Shutdown,
    #[error("the journal of side effects cannot be written: {0}")]
    Journal(String),
    /// The fleet could not go on (a member failed or died, etcd is unreachable)
    /// or decided to abort.
    #[error("fleet: {0}")]
    Fleet(String),
    #[error("a fault injected by a test hook at {0}")]
    Injected(&'static str),
}

/// What to say of a target that names no backend (`known`: the configured ones).
pub fn no_backend(name: &str, known: &[String]) -> String {
    if name.is_empty() {
        "no target: pass --to or set [cutover] target".to_string()
    } else {
        format!("no backend named {name:?}; the backends are: {}", known.join(", "))
    }
}

impl CutoverError {
    /// A label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            CutoverError::Busy => "busy",
            CutoverError::Rehearsal => "rehearsal",
            CutoverError::NoBackend(..) => "no_backend",
            CutoverError::AlreadyActive(_) => "already_active",
            CutoverError::Refused(_) => "refused",
            CutoverError::Drain(_) => "drain",
            CutoverError::Database(_) => "database",
            CutoverError::Timeout { .. } => "timeout",
            CutoverError::MaxPause(_) => "max_pause",
            CutoverError::Shutdown => "shutdown",
            CutoverError::Journal(_) => "journal",
            CutoverError::Fleet(_) => "fleet",
            CutoverError::Injected(_) => "injected",
        }
    }
}

impl From<anyhow::Error> for CutoverError {
    fn from(e: anyhow::Error) -> Self {
        // A database error says what the server said, never a bare "db error".
        match e.chain().find_map(|c| c.downcast_ref::<tokio_postgres::Error>()) {
            Some(db) if db.as_db_error().is_some() => {
                let context: Vec<String> = e.chain().take_while(|c| c.downcast_ref::<tokio_postgres::Error>().is_none()).map(|c| c.to_string()).collect();
                let described = crate::cutover::control::describe(db);
                CutoverError::Database(if context.is_empty() { described } else { format!("{}: {described}", context.join(": ")) })
            }
            _ => CutoverError::Database(format!("{e:#}")),
        }
    }
}

impl From<tokio_postgres::Error> for CutoverError {
    fn from(e: tokio_postgres::Error) -> Self {
        CutoverError::Database(crate::cutover::control::describe(&e))
    }
}

/// A failure, and the phase it ended.
#[derive(Debug)]
pub struct Failure {
    pub phase: Phase,
    pub error: CutoverError,
}

