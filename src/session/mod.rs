//! A client session after login: connect its backend, introduce the backend to the
//! client, relay until either side ends — holding at a closed gate, and moving to
//! another backend in place when a cutover asks — and end the other side cleanly.

pub mod buffer;
pub mod ended;
pub mod fuzzing;
mod inbox;
mod learn;
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
use ended::Ended;
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
    let Some((mut session, guard, permit)) = Box::pin(start(proxy, login)).await else { return };
    let end = session.relay_loop().await;
    Box::pin(session.finish(end)).await;
    drop(permit);
    tracing::debug!(session = guard.info.id, "session ended");
}

/// Connects the backend, registers the session and introduces the backend to the
/// client. None if the session ends before it starts.
async fn start(proxy: Arc<Proxy>, mut login: Login) -> Option<(Session, registry::SessionGuard, tokio::sync::OwnedSemaphorePermit)> {
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
    let mut session = Session { gate_rx: proxy.gate().subscribe(), proxy, relay, control, prewarmed: None, prepare_reply: None, migrate_reply: None };
    if session.proxy.is_shutting_down() {
        session.relay.want.shutdown = true;
    }
    Some((session, guard, login.permit))
}

/// How long a copy of a session's state may wait for the server it goes to.
const COPY_TIMEOUT: Duration = Duration::from_secs(2);

/// A session's task: the relay and what talks to it.
struct Session {
    proxy: Arc<Proxy>,
    relay: Relay,
    control: inbox::Inbox,
    gate_rx: watch::Receiver<bool>,
    /// A connection to a cutover's target, maybe with the session's state on it.
    prewarmed: Option<Box<Prewarmed>>,
    /// Who waits to hear that the state was copied onto `prewarmed`.
    prepare_reply: Option<oneshot::Sender<Result<(), String>>>,
    /// Who waits to hear that the session runs on the active backend.
    migrate_reply: Option<oneshot::Sender<Moved>>,
}

enum Step {
    Control(Control),
    GateChanged,
    Relay(Event),
}

impl Session {
    fn info(&self) -> &Arc<SessionInfo> {
        &self.relay.info
    }

