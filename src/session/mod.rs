//! A client session after login: connect its backend, introduce the backend to the
//! client, relay until either side ends — on its shard's express lane between
//! cutovers, holding at a closed gate, and moving to another backend in place when
//! a cutover asks — and end the other side cleanly.

pub mod buffer;
pub mod ended;
pub mod express;
pub mod fuzzing;
mod inbox;
mod learn;
mod moving;
mod io;
pub mod migrate;
pub mod params;
pub mod pipeline;
pub mod registry;
pub mod relay;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::sync::{oneshot, watch};

use crate::backend::{BackendConn, BackendTarget};
use crate::client::Login;
use crate::net::Stream;
use crate::protocol::{sqlstate, write, PgError};
use crate::server::Proxy;
use registry::{BackendLink, Control, Moved, NewSession, Prewarmed, SessionInfo};
use relay::{BackendSide, End, Event, Relay};

/// Writes a FATAL error to a client and closes it, best effort.
pub async fn fail(stream: &mut Stream, err: &PgError) {
    let mut buf = BytesMut::new();
    write::error_response(&mut buf, err);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(&buf).await?;
        stream.shutdown().await
    })
    .await;
}

pub async fn run(proxy: Arc<Proxy>, login: Login) {
    // Cold, large futures are boxed: an idle session's task holds only the relay
    // loop's state (memory per idle session is what PgBouncer is measured by).
    let Some((session, mut inbox, guard, permit)) = Box::pin(start(proxy, login)).await else { return };
    let Some((session, end)) = session.relay_loop(&mut inbox).await else {
        tracing::debug!(session = guard.info.id, "session dropped with its express lane");
        return;
    };
    Box::pin(session.finish(end)).await;
    drop(inbox);
    drop(permit);
    tracing::debug!(session = guard.info.id, "session ended");
}

/// Connects the backend, registers the session and introduces the backend to the
/// client. None if the session ends before it starts.
async fn start(proxy: Arc<Proxy>, mut login: Login) -> Option<(Box<Session>, inbox::Inbox, registry::SessionGuard, tokio::sync::OwnedSemaphorePermit)> {
    // During a cutover's pause a new session logs in where the cutover goes (the
    // source is being fenced): its login completes and its first request holds at
    // the gate like any other; if the cutover rolls back, that request moves it to
    // the source first. A login that raced the fence is tried again there.
    let route = proxy.gate().route();
    let mut target = proxy.login_backend();
    let mut conn = target.connect(&login.startup.params, &login.creds).await;
    if conn.is_err() {
        let now = proxy.login_backend();
        if now.name != target.name {
            target = now;
            conn = target.connect(&login.startup.params, &login.creds).await;
        }
    }
    // A switchover's standby replays the fence's NOLOGIN before its promotion
    // gives LOGIN back: a login refused there waits for the pause to end.
    if matches!(conn, Err(crate::backend::BackendError::Refused { .. })) && proxy.logins_redirected() {
        // The redirect ends before the gate opens.
        let bound = proxy.config().cutover.max_pause + Duration::from_secs(5);
        let mut open = proxy.gate().subscribe();
        let opened = matches!(tokio::time::timeout(bound, open.wait_for(|open| *open)).await, Ok(Ok(_)));
        if opened {
            target = proxy.login_backend();
            conn = target.connect(&login.startup.params, &login.creds).await;
        }
    }
    let conn = match conn {
        Ok(c) => c,
        Err(crate::backend::BackendError::Refused { frame, message }) => {
            tracing::info!(user = %login.startup.user(), backend = %target.name, %message, "backend refused login");
            let _ = login.stream.write_all(&frame).await;
            let _ = login.stream.shutdown().await;
            return None;
        }
        Err(e) => {
            tracing::warn!(user = %login.startup.user(), backend = %target.name, error = %e, "backend connection failed");
            fail(&mut login.stream, &e.client_error(&target.name)).await;
            return None;
        }
    };

    let (guard, control) = proxy.sessions.register(NewSession {
        user: login.startup.user().to_owned(),
        database: login.startup.database().to_owned(),
        application_name: login.startup.get("application_name").unwrap_or_default().to_owned(),
        client_addr: login.peer.clone(),
        backend: BackendLink { target: target.clone(), key: conn.key },
        tx_status: conn.ready_status,
        startup_params: params::Params::from(&login.startup.params),
        creds: login.creds.clone(),
    });
    let info = guard.info.clone();
    tracing::debug!(session = info.id, user = %info.user, database = %info.database, backend = %target.name, "session started");

    let mut hello = BytesMut::with_capacity(512);
    for (name, value) in &conn.params {
        write::parameter_status(&mut hello, name, value);
    }
    write::backend_key_data(&mut hello, info.key);
    write::ready_for_query(&mut hello, conn.ready_status);
    if login.stream.write_all(&hello).await.is_err() {
        terminate_backend(conn.stream, conn.port).await;
        return None;
    }

    let limit = proxy.config().proxy.max_message_size;
    let backend = BackendSide { stream: conn.stream, target: target.clone(), key: conn.key, port: conn.port };
    let relay = Relay::new(info.clone(), proxy.gate().clone(), login.stream, backend, limit, conn.ready_status, &conn.params);
    let mut relay = relay;
    // On the active backend as of `route`; else its first request looks again.
    relay.route_seen = if target.name == proxy.active_backend().name { route } else { 0 };
    let mut session = Box::new(Session { gate_rx: proxy.gate().subscribe(), proxy, relay, prewarmed: None, prepare_reply: None, migrate_reply: None, lane_ok: true });
    if session.proxy.is_shutting_down() {
        session.relay.want.shutdown = true;
    }
    Some((session, control, guard, login.permit))
}

