//! Live sessions, keyed by the cancel key the proxy minted for each.
//!
//! The control plane (cancel, the admin console, metrics) reads sessions through
//! here; the relay updates a session's counters with relaxed atomics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

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
    tx: AtomicU8,
    /// Requests sent (Query, Sync, FunctionCall) minus ReadyForQuery received.
    outstanding: AtomicI64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

impl SessionInfo {
    pub fn tx_state(&self) -> TxState {
        TxState::from_status(self.tx.load(Ordering::Relaxed))
    }

    pub(crate) fn on_ready(&self, status: u8) {
        self.tx.store(status, Ordering::Relaxed);
        // Saturate: a ReadyForQuery we did not count a request for must not go negative.
        let _ = self.outstanding.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some((n - 1).max(0)));
    }

    pub(crate) fn on_request(&self) {
        self.outstanding.fetch_add(1, Ordering::AcqRel);
    }

    /// Requests whose ReadyForQuery has not come back yet.
    pub fn outstanding(&self) -> i64 {
        self.outstanding.load(Ordering::Acquire)
    }

    pub fn backend(&self) -> BackendLink {
        self.backend.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_backend(&self, link: BackendLink) {
        *self.backend.lock().unwrap_or_else(|p| p.into_inner()) = link;
    }
}

/// What a new session is registered with.
pub struct NewSession {
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub client_addr: String,
    pub backend: BackendLink,
    pub tx_status: u8,
}

#[derive(Default)]
pub struct Registry {
    sessions: Mutex<HashMap<i32, Arc<SessionInfo>>>,
    next_id: AtomicU64,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Arc<SessionInfo>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session under a freshly minted, unique cancel key. The returned
    /// guard unregisters it when dropped.
    pub fn register(self: &Arc<Self>, new: NewSession) -> SessionGuard {
        let mut rng = rand::thread_rng();
        let mut map = self.lock();
        let pid = loop {
            let pid = rng.gen_range(1..i32::MAX);
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
            outstanding: AtomicI64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        });
        map.insert(pid, info.clone());
        SessionGuard { registry: self.clone(), info }
    }

    /// The backend link of the session this key belongs to, if the key is genuine.
    pub fn lookup_cancel(&self, key: CancelKey) -> Option<BackendLink> {
        let info = self.lock().get(&key.pid).cloned()?;
        let genuine: bool = info.key.secret.to_be_bytes().ct_eq(&key.secret.to_be_bytes()).into();
        genuine.then(|| info.backend())
    }

    pub fn list(&self) -> Vec<Arc<SessionInfo>> {
        let mut v: Vec<_> = self.lock().values().cloned().collect();
        v.sort_by_key(|s| s.id);
        v
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
    }
}