    /// Relays until the session ends.
    ///
    /// Cancellation safety: each arm of the `select!` is cancel-safe — a control
    /// message or gate change is not consumed unless its arm wins, and the relay's
    /// poll keeps all its state in `self.relay`.
    async fn relay_loop(&mut self) -> End {
        loop {
            let relay = &mut self.relay;
            let holding = relay.holding;
            let step = tokio::select! {
                biased;
                c = self.control.recv() => Step::Control(c),
                _ = self.gate_rx.changed(), if holding => Step::GateChanged,
                ev = std::future::poll_fn(|cx| relay.poll_relay(cx)) => Step::Relay(ev),
            };
            match step {
                Step::Control(Control::Kill) => return End::Shutdown,
                Step::Control(Control::Shutdown) => {
                    self.relay.want.shutdown = true;
                    if self.relay.holding {
                        return End::Shutdown;
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
                        return End::Shutdown;
                    }
                    // The gate may have opened since the relay looked.
                    if *self.gate_rx.borrow_and_update() && !self.relay.gate.is_closed() {
                        self.release();
                    }
                }
                Step::Relay(Event::Ready) => {
                    if self.relay.want.shutdown && self.relay.client_idle() {
                        return End::Shutdown;
                    }
                    if self.relay.want.prepare {
                        self.relay.want.prepare = false;
                        Box::pin(self.prepare()).await;
                    }
                    if self.relay.want.migrate {
                        self.relay.want.migrate = false;
                        if let Err(end) = Box::pin(self.reroute()).await {
                            return end;
                        }
                    }
                }
                Step::Relay(Event::Reroute) => {
                    if let Err(end) = Box::pin(self.reroute()).await {
                        return end;
                    }
                }
                Step::Relay(Event::End(end)) => return end,
            }
        }
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

    /// Turns a block the proxy aborted back into an idle backend (the client's view
    /// is kept by the relay), so that the backend can be asked about the session.
    async fn unabort(&mut self, asynchronous: &mut migrate::Async) -> Result<(), migrate::MigrateError> {
        if self.relay.ended == Ended::Aborted {
            migrate::simple_query(&mut self.relay.backend.stream, "ROLLBACK", asynchronous).await?;
            self.relay.ended = Ended::RolledBack;
        }
        Ok(())
    }

    /// Copies the session's state (read on its idle backend) onto `conn`, reads it
    /// back there and compares. `reset`: `conn` holds an older copy, cleared first.
    ///
    /// On a standby (a switchover's target before its promotion) everything but
    /// LISTEN can be copied — recovery refuses LISTEN —, so the channels are left
    /// out and returned: [`Session::after_promotion`] listens on them. Also
    /// returns the state as read on the old backend.
    async fn copy_state(&mut self, conn: &mut BackendConn, reset: bool) -> Result<(Option<Vec<migrate::Text>>, migrate::SessionState), migrate::MigrateError> {
        let mut old_async = Vec::new();
        let mut new_async = Vec::new();
        let login_user = self.relay.info.user.clone();
        let standby = conn.params.iter().any(|(name, value)| name == "in_hot_standby" && value == "on");
        let copied = async {
            self.unabort(&mut old_async).await?;
            let read = migrate::read_state(&mut self.relay.backend.stream, &self.relay.custom, &mut old_async).await?;
            let mut state = read.clone();
            let later = standby.then(|| std::mem::take(&mut state.channels));
            // The target is someone else's server: a lock queue there (a standby's
            // replay waiting on a conflict, a DDL) must not stall this session.
            let on_new = async {
                if reset {
                    migrate::simple_query(&mut conn.stream, "DISCARD ALL", &mut new_async).await?;
                }
                migrate::replay(&mut conn.stream, &state, login_user.as_bytes(), &mut new_async).await?;
                migrate::read_state(&mut conn.stream, &self.relay.custom, &mut new_async).await
            };
            let copy = match tokio::time::timeout(COPY_TIMEOUT, on_new).await {
                Ok(copy) => copy?,
                Err(_) => return Err(migrate::MigrateError::Stalled(COPY_TIMEOUT)),
            };
            match migrate::differences(&state, &copy) {
                Some(d) => Err(migrate::MigrateError::Differs(d)),
                None => Ok((later, read)),
            }
        }
        .await;
        let old_pid = self.relay.backend.key.pid;
        self.deliver(old_async, old_pid, None);
        let mut params = params::Params::from(&conn.params);
        self.deliver(new_async, conn.key.pid, Some(&mut params));
        conn.params = params.to_vec();
        copied
    }

    /// Before the pause, while the session is idle: copies its state onto the
    /// prewarmed connection, so that the switch itself is only a swap. The copy is
    /// current as long as the session starts no request (see `Relay::requests`).
    async fn prepare(&mut self) {
        let Some(mut p) = self.prewarmed.take() else { return };
        let copied = self.copy_state(&mut p.conn, p.copied_at.is_some()).await.map(|(later, read)| {
            p.copied = Some(read);
            later
        });
        p.copied_at = copied.is_ok().then_some(self.relay.requests);
        // A connection left mid-exchange is of no further use: the session opens
        // another when it moves.
        let broken = matches!(copied, Err(migrate::MigrateError::Stalled(_) | migrate::MigrateError::Io(_)));
        if let Some(reply) = self.prepare_reply.take() {
            let _ = reply.send(copied.map(|later| p.listen_later = later).map_err(|e| e.to_string()));
        }
        if broken {
            tokio::spawn(terminate_backend(p.conn.stream, p.conn.port));
            return;
        }
        self.prewarmed = Some(p);
    }

    /// Hands the client what a backend said on its own while the proxy asked it
    /// something: notifications with the client's pid, ParameterStatus folded into
    /// `params` (the new backend's, diffed at the swap) or passed on.
    fn deliver(&mut self, frames: migrate::Async, backend_pid: i32, mut params: Option<&mut params::Params>) {
        for mut frame in frames {
            match frame.first() {
                Some(b'A') if frame.len() >= 9 => {
                    if frame[5..9] == backend_pid.to_be_bytes() {
                        frame[5..9].copy_from_slice(&self.relay.info.key.pid.to_be_bytes());
                    }
                    self.relay.to_client.extend(&frame);
                }
                Some(b'S') => {
                    let fields = relay::split_cstrings(frame.get(5..).unwrap_or_default());
                    if let [name, value, ..] = fields.as_slice() {
                        match params.as_deref_mut() {
                            Some(p) => p.set(name, value),
                            None => {
                                self.relay.params.set(name, value);
                                self.relay.to_client.extend(&frame);
                            }
                        }
                    }
                }
                // Notices about the proxy's own queries are not the client's business.
                _ => {}
            }
        }
    }

    /// At a request boundary after a repoint (or when a cutover asks): makes sure the
    /// session runs on the active backend, and answers whoever asked.
    async fn reroute(&mut self) -> Result<(), End> {
        // The route first: a repoint stores the active backend before it bumps it.
        self.relay.route_seen = self.relay.gate.route();
        let active = self.proxy.active_backend();
        let result = if active.name == self.relay.backend.target.name {
            // A connection prepared for a cutover that did not happen is of no use.
            self.discard();
            Ok(())
        } else {
            self.move_to(active).await
        };
        if let Some(reply) = self.migrate_reply.take() {
            let _ = reply.send(match &result {
                Ok(()) => Moved::Moved,
                Err(End::Closed(e)) => Moved::Closed(e.message.clone()),
                Err(_) => Moved::Closed("the session ended".into()),
            });
        }
        result
    }

    /// Moves the (idle) session to `active`: swaps to the connection prepared
    /// beforehand — as is when its copy of the state is current, after a fresh copy
    /// when the session ran anything since — or opens one and copies the state now.
    /// A session whose state cannot move exactly is closed with a clear error.
    async fn move_to(&mut self, active: Arc<BackendTarget>) -> Result<(), End> {
        let id = self.info().id;
        let prepared = match self.prewarmed.take() {
            Some(p) if p.target.name == active.name => Some(p),
            Some(p) => {
                tokio::spawn(terminate_backend(p.conn.stream, p.conn.port));
                None
            }
            None => None,
        };
        self.prepare_reply = None;
        let cannot_move = |e: &dyn std::fmt::Display| {
            End::Closed(PgError::fatal(
                sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("pgcutover moved the database to another server and could not bring this session along: {e}; reconnect"),
            ))
        };
        let (target, mut new, mut current, copied, mut later) = match prepared {
            Some(p) => {
                let current = p.copied_at == Some(self.relay.requests);
                (p.target, p.conn, current, p.copied, p.listen_later)
            }
            None => (active.clone(), self.connect_to(&active).await?, false, None, None),
        };
        // Requests ran since the copy (a busy session, held at the pause): most
        // change nothing the copy holds, and one read on the old backend says so,
        // without a round trip to the new one.
        if let (false, Some(before)) = (current, &copied) {
            let mut asynchronous = Vec::new();
            let read = async {
                self.unabort(&mut asynchronous).await?;
                migrate::read_state(&mut self.relay.backend.stream, &self.relay.custom, &mut asynchronous).await
            };
            current = matches!(read.await, Ok(now) if now == *before);
            let old_pid = self.relay.backend.key.pid;
            self.deliver(asynchronous, old_pid, None);
        }
        if !current {
            match self.copy_state(&mut new, copied.is_some()).await {
                Ok((l, _)) => later = l,
                Err(e) => {
                    tracing::warn!(session = id, error = %e, "session cannot move; closing it");
                    tokio::spawn(terminate_backend(new.stream, new.port));
                    return Err(cannot_move(&e));
                }
            }
        }
        // Copied onto a standby before a switchover's promotion: the connection
        // must be read-write now, and the channels are listened on; else a fresh
        // connection, opened after the promotion, takes its place.
        if let Some(channels) = later {
            let checked = match tokio::time::timeout(COPY_TIMEOUT, self.after_promotion(&mut new, &channels)).await {
                Ok(checked) => checked,
                Err(_) => Err(migrate::MigrateError::Stalled(COPY_TIMEOUT)),
            };
            if let Err(e) = checked {
                tracing::warn!(session = id, error = %e, "the connection opened before the promotion is not usable; opening another");
                tokio::spawn(terminate_backend(new.stream, new.port));
                new = self.connect_to(&active).await?;
                let copied = match self.copy_state(&mut new, false).await {
                    Ok((None, _)) => Ok(()),
                    Ok((Some(_), _)) => Err(migrate::MigrateError::Differs(format!("{} is still in recovery", active.name))),
                    Err(e) => Err(e),
                };
                if let Err(e) = copied {
                    tracing::warn!(session = id, error = %e, "session cannot move; closing it");
                    tokio::spawn(terminate_backend(new.stream, new.port));
                    return Err(cannot_move(&e));
                }
            }
        }
        // The client learns what differs on the new server (server_version, ...).
        let mut changed = BytesMut::new();
        for (name, value) in &new.params {
            if self.relay.params.get(name) != Some(value.as_str()) {
                write::parameter_status(&mut changed, name, value);
                self.relay.params.set(name, value);
            }
        }
        self.relay.to_client.extend(&changed);
        let old = std::mem::replace(&mut self.relay.backend, BackendSide { stream: new.stream, target: target.clone(), key: new.key, port: new.port });
        self.info().set_backend(BackendLink { target: target.clone(), key: new.key });
        tracing::debug!(session = id, to = %target.name, "session moved");
        tokio::spawn(terminate_backend(old.stream, old.port));
        Ok(())
    }

    /// A new connection to `active` for this session (logged in as its client was).
    async fn connect_to(&self, active: &Arc<BackendTarget>) -> Result<BackendConn, End> {
        active.connect(&self.info().startup_params.to_vec(), &self.info().creds).await.map_err(|e| {
            tracing::warn!(session = self.info().id, error = %e, "cannot open a connection on the new backend");
            End::Closed(e.client_error(&active.name))
        })
    }

    /// After a switchover's promotion, on a connection opened while its server was
    /// a standby: listens on the session's channels and checks that transactions
    /// are read-write as the session's own settings say (one round trip).
    async fn after_promotion(&mut self, conn: &mut BackendConn, channels: &[migrate::Text]) -> Result<(), migrate::MigrateError> {
        let mut sql = Vec::new();
        for c in channels {
            sql.extend_from_slice(b"LISTEN ");
            sql.extend(migrate::ident(c));
            sql.push(b';');
        }
        sql.extend_from_slice(b"SELECT pg_is_in_recovery()::text, (current_setting('transaction_read_only') = 'off' OR current_setting('default_transaction_read_only') = 'on')::text");
        let mut asynchronous = Vec::new();
        let rows = migrate::simple_query_bytes(&mut conn.stream, &sql, &mut asynchronous).await;
        let mut params = params::Params::from(&conn.params);
        self.deliver(asynchronous, conn.key.pid, Some(&mut params));
        conn.params = params.to_vec();
        match rows?.last().map(|r| r.as_slice()) {
            Some([Some(recovering), Some(writable)]) if recovering == b"false" && writable == b"true" => Ok(()),
            Some([Some(recovering), _]) if recovering == b"true" => Err(migrate::MigrateError::Differs("the server is still in recovery".into())),
            _ => Err(migrate::MigrateError::Differs("transactions are read-only there".into())),
        }
    }

    /// Ends the other side cleanly once one side has ended.
    async fn finish(mut self, end: End) {
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
