//! A client session after login: connect its backend, introduce the backend to the
//! client, relay until either side ends, and end the other side cleanly.

pub mod aborted;
pub mod registry;
pub mod relay;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::backend::BackendConn;
use crate::client::Login;
use crate::net::Stream;
use crate::protocol::{sqlstate, write, PgError};
use crate::server::Proxy;
use registry::{BackendLink, NewSession};
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
    relay_until_end(login.stream, conn, &info, proxy.gate(), control, limit).await;
    drop(login.permit);
    tracing::debug!(session = info.id, "session ended");
}

async fn relay_until_end(
    client: Stream,
    backend: BackendConn,
    info: &registry::SessionInfo,
    gate: &crate::gate::Gate,
    control: tokio::sync::mpsc::UnboundedReceiver<registry::Control>,
    limit: u32,
) {
    let (mut crd, mut cwr) = tokio::io::split(client);
    let (mut brd, mut bwr) = tokio::io::split(backend.stream);
    let mut up = Pump::new(limit);
    let mut down = Pump::new(limit);
    let (to_client, mut from_proxy) = tokio::sync::mpsc::unbounded_channel();
    let mut upstream = Upstream::new(info, gate, control, to_client);
    let end = tokio::select! {
        end = relay::client_to_backend(&mut crd, &mut bwr, &mut up, &mut upstream) => end,
        end = relay::backend_to_client(&mut brd, &mut cwr, &mut down, info, gate, &mut from_proxy, backend.key.pid) => end,
    };
    let link = info.backend();
    let backend_name = &link.target.name;
    match end {
        End::ClientTerminated => {}
        End::Shutdown => {
            tell_client(&mut cwr, &down, PgError::fatal(sqlstate::ADMIN_SHUTDOWN, "terminating connection due to administrator command")).await;
            if up.peer_at_boundary() {
                let _ = tokio::time::timeout(Duration::from_secs(1), bwr.write_all(&write::TERMINATE)).await;
            }
        }
        End::ClientGone(_) | End::ClientProtocol(_) => {
            if let End::ClientProtocol(e) = &end {
                tracing::info!(session = info.id, error = %e, "client protocol violation");
                tell_client(&mut cwr, &down, PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string())).await;
            }
            // A query still running would go on after its client left: cancel it.
            if info.outstanding() > 0 {
                link.target.cancel(link.key).await;
            }
            if up.peer_at_boundary() {
                let _ = tokio::time::timeout(Duration::from_secs(1), bwr.write_all(&write::TERMINATE)).await;
            }
        }
        End::BackendGone(e) => {
            tracing::warn!(session = info.id, backend = %backend_name, error = ?e, "backend connection lost");
            if !down.last_was_error() {
                tell_client(&mut cwr, &down, PgError::fatal(
                    sqlstate::CONNECTION_FAILURE,
                    format!("backend \"{backend_name}\" closed the connection unexpectedly"),
                ))
                .await;
            }
        }
        End::BackendProtocol(e) => {
            tracing::warn!(session = info.id, backend = %backend_name, error = %e, "backend protocol violation");
            tell_client(&mut cwr, &down, PgError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("invalid message from backend \"{backend_name}\""))).await;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), cwr.shutdown()).await;
}

/// Injects an error into the client's stream, unless the client holds a partial frame.
async fn tell_client<W: tokio::io::AsyncWrite + Unpin>(cwr: &mut W, down: &Pump, err: PgError) {
    if down.peer_at_boundary() {
        let mut buf = BytesMut::new();
        write::error_response(&mut buf, &err);
        let _ = tokio::time::timeout(Duration::from_secs(1), cwr.write_all(&buf)).await;
    }
}

async fn terminate_backend(mut stream: Stream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&write::TERMINATE)).await;
}