/// How long a copy of a session's state may wait for the server it goes to.
const COPY_TIMEOUT: Duration = Duration::from_secs(2);

/// A session: the relay and what talks to it. Its task keeps it, or lends it whole
/// to an express lane (the task keeps only the mailbox then).
struct Session {
    proxy: Arc<Proxy>,
    relay: Relay,
    gate_rx: watch::Receiver<bool>,
    /// A connection to a cutover's target, maybe with the session's state on it.
    prewarmed: Option<Box<Prewarmed>>,
    /// Who waits to hear that the state was copied onto `prewarmed`.
    prepare_reply: Option<oneshot::Sender<Result<(), String>>>,
    /// Who waits to hear that the session runs on the active backend.
    migrate_reply: Option<oneshot::Sender<Moved>>,
    /// The session may ride its shard's express lane (false once a lane could not
    /// take it).
    lane_ok: bool,
}

enum Step {
    Control(Control),
    GateChanged,
    Relay(Event),
    /// Back from an express lane with nothing to do.
    Returned,
}

impl Session {
    fn info(&self) -> &Arc<SessionInfo> {
        &self.relay.info
    }

    /// Relays until the session ends — on the shard's express lane whenever it
    /// may ride it, else here. None: the session went with its lane (the proxy is
    /// going away).
    async fn relay_loop(mut self: Box<Self>, inbox: &mut inbox::Inbox) -> Option<(Box<Session>, End)> {
        let mut recalled_by = None;
        loop {
            // A request already waiting is taken here: boarding for it would only
            // be a round trip to the lane and back.
            let lane = if inbox.rung() { None } else { self.lane() };
            let step = match (recalled_by.take(), lane) {
                (Some(c), _) => Step::Control(c),
                (None, Some(lane)) => {
                    let ride = express::ride(self, lane, inbox).await?;
                    self = ride.session;
                    recalled_by = ride.recalled_by;
                    ride.step
                }
                (None, None) => self.next_step(inbox).await,
            };
            if let Some(end) = self.take(step).await {
                return Some((self, end));
            }
        }
    }

    /// The shard's express lane, if the session may ride it now: plain sockets,
    /// the gate open, nothing held, wanted or prepared.
    fn lane(&self) -> Option<Arc<express::Shared>> {
        let r = &self.relay;
        let may = self.lane_ok && !r.holding && !r.want.any() && self.prewarmed.is_none() && r.client.is_plain() && r.backend.stream.is_plain() && !r.gate.is_closed();
        if may {
            express::here()
        } else {
            None
        }
    }

