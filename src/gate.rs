//! The pause gate: holds sessions' new requests while closed, counts what is in
//! flight, and drains it within a deadline.
//!
//! A session counts a request unit *before* it looks at the gate; a pause closes the
//! gate *before* it looks at the sessions' counters (both sequentially consistent).
//! So either the pause sees the request in flight and waits for it, or the session
//! sees the gate closed and holds: no request slips through a closing gate unseen.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::{watch, Notify};

use crate::config::OnDrainTimeout;
use crate::server::Proxy;
use crate::session::registry::{Control, SessionInfo};

pub struct Gate {
    closed: AtomicBool,
    /// `true` while open; sessions wait on it.
    open_tx: watch::Sender<bool>,
    /// Sessions ping this when they turn quiescent, so a drain need not poll.
    quiescent: Notify,
    held_now: AtomicI64,
    /// Increases with every pause; the max_pause watchdog only reopens its own.
    epoch: AtomicU64,
    /// Increases with every repoint: a session that saw an older value looks at the
    /// active backend before it starts its next request (see `Relay`).
    route: AtomicU64,
    current: Mutex<Option<ActivePause>>,
    /// When the last pause ended by itself at max_pause (cleared by the next pause):
    /// a RESUME after it is a no-op that says so.
    reopened_by_itself: Mutex<Option<std::time::SystemTime>>,
    stats: Mutex<GateStats>,
}

struct ActivePause {
    epoch: u64,
    since: Instant,
    /// Who may resume it: the operator's own pause, or a cutover's, which only the
    /// cutover ends (its source may be fenced until it does).
    owner: Owner,
    watchdog: tokio::task::JoinHandle<()>,
}

/// Figures for SHOW STATS and the metrics endpoint. Durations in microseconds.
#[derive(Clone)]
pub struct GateStats {
    pub pauses: u64,
    pub max_pause_expired: u64,
    pub drain_timeouts: u64,
    pub cancelled_for_pause: u64,
    pub held_requests: u64,
    pub pause_us: Histogram<u64>,
    pub drain_us: Histogram<u64>,
    pub hold_us: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 1 hour, 3 significant digits; these bounds are valid by construction.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| unreachable!())
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

/// Who closed the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Operator,
    Cutover,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PauseError {
    #[error("already paused")]
    AlreadyPaused,
    #[error("not paused")]
    NotPaused,
    #[error("a cutover is running and owns this pause: it resumes by itself when it commits or rolls back")]
    OwnedByCutover,
    #[error("drain did not finish within {0:?}: {n} session(s) still in a transaction, the gate was reopened; in the way: {list}", n = .1.len(), list = describe(.1))]
    Aborted(Duration, Vec<InFlight>),
    #[error("max_pause ({0:?}) reached before the drain finished; the gate was reopened")]
    MaxPause(Duration),
}

fn describe(sessions: &[InFlight]) -> String {
    let parts: Vec<String> = sessions
        .iter()
        .map(|s| format!("session {} ({}@{}{}, {})", s.id, s.user, s.database, if s.application_name.is_empty() { String::new() } else { format!(" \"{}\"", s.application_name) }, s.state))
        .collect();
    parts.join("; ")
}

/// A session that was in the way of a drain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InFlight {
    pub id: u64,
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub state: &'static str,
}

impl InFlight {
    fn of(s: &SessionInfo) -> InFlight {
        let state = if s.running() { "running" } else { s.tx_state().as_str() };
        InFlight { id: s.id, user: s.user.clone(), database: s.database.clone(), application_name: s.application_name.clone(), state }
    }
}

/// What a completed drain looked like.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DrainReport {
    #[serde(serialize_with = "as_millis")]
    pub drain: Duration,
    /// Sessions in flight when the gate closed.
    pub waited_for: usize,
    /// Sessions whose work was cancelled at the deadline.
    pub cancelled: Vec<InFlight>,
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new()
    }
}

impl Gate {
    pub fn new() -> Gate {
        let (open_tx, _) = watch::channel(true);
        Gate {
            closed: AtomicBool::new(false),
            open_tx,
            quiescent: Notify::new(),
            held_now: AtomicI64::new(0),
            epoch: AtomicU64::new(0),
            route: AtomicU64::new(1),
            current: Mutex::new(None),
            reopened_by_itself: Mutex::new(None),
            stats: Mutex::new(GateStats {
                pauses: 0,
                max_pause_expired: 0,
                drain_timeouts: 0,
                cancelled_for_pause: 0,
                held_requests: 0,
                pause_us: histogram(),
                drain_us: histogram(),
                hold_us: histogram(),
            }),
        }
    }

