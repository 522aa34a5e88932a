//! A client session after login: connect its backend, introduce the backend to the
//! client, relay until either side ends — moving to another backend when a cutover
//! asks — and end the other side cleanly.

pub mod aborted;
pub mod migrate;
pub mod registry;
pub mod relay;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::backend::{BackendConn, BackendTarget};
use crate::client::Login;
use crate::net::Stream;
use crate::protocol::{sqlstate, write, PgError};
use crate::server::Proxy;
use registry::{BackendLink, NewSession, Prepared, Prewarmed, SessionInfo};
use relay::{End, Pump, Upstream};

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

pub async fn run(proxy: Arc<Proxy>, mut login: Login) {
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
            return;
        }
        Err(e) => {
            tracing::warn!(user = %login.startup.user(), backend = %target.name, error = %e, "backend connection failed");
            fail(&mut login.stream, &e.client_error(&target.name)).await;
            return;
        }
    };

    let (guard, control) = proxy.sessions.register(NewSession {
        user: login.startup.user().to_owned(),
        database: login.startup.database().to_owned(),
        application_name: login.startup.get("application_name").unwrap_or_default().to_owned(),
        client_addr: login.peer.clone(),
        backend: BackendLink { target: target.clone(), key: conn.key },
        tx_status: conn.ready_status,
        startup_params: login.startup.params.clone(),
        creds: login.creds.clone(),
    });
    let info = guard.info.clone();
    if proxy.is_shutting_down() {
        info.control(registry::Control::Shutdown);
    }
    tracing::debug!(session = info.id, user = %info.user, database = %info.database, backend = %target.name, "session started");

    let mut hello = BytesMut::with_capacity(512);
    for (name, value) in &conn.params {
        write::parameter_status(&mut hello, name, value);
    }
    write::backend_key_data(&mut hello, info.key);
    write::ready_for_query(&mut hello, conn.ready_status);
    if login.stream.write_all(&hello).await.is_err() {
        terminate_backend(conn.stream).await;
        return;
    }

    let limit = proxy.config().proxy.max_message_size;
    let (to_client, mut from_proxy) = tokio::sync::mpsc::unbounded_channel();
    let mut upstream = Upstream::new(&info, proxy.gate(), control, to_client);
    let mut up = Pump::new(limit);
    let mut client = login.stream;
    let mut backend = conn;
    loop {
        let mut down = Pump::new(limit);
        let (c, b, end) = relay_until_end(client, backend.stream, backend.key.pid, &mut up, &mut down, &mut upstream, &mut from_proxy).await;
        client = c;
        backend.stream = b;
        match end {
            End::Prepare => {
                if down.peer_at_boundary() {
                    prepare_move(&info, &mut client, &mut backend.stream).await;
                }
            }
            End::Migrate if !down.peer_at_boundary() => {
                // The client holds part of a message from the old backend: it cannot
                // be switched mid-message.
                proxy.cutover_tally().closed(info.id, "interrupted mid-message".into());
                finish(End::Shutdown, &info, &mut client, backend.stream, &up, &down).await;
                break;
            }
            End::Migrate => match move_backend(&proxy, &info, &mut client, backend).await {
                Some(next) => backend = next,
                None => break,
            },
            end => {
                finish(end, &info, &mut client, backend.stream, &up, &down).await;
                break;
            }
        }
    }
    drop(login.permit);
    tracing::debug!(session = info.id, "session ended");
}

/// Relays until one side ends; gives both streams back.
async fn relay_until_end(
    client: Stream,
    backend: Stream,
    backend_pid: i32,
    up: &mut Pump,
    down: &mut Pump,
    upstream: &mut Upstream<'_>,
    from_proxy: &mut tokio::sync::mpsc::UnboundedReceiver<bytes::Bytes>,
) -> (Stream, Stream, End) {
    let (mut crd, mut cwr) = tokio::io::split(client);
    let (mut brd, mut bwr) = tokio::io::split(backend);
    let info = upstream.info;
    let gate = upstream.gate;
    let end = tokio::select! {
        end = relay::client_to_backend(&mut crd, &mut bwr, up, upstream) => end,
        end = relay::backend_to_client(&mut brd, &mut cwr, down, info, gate, from_proxy, backend_pid) => end,
    };
    (crd.unsplit(cwr), brd.unsplit(bwr), end)
}

/// While the session is held, copies its state onto its prewarmed connection so
/// that the switch itself is only a swap. The state cannot change until then: the
/// session sends nothing while the gate is closed.
async fn prepare_move(info: &Arc<SessionInfo>, client: &mut Stream, old: &mut Stream) {
    let Some(mut slot) = info.take_prewarmed() else { return };
    if slot.state == Prepared::No {
        let mut asynchronous = Vec::new();
        let copied = async {
            let state = migrate::read_state(old, &mut asynchronous).await?;
            migrate::replay(&mut slot.conn.stream, &state, &mut asynchronous).await
        }
        .await;
        for frame in &asynchronous {
            let _ = client.write_all(frame).await;
        }
        slot.state = match copied {
            Ok(()) => Prepared::Yes,
            Err(e) => Prepared::Failed(e.to_string()),
        };
    }
    info.put_prewarmed(slot);
}