    /// The next step on tokio.
    ///
    /// Cancellation safety: each arm of the `select!` is cancel-safe — a control
    /// message or gate change is not consumed unless its arm wins, and the relay's
    /// poll keeps all its state in `self.relay`.
    async fn next_step(&mut self, inbox: &mut inbox::Inbox) -> Step {
        let relay = &mut self.relay;
        // A session that may ride a lane looks again when the gate opens.
        let watch_gate = relay.holding || self.lane_ok;
        tokio::select! {
            biased;
            c = inbox.recv() => Step::Control(c),
            _ = self.gate_rx.changed(), if watch_gate => Step::GateChanged,
            ev = std::future::poll_fn(|cx| relay.poll_relay(cx)) => Step::Relay(ev),
        }
    }

    /// Takes a step; Some when the session ends.
    async fn take(&mut self, step: Step) -> Option<End> {
        match step {
            Step::Returned => {}
            Step::Control(Control::Kill) => return Some(End::Shutdown),
            Step::Control(Control::Shutdown) => {
                self.relay.want.shutdown = true;
                if self.relay.holding {
                    return Some(End::Shutdown);
                }
            }
            Step::Control(Control::CancelForPause) => {
                if let Some(key) = self.relay.cancel_for_pause() {
                    let target = self.relay.backend.target.clone();
                    tokio::spawn(async move { target.cancel(key).await });
                }
            }
            Step::Control(Control::Prepare(conn, reply)) => {
                self.discard();
                self.prewarmed = Some(conn);
                self.prepare_reply = Some(reply);
                self.relay.want.prepare = true;
            }
            Step::Control(Control::Discard) => self.discard(),
            Step::Control(Control::CancelHeld(reply)) => {
                let answered = self.relay.cancel_held();
                if answered {
                    self.release();
                }
                let _ = reply.send(answered);
            }
            Step::Control(Control::Migrate(reply)) => {
                if self.proxy.active_backend().name == self.relay.backend.target.name {
                    let _ = reply.send(Moved::Moved);
                } else {
                    self.migrate_reply = Some(reply);
                    self.relay.want.migrate = true;
                }
            }
            Step::GateChanged => {
                if *self.gate_rx.borrow_and_update() {
                    self.release();
                }
            }
            Step::Relay(Event::Hold) => {
                self.relay.gate.held(&self.relay.info);
                if self.relay.want.shutdown {
                    return Some(End::Shutdown);
                }
                // The gate may have opened since the relay looked.
                if *self.gate_rx.borrow_and_update() && !self.relay.gate.is_closed() {
                    self.release();
                }
            }
            Step::Relay(Event::Ready) => {
                if self.relay.want.shutdown && self.relay.client_idle() {
                    return Some(End::Shutdown);
                }
                if self.relay.want.prepare {
                    self.relay.want.prepare = false;
                    Box::pin(self.prepare()).await;
                }
                if self.relay.want.migrate {
                    self.relay.want.migrate = false;
                    if let Err(end) = Box::pin(self.reroute()).await {
                        return Some(end);
                    }
                }
            }
            Step::Relay(Event::Reroute) => {
                if let Err(end) = Box::pin(self.reroute()).await {
                    return Some(end);
                }
            }
            Step::Relay(Event::End(end)) => return Some(end),
        }
        None
    }

    /// The held request goes on.
    fn release(&mut self) {
        if self.relay.holding {
            self.relay.holding = false;
            self.relay.gate.released(&self.relay.info);
        }
    }

    /// Closes the prepared connection, if any (the cutover that asked for it is over).
    fn discard(&mut self) {
        if let Some(p) = self.prewarmed.take() {
            tokio::spawn(terminate_backend(p.conn.stream, p.conn.port));
        }
        self.prepare_reply = None;
    }

