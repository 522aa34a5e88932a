//! A client session after login: connect its backend, introduce the backend to the
//! client, relay until either side ends — holding at a closed gate, and moving to
//! another backend in place when a cutover asks — and end the other side cleanly.

pub mod buffer;
pub mod ended;
pub mod fuzzing;
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
use tokio::sync::{mpsc, watch};

use crate::backend::{BackendConn, BackendTarget};
use crate::client::Login;
use crate::net::Stream;
use crate::protocol::{sqlstate, write, PgError};
use crate::server::Proxy;
use ended::Ended;
use registry::{BackendLink, Control, NewSession, Prepared, Prewarmed, SessionInfo};
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
    // During a cutover a new session waits for it to end, then logs in wherever
    // the traffic goes: the source may be fenced by now.
    if proxy.cutover_running() {
        let mut open = proxy.gate().subscribe();
        let _ = open.wait_for(|o| *o).await;
    }
    let target = proxy.active_backend();
    let conn = match target.connect(&login.startup.params, &login.creds).await {
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
    let backend = BackendSide { stream: conn.stream, target, key: conn.key, port: conn.port };
    let relay = Relay::new(info.clone(), proxy.gate().clone(), login.stream, backend, limit, conn.ready_status, &conn.params);
    let mut session = Session { gate_rx: proxy.gate().subscribe(), proxy, relay, control };
    if session.proxy.is_shutting_down() {
        session.relay.want.shutdown = true;
    }
    Some((session, guard, login.permit))
}

/// A session's task: the relay and what talks to it.
struct Session {
    proxy: Arc<Proxy>,
    relay: Relay,
    control: mpsc::UnboundedReceiver<Control>,
    gate_rx: watch::Receiver<bool>,
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
                Some(c) = self.control.recv() => Step::Control(c),
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
                Step::Control(Control::Migrate) => self.relay.want.migrate = true,
                Step::Control(Control::Prepare) => self.relay.want.prepare = true,
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
                        if let Err(end) = Box::pin(self.migrate()).await {
                            return end;
                        }
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

    /// Turns a block the proxy aborted back into an idle backend (the client's view
    /// is kept by the relay), so that the backend can be asked about the session.
    async fn unabort(&mut self, asynchronous: &mut migrate::Async) -> Result<(), migrate::MigrateError> {
        if self.relay.ended == Ended::Aborted {
            migrate::simple_query(&mut self.relay.backend.stream, "ROLLBACK", asynchronous).await?;
            self.relay.ended = Ended::RolledBack;
        }
        Ok(())
    }

    /// While the session is held, copies its state onto its prewarmed connection so
    /// that the switch itself is only a swap.
    async fn prepare(&mut self) {
        let Some(mut slot) = self.info().take_prewarmed() else { return };
        if slot.state == Prepared::No {
            let mut old_async = Vec::new();
            let mut new_async = Vec::new();
            let copied = async {
                self.unabort(&mut old_async).await?;
                let state = migrate::read_state(&mut self.relay.backend.stream, &mut old_async).await?;
                migrate::replay(&mut slot.conn.stream, &state, &mut new_async).await
            }
            .await;
            let old_pid = self.relay.backend.key.pid;
            self.deliver(old_async, old_pid, None);
            let mut params = params::Params::from(&slot.conn.params);
            self.deliver(new_async, slot.conn.key.pid, Some(&mut params));
            slot.conn.params = params.to_vec();
            slot.state = match copied {
                Ok(()) => Prepared::Yes,
                Err(e) => Prepared::Failed(e.to_string()),
            };
        }
        self.info().put_prewarmed(slot);
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

    /// Moves the (idle) session to the active backend: swaps to the connection
    /// prepared beforehand (or opens one and replays the state now). A session
    /// whose state cannot move is closed with a clear error.
    async fn migrate(&mut self) -> Result<(), End> {
        let proxy = self.proxy.clone();
        let active = proxy.active_backend();
        if active.name == self.relay.backend.target.name {
            return Ok(());
        }
        let id = self.info().id;
        let (target, mut new, prepared) = match self.info().take_prewarmed() {
            Some(Prewarmed { target, conn, state }) if target.name == active.name => (target, conn, state),
            _ => match active.connect(&self.info().startup_params.to_vec(), &self.info().creds).await {
                Ok(c) => (active.clone(), c, Prepared::No),
                Err(e) => {
                    tracing::warn!(session = id, error = %e, "cannot open a connection on the new backend");
                    proxy.cutover_tally().closed(id, e.to_string());
                    return Err(End::Closed(e.client_error(&active.name)));
                }
            },
        };
        let mut old_async = Vec::new();
        let mut new_async = Vec::new();
        let mut new_params = params::Params::from(&new.params);
        let moved = match prepared {
            Prepared::Yes => Ok(()),
            Prepared::Failed(why) => Err(why),
            Prepared::No => async {
                self.unabort(&mut old_async).await?;
                let state = migrate::read_state(&mut self.relay.backend.stream, &mut old_async).await?;
                migrate::replay(&mut new.stream, &state, &mut new_async).await
            }
            .await
            .map_err(|e| e.to_string()),
        };
        let old_pid = self.relay.backend.key.pid;
        self.deliver(old_async, old_pid, None);
        self.deliver(new_async, new.key.pid, Some(&mut new_params));
        if let Err(e) = moved {
            tracing::warn!(session = id, error = %e, "session cannot move; closing it");
            proxy.cutover_tally().closed(id, e.clone());
            terminate_backend(new.stream, new.port).await;
            return Err(End::Closed(PgError::fatal(
                sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("pgcutover moved the database to another server and could not bring this session along: {e}; reconnect"),
            )));
        }
        // The client learns what differs on the new server (server_version, ...).
        let mut changed = BytesMut::new();
        for (name, value) in new_params.iter() {
            if self.relay.params.get(name) != Some(value) {
                write::parameter_status(&mut changed, name, value);
            }
        }
        for (name, value) in new_params.iter() {
            self.relay.params.set(name, value);
        }
        self.relay.to_client.extend(&changed);
        let old = std::mem::replace(&mut self.relay.backend, BackendSide { stream: new.stream, target: target.clone(), key: new.key, port: new.port });
        self.info().set_backend(BackendLink { target: target.clone(), key: new.key });
        proxy.cutover_tally().moved(id);
        tracing::debug!(session = id, to = %target.name, "session moved");
        tokio::spawn(terminate_backend(old.stream, old.port));
        Ok(())
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