    /// The fast path every new request takes.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.open_tx.subscribe()
    }

    pub fn held_now(&self) -> i64 {
        self.held_now.load(Ordering::Relaxed)
    }

    /// How long the current pause has lasted.
    pub fn paused_for(&self) -> Option<Duration> {
        self.lock_current().as_ref().map(|p| p.since.elapsed())
    }

    pub fn stats(&self) -> GateStats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn lock_current(&self) -> std::sync::MutexGuard<'_, Option<ActivePause>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with_stats(&self, f: impl FnOnce(&mut GateStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// A session turned quiescent; a drain may be waiting for it.
    pub fn notify_quiescent(&self) {
        if self.is_closed() {
            self.quiescent.notify_waiters();
        }
    }

    /// Session side: a request is held from now. The session has published itself
    /// quiescent, so a drain waiting for it may finish.
    pub fn held(&self, info: &SessionInfo) {
        info.set_held(true);
        self.held_now.fetch_add(1, Ordering::Relaxed);
        self.notify_quiescent();
    }

    /// Session side: the held request goes on (the gate opened, or the client left).
    pub fn released(&self, info: &SessionInfo) {
        self.held_now.fetch_sub(1, Ordering::Relaxed);
        if let Some(held) = info.set_held(false) {
            self.with_stats(|s| {
                s.held_requests += 1;
                record(&mut s.hold_us, held);
            });
        }
    }

    /// The current route (see the field).
    pub fn route(&self) -> u64 {
        self.route.load(Ordering::SeqCst)
    }

    /// The active backend changed: every session looks at it before its next request.
    pub fn reroute(&self) {
        self.route.fetch_add(1, Ordering::SeqCst);
    }

    /// Closes the gate; `max_pause` later it reopens by itself unless resumed.
    fn close(self: &Arc<Self>, max_pause: Duration, owner: Owner) -> Result<u64, PauseError> {
        let mut current = self.lock_current();
        if current.is_some() {
            return Err(PauseError::AlreadyPaused);
        }
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        *self.reopened_by_itself.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.closed.store(true, Ordering::SeqCst);
        self.open_tx.send_replace(false);
        let gate = self.clone();
        let watchdog = tokio::spawn(async move {
            tokio::time::sleep(max_pause).await;
            if gate.open_if(epoch) {
                *gate.reopened_by_itself.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::SystemTime::now());
                tracing::warn!(max_pause = %humantime::format_duration(max_pause), "max_pause reached: the gate reopened by itself");
                gate.with_stats(|s| s.max_pause_expired += 1);
            }
        });
        *current = Some(ActivePause { epoch, since: Instant::now(), owner, watchdog });
        self.with_stats(|s| s.pauses += 1);
        Ok(epoch)
    }

    /// Reopens the gate if the pause `epoch` is still the current one.
    fn open_if(&self, epoch: u64) -> bool {
        let mut current = self.lock_current();
        match current.as_ref() {
            Some(p) if p.epoch == epoch => {}
            _ => return false,
        }
        self.reopen(&mut current);
        true
    }

    fn reopen(&self, current: &mut Option<ActivePause>) {
        if let Some(p) = current.take() {
            p.watchdog.abort();
            self.with_stats(|s| record(&mut s.pause_us, p.since.elapsed()));
        }
        self.closed.store(false, Ordering::SeqCst);
        self.open_tx.send_replace(true);
        // A drain waiting on this pause learns that it is over.
        self.quiescent.notify_waiters();
    }

    /// The operator's RESUME: opens the gate unless a cutover owns the pause.
    pub fn resume(&self) -> Result<Duration, PauseError> {
        self.resume_as(Owner::Operator)
    }

    /// When the last pause ended by itself at max_pause, if no pause came since.
    pub fn reopened_by_itself(&self) -> Option<std::time::SystemTime> {
        *self.reopened_by_itself.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens the gate (held requests run) if `owner` may: a cutover resumes any
    /// pause, the operator only its own.
    pub fn resume_as(&self, owner: Owner) -> Result<Duration, PauseError> {
        let mut current = self.lock_current();
        let pause = current.as_ref().ok_or(PauseError::NotPaused)?;
        if pause.owner == Owner::Cutover && owner != Owner::Cutover {
            return Err(PauseError::OwnedByCutover);
        }
        let since = pause.since;
        self.reopen(&mut current);
        Ok(since.elapsed())
    }

    fn is_epoch(&self, epoch: u64) -> bool {
        self.lock_current().as_ref().is_some_and(|p| p.epoch == epoch)
    }
}

