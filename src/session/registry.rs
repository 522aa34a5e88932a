//! Live sessions, keyed by the cancel key the proxy minted for each.
//!
//! The control plane (cancel, the admin console, metrics) reads sessions through
//! here; the relay updates a session's counters with relaxed atomics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use rand::Rng;
use subtle::ConstantTimeEq;

use crate::backend::BackendTarget;
use crate::protocol::startup::CancelKey;

/// The transaction state, as the last ReadyForQuery reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxState {
    Idle,
    InTransaction,
    Failed,
}

impl TxState {
    pub fn from_status(b: u8) -> TxState {
        match b {
            b'T' => TxState::InTransaction,
            b'E' => TxState::Failed,
            _ => TxState::Idle,
        }
    }

    pub fn status_byte(self) -> u8 {
        match self {
            TxState::Idle => b'I',
            TxState::InTransaction => b'T',
            TxState::Failed => b'E',
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TxState::Idle => "idle",
            TxState::InTransaction => "in transaction",
            TxState::Failed => "failed transaction",
        }
    }
}

/// Where a session's queries go now, and the key that cancels them there.
#[derive(Clone)]
pub struct BackendLink {
    pub target: Arc<BackendTarget>,
    pub key: CancelKey,
}

/// What the control plane asks of a session. The session acts at its next safe
/// point; a request that needs an answer carries its reply channel.
#[derive(Debug)]
pub enum Control {
    /// A pause's drain deadline passed: cancel what runs, end the open transaction
    /// (the client gets one 40001 and keeps its connection).
    CancelForPause,
    /// The proxy is shutting down: end the session at its next idle point.
    Shutdown,
    /// End the session now.
    Kill,
    /// Copy the session's state onto this connection to a cutover's target, now if
    /// the session is idle, else at its next idle point, and say how it went.
    Prepare(Box<Prewarmed>, tokio::sync::oneshot::Sender<Result<(), String>>),
    /// The cutover rolled back: close the prepared connection.
    Discard,
    /// Be on the active backend (move there at the next idle point), and say so.
    Migrate(tokio::sync::oneshot::Sender<Moved>),
    /// The client cancelled: if a request is held at the gate, answer it as a
    /// cancelled statement (57014) and never run it. Says whether it did; if not,
    /// the cancel goes to the backend.
    CancelHeld(tokio::sync::oneshot::Sender<bool>),
}

/// A connection to a cutover's target, opened before the pause.
pub struct Prewarmed {
    pub target: Arc<BackendTarget>,
    pub conn: crate::backend::BackendConn,
    /// The session's request count when its state was copied onto `conn` (None:
    /// not copied). The copy is current while the count has not moved.
    pub copied_at: Option<u64>,
    /// The session's state as read on its old backend for that copy: when the
    /// session has run requests since, one read finds whether it still holds.
    pub copied: Option<crate::session::migrate::SessionState>,
    /// The copy was made while the target was a standby (a switchover's, before
    /// its promotion): these LISTEN channels wait for the promotion, and the
    /// connection's read-write state is checked then.
    pub listen_later: Option<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for Prewarmed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prewarmed").field("target", &self.target.name).field("copied_at", &self.copied_at).finish()
    }
}

/// A session's answer to [`Control::Migrate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Moved {
    /// It runs on the active backend.
    Moved,
    /// It could not be brought along and was closed with this reason.
    Closed(String),
}

pub struct SessionInfo {
    pub id: u64,
    /// The key the client got in BackendKeyData.
    pub key: CancelKey,
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub client_addr: String,
    pub connected_at: SystemTime,
    backend: Mutex<BackendLink>,
    /// The transaction status the client last saw.
    tx: AtomicU8,
    /// Something runs or is open on the backend (published by the session; see
    /// the gate for the ordering it relies on).
    busy: AtomicBool,
    /// A request is being answered (for SHOW SESSIONS).
    running: AtomicBool,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// ReadyForQuery messages seen (queries), and those that left the session idle
    /// (transactions, counted as PgBouncer counts them).
    pub queries: AtomicU64,
    pub xacts: AtomicU64,
    /// Held at the gate since (for SHOW SESSIONS).
    held_since: Mutex<Option<(Instant, SystemTime)>>,
    pub(super) mailbox: super::inbox::Mailbox,
    /// Every session's server pid, to show clients the minted pid of the sender of a
    /// notification (kept current by [`SessionInfo::set_backend`]).
    server_pids: Arc<ServerPids>,
    /// What the session logged in with, to log in elsewhere on its behalf.
    pub startup_params: super::params::Params,
    pub creds: crate::auth::BackendCredentials,
}

