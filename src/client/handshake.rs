//! From the first byte to an authenticated client: SSLRequest / GSSENCRequest
//! negotiation, CancelRequest, protocol version negotiation, StartupMessage checks,
//! the connection limit, and authentication, all within `client_login_timeout`.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::Login;
use crate::config::ClientTlsMode;
use crate::net::Stream;
use crate::protocol::read::{read_startup_packet, ReadError};
use crate::protocol::startup::{self, CancelKey, StartupError, StartupPacket, PROTOCOL_3_0};
use crate::protocol::{sqlstate, write, PgError};
use crate::server::Proxy;
use crate::session::fail;

pub enum Accepted {
    Login(Login),
    /// A CancelRequest, with the connection that brought it: PostgreSQL closes
    /// that connection only once the signal is sent, and clients wait for the
    /// close before they go on (so must we, or the cancel lands on their next
    /// statement).
    Cancel(Stream, CancelKey),
    /// A client of the admin console (database `pgcutover`).
    Admin(Stream, startup::StartupMessage),
}

/// Runs the handshake. Returns `None` when the connection ended (the client was told
/// why, where a client can be told).
pub async fn accept(proxy: &Arc<Proxy>, stream: Stream, peer: String) -> Option<Accepted> {
    let timeout = proxy.config().proxy.client_login_timeout;
    // The stream lives in this slot rather than in the timed future, so that a
    // client that stalls can still be told why it is dropped.
    let mut slot = Some(stream);
    let outcome = tokio::time::timeout(timeout, negotiate(proxy, &mut slot, &peer)).await;
    let result = match outcome {
        Ok(r) => r,
        Err(_) => Err(Some(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, "timeout during startup and authentication"))),
    };
    match result {
        Ok(Step::Cancel(key)) => Some(Accepted::Cancel(slot.take()?, key)),
        Ok(Step::Admin(startup)) => Some(Accepted::Admin(slot.take()?, startup)),
        Ok(Step::Login(parts)) => {
            let stream = slot.take()?;
            Some(Accepted::Login(parts.into_login(stream, peer)))
        }
        Err(err) => {
            if let (Some(err), Some(stream)) = (err, slot.as_mut()) {
                tracing::info!(%peer, error = %err, "client refused");
                fail(stream, &err).await;
            }
            None
        }
    }
}

enum Step {
    Cancel(CancelKey),
    Admin(startup::StartupMessage),
    /// The login without its stream and peer, which `accept` fills in.
    Login(LoginParts),
}

struct LoginParts {
    startup: startup::StartupMessage,
    creds: crate::auth::BackendCredentials,
    permit: tokio::sync::OwnedSemaphorePermit,
}

impl LoginParts {
    fn into_login(self, stream: Stream, peer: String) -> Login {
        Login { stream, startup: self.startup, creds: self.creds, peer, permit: self.permit }
    }
}