/// Closes the gate and waits until every session is idle or holding.
///
/// `timeout` bounds the wait (None: until `max_pause`). At the deadline, `Cancel`
/// cancels what still runs and ends open transactions (each such client gets one
/// 40001), `Abort` reopens the gate and reports who was in the way.
pub async fn pause(proxy: &Arc<Proxy>, timeout: Option<Duration>, on_timeout: OnDrainTimeout) -> Result<DrainReport, PauseError> {
    let max_pause = proxy.config().cutover.max_pause;
    pause_with_watchdog(proxy, timeout, on_timeout, max_pause, Owner::Operator).await
}

/// As [`pause`], with the gate reopening by itself after `watchdog` (a cutover
/// bounds its own pause, and must not find the gate open behind its back).
///
/// Cancellation safety: dropping the future leaves the gate closed; its owner (or
/// the watchdog) reopens it.
pub async fn pause_with_watchdog(proxy: &Arc<Proxy>, timeout: Option<Duration>, on_timeout: OnDrainTimeout, watchdog: Duration, owner: Owner) -> Result<DrainReport, PauseError> {
    let closed = close(proxy, watchdog, owner)?;
    drain(proxy, closed, timeout, on_timeout).await
}

/// A pause whose gate is closed and whose drain has not been waited for.
#[derive(Debug)]
pub struct Closed {
    epoch: u64,
    started: Instant,
    watchdog: Duration,
    owner: Owner,
}

/// Closes the gate now, before anything else happens: a caller that must not act
/// unless the pause is its own (a cutover's fence) learns at once.
pub fn close(proxy: &Arc<Proxy>, watchdog: Duration, owner: Owner) -> Result<Closed, PauseError> {
    let epoch = proxy.gate().close(watchdog, owner)?;
    Ok(Closed { epoch, started: Instant::now(), watchdog, owner })
}

/// Waits until every session is idle or holding, as [`pause`] describes.
pub async fn drain(proxy: &Arc<Proxy>, closed: Closed, timeout: Option<Duration>, on_timeout: OnDrainTimeout) -> Result<DrainReport, PauseError> {
    let Closed { epoch, started, watchdog: max_pause, owner } = closed;
    let gate = proxy.gate();
    let in_flight_at = |proxy: &Proxy| proxy.sessions.list().into_iter().filter(|s| !s.quiescent()).collect::<Vec<_>>();
    let waited_for = in_flight_at(proxy).len();
    let mut cancelled = Vec::new();
    let mut deadline = timeout.map(|t| started + t);
    loop {
        let notified = gate.quiescent.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !gate.is_epoch(epoch) {
            return Err(PauseError::MaxPause(max_pause));
        }
        let busy = in_flight_at(proxy);
        if busy.is_empty() {
            let drain = started.elapsed();
            gate.with_stats(|s| record(&mut s.drain_us, drain));
            tracing::info!(?drain, waited_for, cancelled = cancelled.len(), "paused: drain complete");
            return Ok(DrainReport { drain, waited_for, cancelled });
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            gate.with_stats(|s| s.drain_timeouts += 1);
            match on_timeout {
                OnDrainTimeout::Cancel if cancelled.is_empty() => {
                    for s in &busy {
                        cancelled.push(InFlight::of(s));
                        s.control(Control::CancelForPause);
                    }
                    gate.with_stats(|s| s.cancelled_for_pause += busy.len() as u64);
                    // What was cancelled winds down within one more drain_timeout;
                    // a session that does not (a client that never finishes its
                    // COPY, say) ends the pause as an abort would.
                    deadline = timeout.map(|t| Instant::now() + t);
                }
                _ => {
                    // An operator's pause reopens here. A cutover's stays closed
                    // until the cutover has undone its fence (which runs alongside
                    // the drain): held sessions must not write on a half-fenced source.
                    if owner == Owner::Operator {
                        gate.open_if(epoch);
                    }
                    let timeout = timeout.unwrap_or(max_pause);
                    let in_the_way: Vec<InFlight> = busy.iter().map(|s| InFlight::of(s)).collect();
                    tracing::warn!(?timeout, sessions = %describe(&in_the_way), "drain timed out: pause aborted");
                    return Err(PauseError::Aborted(timeout, in_the_way));
                }
            }
        }
        // Sessions say when they turn quiescent or end; the deadline wakes us too.
        // No polling: `notified` was enabled before the sessions were looked at.
        match deadline {
            Some(d) => {
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep_until(d.into()) => {}
                }
            }
            None => notified.await,
        }
    }
}