/// Adds to a session's own counter. Only the session's task writes its counters,
/// so a load and a store do (no locked read-modify-write on the hot path); readers
/// see every value once written.
pub(crate) fn bump(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

impl SessionInfo {
    pub fn tx_state(&self) -> TxState {
        TxState::from_status(self.tx.load(Ordering::Relaxed))
    }

    /// A ReadyForQuery reached the client.
    pub(crate) fn on_ready(&self, status: u8) {
        bump(&self.queries, 1);
        if status == b'I' {
            bump(&self.xacts, 1);
        }
        self.tx.store(status, Ordering::Relaxed);
    }

    /// Publishes whether anything runs or is open on the backend.
    ///
    /// INVARIANT: sequentially consistent, like the gate's flag: a session marks
    /// itself busy *before* it looks at the gate, a pause closes the gate *before*
    /// it reads this, so no request slips through a closing gate unseen.
    pub(crate) fn set_busy(&self, busy: bool) {
        self.busy.store(busy, Ordering::SeqCst);
    }

    pub(crate) fn set_running(&self, running: bool) {
        self.running.store(running, Ordering::Relaxed);
    }

    /// A request is being answered by the backend.
    pub fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    /// Nothing running and no transaction open on the backend: the session can be
    /// paused, moved or closed without anyone noticing.
    pub fn quiescent(&self) -> bool {
        !self.busy.load(Ordering::SeqCst)
    }

    pub fn held_since(&self) -> Option<SystemTime> {
        self.held_since.lock().unwrap_or_else(|p| p.into_inner()).map(|(_, t)| t)
    }

    pub(crate) fn set_held(&self, held: bool) -> Option<std::time::Duration> {
        let mut h = self.held_since.lock().unwrap_or_else(|p| p.into_inner());
        if held {
            // Held again after an interrupted hold: the wait began the first time.
            h.get_or_insert_with(|| (Instant::now(), SystemTime::now()));
            None
        } else {
            h.take().map(|(i, _)| i.elapsed())
        }
    }

    /// Sends a control request to the session; false if it has ended.
    pub fn control(&self, c: Control) -> bool {
        self.mailbox.send(c)
    }

    pub fn backend(&self) -> BackendLink {
        self.backend.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_backend(&self, link: BackendLink) {
        let mut current = self.backend.lock().unwrap_or_else(|p| p.into_inner());
        self.server_pids.relink(&current, Some(&link), self.key.pid);
        *current = link;
    }

    /// The pid a client of this proxy knows the server process `pid` on `backend`
    /// by: the minted pid of the session that runs there, if any.
    pub fn minted_pid_of(&self, backend: &str, pid: i32) -> Option<i32> {
        self.server_pids.minted(backend, pid)
    }
}

/// Which session runs on which server process: (backend, server pid) -> minted pid.
#[derive(Default)]
struct ServerPids(Mutex<HashMap<(u64, i32), i32>>);

impl ServerPids {
    fn key(backend: &str, pid: i32) -> (u64, i32) {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        backend.hash(&mut h);
        (h.finish(), pid)
    }

    fn relink(&self, old: &BackendLink, new: Option<&BackendLink>, minted: i32) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&Self::key(&old.target.name, old.key.pid));
        if let Some(new) = new {
            map.insert(Self::key(&new.target.name, new.key.pid), minted);
        }
    }

    fn minted(&self, backend: &str, pid: i32) -> Option<i32> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get(&Self::key(backend, pid)).copied()
    }
}

/// Real process ids stay below Linux's `PID_MAX_LIMIT` (2^22); every minted pid is
/// at 2^30 or above, so none can name a real process (a client that passes its pid
/// to `pg_terminate_backend` ends nobody else's backend).
const MINTED_BASE: i32 = 1 << 30;
/// A fleet member's tag: 14 bits above the 16 that number its sessions.
pub const TAG_MASK: u16 = 0x3fff;

/// A pid minted with `tag` (0: not in a fleet) and a random part.
fn mint(tag: u16, rng: &mut impl Rng) -> i32 {
    if tag == 0 {
        MINTED_BASE | rng.gen_range(0..MINTED_BASE)
    } else {
        MINTED_BASE | (i32::from(tag & TAG_MASK) << 16) | rng.gen_range(1..=0xffff)
    }
}

/// The fleet tag a minted pid carries.
pub fn tag_of(pid: i32) -> u16 {
    ((pid >> 16) as u16) & TAG_MASK
}

/// What a new session is registered with.
pub struct NewSession {
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub client_addr: String,
    pub backend: BackendLink,
    pub tx_status: u8,
    pub startup_params: super::params::Params,
    pub creds: crate::auth::BackendCredentials,
}

#[derive(Default)]
pub struct Registry {
    sessions: Mutex<HashMap<i32, Arc<SessionInfo>>>,
    /// In a fleet, this instance's tag, the top bits of every pid it mints: a cancel
    /// request that reaches another member is passed on to this one.
    tag: std::sync::atomic::AtomicU16,
    next_id: AtomicU64,
    server_pids: Arc<ServerPids>,
    /// Counters of sessions that ended, so that totals never go down.
    pub ended: Totals,
}

#[derive(Default)]
pub struct Totals {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub queries: AtomicU64,
    pub xacts: AtomicU64,
}