/// Moves an idle session to the active backend: reads its state back from the old
/// backend, replays it on a connection opened beforehand (or now), and swaps — or
/// only swaps, when the state was copied beforehand. A session whose state cannot
/// move gets a clear error and is closed.
async fn move_backend(proxy: &Arc<Proxy>, info: &Arc<SessionInfo>, client: &mut Stream, mut old: BackendConn) -> Option<BackendConn> {
    let active = proxy.active_backend();
    let (target, mut new, prepared) = match info.take_prewarmed() {
        Some(Prewarmed { target, conn, state }) if target.name == active.name => (target, conn, state),
        _ => match active.connect(&info.startup_params, &info.creds).await {
            Ok(c) => (active.clone(), c, Prepared::No),
            Err(e) => {
                tracing::warn!(session = info.id, error = %e, "cannot open a connection on the new backend");
                proxy.cutover_tally().closed(info.id, e.to_string());
                fail(client, &e.client_error(&active.name)).await;
                terminate_backend(old.stream).await;
                return None;
            }
        },
    };
    let mut asynchronous = Vec::new();
    let moved = match prepared {
        Prepared::Yes => Ok(()),
        Prepared::Failed(why) => Err(why),
        Prepared::No => async {
            let state = migrate::read_state(&mut old.stream, &mut asynchronous).await?;
            migrate::replay(&mut new.stream, &state, &mut asynchronous).await
        }
        .await
        .map_err(|e| e.to_string()),
    };
    // What the old backend said on its own while we asked belongs to the client.
    for frame in &asynchronous {
        let _ = client.write_all(frame).await;
    }
    match moved {
        Ok(()) => {
            info.set_backend(BackendLink { target: target.clone(), key: new.key });
            proxy.cutover_tally().moved(info.id);
            tracing::debug!(session = info.id, to = %target.name, "session moved");
            terminate_backend(old.stream).await;
            Some(new)
        }
        Err(e) => {
            tracing::warn!(session = info.id, error = %e, "session cannot move; closing it");
            proxy.cutover_tally().closed(info.id, e.to_string());
            let err = PgError::fatal(
                sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("pgcutover moved the database to another server and could not bring this session along: {e}; reconnect"),
            );
            fail(client, &err).await;
            terminate_backend(old.stream).await;
            terminate_backend(new.stream).await;
            None
        }
    }
}

/// Ends the other side cleanly once one side has ended.
async fn finish(end: End, info: &SessionInfo, client: &mut Stream, mut backend: Stream, up: &Pump, down: &Pump) {
    let link = info.backend();
    let backend_name = &link.target.name;
    match end {
        End::ClientTerminated | End::Migrate | End::Prepare => {}
        End::Shutdown => {
            tell_client(client, down, PgError::fatal(sqlstate::ADMIN_SHUTDOWN, "terminating connection due to administrator command")).await;
            if up.peer_at_boundary() {
                let _ = tokio::time::timeout(Duration::from_secs(1), backend.write_all(&write::TERMINATE)).await;
            }
        }
        End::ClientGone(_) | End::ClientProtocol(_) => {
            if let End::ClientProtocol(e) = &end {
                tracing::info!(session = info.id, error = %e, "client protocol violation");
                tell_client(client, down, PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string())).await;
            }
            // A query still running would go on after its client left: cancel it.
            if info.outstanding() > 0 {
                link.target.cancel(link.key).await;
            }
            if up.peer_at_boundary() {
                let _ = tokio::time::timeout(Duration::from_secs(1), backend.write_all(&write::TERMINATE)).await;
            }
        }
        End::BackendGone(e) => {
            tracing::warn!(session = info.id, backend = %backend_name, error = ?e, "backend connection lost");
            if !down.last_was_error() {
                tell_client(client, down, PgError::fatal(sqlstate::CONNECTION_FAILURE, format!("backend \"{backend_name}\" closed the connection unexpectedly"))).await;
            }
        }
        End::BackendProtocol(e) => {
            tracing::warn!(session = info.id, backend = %backend_name, error = %e, "backend protocol violation");
            tell_client(client, down, PgError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("invalid message from backend \"{backend_name}\""))).await;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), client.shutdown()).await;
}

/// Injects an error into the client's stream, unless the client holds a partial frame.
async fn tell_client<W: AsyncWrite + Unpin>(cwr: &mut W, down: &Pump, err: PgError) {
    if down.peer_at_boundary() {
        let mut buf = BytesMut::new();
        write::error_response(&mut buf, &err);
        let _ = tokio::time::timeout(Duration::from_secs(1), cwr.write_all(&buf)).await;
    }
}

async fn terminate_backend(mut stream: Stream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&write::TERMINATE)).await;
}

/// A backend connection for `info` on `target`, with its credentials.
pub async fn prewarm(info: &SessionInfo, target: &Arc<BackendTarget>) -> Result<BackendConn, crate::backend::BackendError> {
    target.connect(&info.startup_params, &info.creds).await
}