/// `Err(None)`: the connection is gone or must end silently; `Err(Some(e))`: tell the
/// client `e` and end.
async fn negotiate(proxy: &Arc<Proxy>, slot: &mut Option<Stream>, peer: &str) -> Result<Step, Option<PgError>> {
    let config = proxy.config();
    let read_err = |e: ReadError| match e {
        ReadError::Protocol(p) => Some(p),
        ReadError::Silent(why) => {
            tracing::info!(%peer, "client refused: {why}");
            None
        }
        ReadError::Closed | ReadError::Io(_) => None,
    };
    let mut done = startup::Negotiated::default();
    loop {
        let stream = slot.as_mut().ok_or(None)?;
        let packet = read_startup_packet(stream).await.map_err(read_err)?;
        let packet = match startup::parse(&packet, done) {
            Ok(p) => p,
            Err(StartupError::Fatal(e)) => return Err(Some(e)),
            Err(e) => {
                // Answered as PostgreSQL answers it: silence, or an old-protocol text.
                tracing::info!(%peer, error = %e, "client refused");
                if let Some(reply) = e.reply() {
                    let _ = stream.write_all(&reply).await;
                }
                return Err(None);
            }
        };
        match packet {
            StartupPacket::SslRequest => {
                done.ssl = true;
                let tls = proxy.client_tls();
                let offer = matches!(stream, Stream::Tcp(_)) && tls.is_some() && config.proxy.tls_mode != ClientTlsMode::Disable;
                stream.write_all(if offer { b"S" } else { b"N" }).await.map_err(|_| None)?;
                if let (true, Some(tls)) = (offer, tls) {
                    let Some(Stream::Tcp(tcp)) = slot.take() else { return Err(None) };
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
                    match acceptor.accept(tcp).await {
                        Ok(s) => *slot = Some(Stream::ServerTls(Box::new(s))),
                        Err(e) => {
                            tracing::info!(%peer, error = %e, "client TLS handshake failed");
                            return Err(None);
                        }
                    }
                }
            }
            StartupPacket::GssEncRequest => {
                done.gss = true;
                stream.write_all(b"N").await.map_err(|_| None)?;
            }
            StartupPacket::Cancel(key) => return Ok(Step::Cancel(key)),
            StartupPacket::Startup(msg) => {
                if config.proxy.tls_mode == ClientTlsMode::Require && matches!(stream, Stream::Tcp(_)) {
                    return Err(Some(PgError::fatal(sqlstate::INVALID_AUTHORIZATION, "SSL required")));
                }
                if msg.minor_version > 0 || !msg.unsupported_options.is_empty() {
                    let mut buf = BytesMut::new();
                    write::negotiate_protocol_version(&mut buf, PROTOCOL_3_0 as i32, &msg.unsupported_options);
                    stream.write_all(&buf).await.map_err(|_| None)?;
                }
                if msg.get("replication").is_some_and(|v| !matches!(v, "false" | "off" | "no" | "0")) {
                    return Err(Some(PgError::fatal(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "replication connections are not supported through pgcutover",
                    )));
                }
                if msg.database() == crate::admin::DATABASE {
                    admit_admin(proxy, stream, &msg).await?;
                    let mut ok = BytesMut::new();
                    write::auth_ok(&mut ok);
                    stream.write_all(&ok).await.map_err(|_| None)?;
                    return Ok(Step::Admin(msg));
                }
                if proxy.is_shutting_down() {
                    return Err(Some(PgError::fatal(sqlstate::CANNOT_CONNECT_NOW, "pgcutover is shutting down")));
                }
                let permit = proxy.client_slots().try_acquire_owned().map_err(|_| {
                    Some(PgError::fatal(sqlstate::TOO_MANY_CONNECTIONS, "sorry, too many clients already"))
                })?;
                let creds = super::auth::authenticate(proxy, stream, msg.user()).await?;
                let mut ok = BytesMut::new();
                write::auth_ok(&mut ok);
                stream.write_all(&ok).await.map_err(|_| None)?;
                return Ok(Step::Login(LoginParts { startup: msg, creds, permit }));
            }
        }
    }
}

/// The admin console: anyone who can reach the Unix socket (its directory is 0700),
/// and over TCP only users marked `admin`, after authenticating.
async fn admit_admin(proxy: &Arc<Proxy>, stream: &mut Stream, msg: &startup::StartupMessage) -> Result<(), Option<PgError>> {
    if stream.is_unix() {
        return Ok(());
    }
    let users = proxy.users();
    if !users.has_admin() {
        return Err(Some(PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "the pgcutover admin console is only reachable over the Unix socket (no admin user is configured)",
        )));
    }
    let is_admin = users.get(msg.user()).is_some_and(|u| u.admin);
    super::auth::authenticate(proxy, stream, msg.user()).await?;
    if !is_admin {
        return Err(Some(PgError::fatal(sqlstate::INVALID_AUTHORIZATION, format!("user \"{}\" may not use the admin console", msg.user()))));
    }
    Ok(())
}