impl Totals {
    fn absorb(&self, s: &SessionInfo) {
        self.bytes_in.fetch_add(s.bytes_in.load(Ordering::Relaxed), Ordering::Relaxed);
        self.bytes_out.fetch_add(s.bytes_out.load(Ordering::Relaxed), Ordering::Relaxed);
        self.queries.fetch_add(s.queries.load(Ordering::Relaxed), Ordering::Relaxed);
        self.xacts.fetch_add(s.xacts.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

impl Registry {
    /// Mints every later pid with `tag` (14 bits, see [`tag_of`]).
    pub fn set_tag(&self, tag: u16) {
        self.tag.store(tag & TAG_MASK, Ordering::Relaxed);
    }

    /// Sessions started since the proxy started.
    pub fn started(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed)
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Arc<SessionInfo>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session under a freshly minted, unique cancel key. The returned
    /// guard unregisters it when dropped.
    pub fn register(self: &Arc<Self>, new: NewSession) -> (SessionGuard, super::inbox::Inbox) {
        let mut rng = rand::thread_rng();
        let mut map = self.lock();
        let tag = self.tag.load(Ordering::Relaxed);
        let pid = loop {
            let pid = mint(tag, &mut rng);
            if !map.contains_key(&pid) {
                break pid;
            }
        };
        let info = Arc::new(SessionInfo {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            key: CancelKey { pid, secret: rng.gen() },
            user: new.user,
            database: new.database,
            application_name: new.application_name,
            client_addr: new.client_addr,
            connected_at: SystemTime::now(),
            backend: Mutex::new(new.backend),
            tx: AtomicU8::new(new.tx_status),
            busy: AtomicBool::new(new.tx_status != b'I'),
            running: AtomicBool::new(false),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            queries: AtomicU64::new(0),
            xacts: AtomicU64::new(0),
            held_since: Mutex::new(None),
            mailbox: Default::default(),
            server_pids: self.server_pids.clone(),
            startup_params: new.startup_params,
            creds: new.creds,
        });
        map.insert(pid, info.clone());
        self.server_pids.relink(&info.backend(), Some(&info.backend()), pid);
        let inbox = super::inbox::Inbox::new(info.clone());
        (SessionGuard { registry: self.clone(), info }, inbox)
    }

    /// The session this cancel key belongs to, if the key is genuine.
    pub fn lookup_cancel(&self, key: CancelKey) -> Option<Arc<SessionInfo>> {
        let info = self.lock().get(&key.pid).cloned()?;
        let genuine: bool = info.key.secret.to_be_bytes().ct_eq(&key.secret.to_be_bytes()).into();
        genuine.then_some(info)
    }

    pub fn list(&self) -> Vec<Arc<SessionInfo>> {
        let mut v: Vec<_> = self.lock().values().cloned().collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// The sessions whose backend is on `backend` (by its configured name).
    pub fn on(&self, backend: &str) -> Vec<Arc<SessionInfo>> {
        self.list().into_iter().filter(|s| s.backend().target.name == backend).collect()
    }

    /// The server pids of the sessions on `backend`.
    pub fn pids_on(&self, backend: &str) -> Vec<i32> {
        self.on(backend).iter().map(|s| s.backend().key.pid).collect()
    }

    /// The server pids of the sessions on `backend` that nothing is running or
    /// open for, as the proxy sees it (a pause holds them without waiting).
    pub fn quiescent_pids_on(&self, backend: &str) -> Vec<i32> {
        self.on(backend).iter().filter(|s| s.quiescent()).map(|s| s.backend().key.pid).collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct SessionGuard {
    registry: Arc<Registry>,
    pub info: Arc<SessionInfo>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.info.key.pid);
        self.registry.server_pids.relink(&self.info.backend(), None, self.info.key.pid);
        self.registry.ended.absorb(&self.info);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// About 0.2 % of pids drawn from 1..2^31 fall below Linux's pid_max limit
    /// (2^22): a client passing its minted pid to pg_terminate_backend could end
    /// someone else's backend. Every minted pid lies above it.
    #[test]
    fn minted_pids_are_never_real_pids() {
        let (_guard, _inbox, target, key) = crate::session::fuzzing::lone_session().unwrap();
        let registry = Arc::new(Registry::default());
        for _ in 0..20_000 {
            let (session, _inbox) = registry.register(NewSession {
                user: "u".into(),
                database: "d".into(),
                application_name: String::new(),
                client_addr: String::new(),
                backend: BackendLink { target: target.clone(), key },
                tx_status: b'I',
                startup_params: Default::default(),
                creds: Default::default(),
            });
            assert!(session.info.key.pid >= 1 << 22, "minted pid {} could name a real process", session.info.key.pid);
        }
    }

    /// A fleet member's pids carry its tag, read back to route a cancel.
    #[test]
    fn minted_pids_carry_their_fleet_tag() {
        let mut rng = rand::thread_rng();
        for tag in [1u16, 7, TAG_MASK] {
            for _ in 0..10_000 {
                let pid = mint(tag, &mut rng);
                assert!(pid >= 1 << 22);
                assert_eq!(tag_of(pid), tag);
            }
        }
    }
}
