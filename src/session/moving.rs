//! Moving a session: its state copied onto a prepared connection to a cutover's
//! target, and the swap to the active backend at a point where nothing is in
//! flight (a cutover's repoint, a switchover's promotion).

use std::sync::Arc;

use bytes::BytesMut;

use super::ended::Ended;
use super::registry::{BackendLink, Moved};
use super::relay::{self, BackendSide, End};
use super::{migrate, params, terminate_backend, Session, COPY_TIMEOUT};
use crate::backend::{BackendConn, BackendTarget};
use crate::protocol::{sqlstate, write, PgError};

impl Session {
    /// Brings the backend to a point where it can be asked about the session (the
    /// client's view is kept by the relay): a block the proxy aborted is rolled
    /// back, a quiet batch (prepares only, see `Pipeline::quiet_batch`) is closed
    /// with a Sync of the proxy's own, which changes nothing the client can see.
    async fn settle(&mut self, asynchronous: &mut migrate::Async) -> Result<(), migrate::MigrateError> {
        if self.relay.ended == Ended::Aborted {
            migrate::simple_query(&mut self.relay.backend.stream, "ROLLBACK", asynchronous).await?;
            self.relay.ended = Ended::RolledBack;
        }
        if self.relay.pipeline.quiet_batch() {
            migrate::sync(&mut self.relay.backend.stream, asynchronous).await?;
            self.relay.pipeline.closed();
        }
        Ok(())
    }

    /// Parses the unnamed statement a quiet batch prepared again on the session's
    /// backend (a state read's simple query dropped it; a new backend never had it).
    async fn restore_unnamed(&mut self, asynchronous: &mut migrate::Async) -> Result<(), migrate::MigrateError> {
        match &self.relay.unnamed_parse {
            Some(parse) => migrate::parse_again(&mut self.relay.backend.stream, parse, asynchronous).await,
            None => Ok(()),
        }
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
            self.settle(&mut old_async).await?;
            let read = migrate::read_state(&mut self.relay.backend.stream, &self.relay.custom, &mut old_async).await?;
            self.restore_unnamed(&mut old_async).await?;
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
        let old = self.relay.backend.target.clone();
        let old_pid = self.relay.backend.key.pid;
        self.deliver(old_async, Some(&old.name), old_pid, None);
        let mut params = params::Params::from(&conn.params);
        self.deliver(new_async, None, conn.key.pid, Some(&mut params));
        conn.params = params.to_vec();
        copied
    }

    /// Before the pause, while the session is idle: copies its state onto the
    /// prewarmed connection, so that the switch itself is only a swap. The copy is
    /// current as long as the session starts no request (see `Relay::requests`).
    pub(super) async fn prepare(&mut self) {
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
    /// something: notifications with the pids clients know (the session's own, or
    /// on `backend` another session's minted pid), ParameterStatus folded into
    /// `params` (the new backend's, diffed at the swap) or passed on.
    fn deliver(&mut self, frames: migrate::Async, backend: Option<&str>, backend_pid: i32, mut params: Option<&mut params::Params>) {
        for mut frame in frames {
            match frame.first() {
                Some(b'A') if frame.len() >= 9 => {
                    let sender = i32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]);
                    let minted = if sender == backend_pid { Some(self.relay.info.key.pid) } else { backend.and_then(|b| self.relay.info.minted_pid_of(b, sender)) };
                    if let Some(minted) = minted {
                        frame[5..9].copy_from_slice(&minted.to_be_bytes());
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
    pub(super) async fn reroute(&mut self) -> Result<(), End> {
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
                self.settle(&mut asynchronous).await?;
                let now = migrate::read_state(&mut self.relay.backend.stream, &self.relay.custom, &mut asynchronous).await?;
                self.restore_unnamed(&mut asynchronous).await?;
                Ok::<_, migrate::MigrateError>(now)
            };
            current = matches!(read.await, Ok(now) if now == *before);
            let old = self.relay.backend.target.clone();
            let old_pid = self.relay.backend.key.pid;
            self.deliver(asynchronous, Some(&old.name), old_pid, None);
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
        if self.relay.unnamed_parse.is_some() {
            let mut asynchronous = Vec::new();
            if let Err(e) = self.restore_unnamed(&mut asynchronous).await {
                // The client's next Bind of it gets PostgreSQL's own error.
                tracing::warn!(session = id, error = %e, "the unnamed statement could not be parsed again on the new backend");
            }
            let pid = new.key.pid;
            self.deliver(asynchronous, Some(&target.name), pid, None);
        }
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
        self.deliver(asynchronous, None, conn.key.pid, Some(&mut params));
        conn.params = params.to_vec();
        match rows?.last().map(|r| r.as_slice()) {
            Some([Some(recovering), Some(writable)]) if recovering == b"false" && writable == b"true" => Ok(()),
            Some([Some(recovering), _]) if recovering == b"true" => Err(migrate::MigrateError::Differs("the server is still in recovery".into())),
            _ => Err(migrate::MigrateError::Differs("transactions are read-only there".into())),
        }
    }
}