    /// Ends the other side cleanly once one side has ended.
    async fn finish(mut self: Box<Self>, end: End) {
        self.release();
        let relay = &mut self.relay;
        let backend_name = relay.backend.target.name.clone();
        let mut say_goodbye = relay.from_client.at_boundary();
        match &end {
            End::ClientTerminated => say_goodbye = false,
            End::Shutdown => relay::tell_client(relay, &PgError::fatal(sqlstate::ADMIN_SHUTDOWN, "terminating connection due to administrator command")),
            End::Closed(err) => relay::tell_client(relay, err),
            End::ClientGone(_) | End::ClientProtocol(_) => {
                if let End::ClientProtocol(e) = &end {
                    tracing::info!(session = relay.info.id, error = %e, "client protocol violation");
                    relay::tell_client(relay, &PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()));
                }
                // A query still running would go on after its client left: cancel it.
                if relay.pipeline.is_running() {
                    relay.backend.target.cancel(relay.backend.key).await;
                }
            }
            End::BackendGone(e) => {
                say_goodbye = false;
                tracing::warn!(session = relay.info.id, backend = %backend_name, error = ?e, "backend connection lost");
                if !relay.last_was_error {
                    relay::tell_client(relay, &PgError::fatal(sqlstate::CONNECTION_FAILURE, format!("backend \"{backend_name}\" closed the connection unexpectedly")));
                }
            }
            End::BackendProtocol(e) => {
                say_goodbye = false;
                tracing::warn!(session = relay.info.id, backend = %backend_name, error = %e, "backend protocol violation");
                relay::tell_client(relay, &PgError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("invalid message from backend \"{backend_name}\"")));
            }
        }
        // The client hears the end first; then the backend, whose port stays known
        // as the proxy's own until its server process has gone.
        let _ = tokio::time::timeout(Duration::from_secs(1), relay.flush_client()).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), relay.client.shutdown()).await;
        if say_goodbye {
            relay.to_backend.extend(&write::TERMINATE);
        }
        let terminated = say_goodbye || matches!(end, End::ClientTerminated);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            if relay.flush_backend().await.is_ok() && terminated {
                relay.backend_gone().await;
            }
        })
        .await;
        relay.info.set_busy(false);
        relay.gate.notify_quiescent();
    }
}

/// Says goodbye to a backend and waits (bounded) until it has gone; its port stays
/// known as the proxy's own until then.
async fn terminate_backend(mut stream: Stream, port: crate::backend::ports::PortGuard) {
    // A cutover ends a thousand sessions' old connections at once; each server
    // process exit costs a millisecond or two of a core, and a storm of them would
    // take the cores from the clients' first requests on the new server. Two per
    // core at a time: the old server has nothing left to do for them.
    static CLOSING: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    let closing = CLOSING.get_or_init(|| tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()) * 2));
    let _permit = closing.acquire().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(&write::TERMINATE).await?;
        let mut sink = [0u8; 512];
        while tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
    drop(port);
}

/// A backend connection for `info` on `target`, with its credentials.
pub async fn prewarm(info: &SessionInfo, target: &Arc<BackendTarget>) -> Result<BackendConn, crate::backend::BackendError> {
    target.connect(&info.startup_params.to_vec(), &info.creds).await
}

#[cfg(test)]
mod tests {
    /// An idle session's task holds the relay loop's state and no room for the
    /// handshake, the backend login or a migration (boxed while they run).
    #[test]
    fn an_idle_session_task_is_small() {
        fn size<F: std::future::Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let config = "[proxy]\nlisten = \"127.0.0.1:0\"\n[auth]\nmethod = \"trust\"\n[backends.a]\nhost = \"127.0.0.1\"\nport = 1\n[cutover]\nactive = \"a\"\n";
        let proxy = std::sync::Arc::new(crate::server::Proxy::new(crate::config::Config::parse(config).unwrap()).unwrap());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let s = tokio::net::UnixStream::from_std(a).unwrap();
            let f = crate::client::handle(proxy.clone(), crate::net::Stream::Unix(s), "x".into());
            let n = size(&f);
            eprintln!("a session task's future: {n} bytes");
            assert!(n < 1536, "{n} bytes");
        });
    }
}
