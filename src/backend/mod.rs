//! Backends: where they are, how to reach them, and one logged-in connection.

mod login;
pub mod ports;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UnixStream};

use crate::auth::BackendCredentials;
use crate::config::{BackendConfig, BackendTlsMode};
use crate::net::Stream;
use crate::protocol::startup::{encode_cancel, CancelKey};
use crate::protocol::{sqlstate, PgError};

/// A configured backend, ready to be connected to.
pub struct BackendTarget {
    pub name: String,
    pub config: BackendConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// A logged-in backend connection, positioned right after its first ReadyForQuery.
pub struct BackendConn {
    pub stream: Stream,
    /// The backend's own cancel key.
    pub key: CancelKey,
    /// ParameterStatus values, in the order the backend sent them.
    pub params: Vec<(String, String)>,
    /// The status byte of the first ReadyForQuery.
    pub ready_status: u8,
    /// Keeps the connection's local port known as the proxy's own.
    pub port: ports::PortGuard,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend refused us with an ErrorResponse; the raw frame goes to the client.
    #[error("backend refused the connection: {message}")]
    Refused { frame: BytesMut, message: String },
    #[error("cannot reach backend: {0}")]
    Unreachable(std::io::Error),
    #[error("timed out connecting to the backend")]
    Timeout,
    #[error("TLS with the backend failed: {0}")]
    Tls(String),
    #[error("cannot log in to the backend: {0}")]
    Login(String),
    #[error("backend protocol error: {0}")]
    Protocol(String),
}

impl BackendError {
    /// What the client is told when this error is ours rather than the backend's.
    pub fn client_error(&self, backend: &str) -> PgError {
        match self {
            BackendError::Login(why) => PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                format!("pgcutover could not log in to backend \"{backend}\": {why}"),
            ),
            other => PgError::fatal(
                sqlstate::CONNECTION_FAILURE,
                format!("pgcutover could not connect to backend \"{backend}\""),
            )
            .with_detail(other.to_string()),
        }
    }
}

impl BackendTarget {
    pub fn new(name: &str, config: &BackendConfig) -> Result<BackendTarget, crate::tls::TlsError> {
        let tls = crate::tls::client_tls(config.tls, config.tls_ca.as_deref())?;
        Ok(BackendTarget { name: name.to_owned(), config: config.clone(), tls })
    }

    pub fn describe(&self) -> String {
        if self.config.host.starts_with('/') {
            format!("{}/.s.PGSQL.{}", self.config.host, self.config.port)
        } else {
            format!("{}:{}", self.config.host, self.config.port)
        }
    }

    /// A plain transport connection, TCP or Unix.
    async fn open(&self) -> Result<Stream, BackendError> {
        let connect = async {
            if self.config.host.starts_with('/') {
                let path = format!("{}/.s.PGSQL.{}", self.config.host, self.config.port);
                UnixStream::connect(path).await.map(Stream::Unix)
            } else {
                let s = TcpStream::connect((self.config.host.as_str(), self.config.port)).await?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        };
        match tokio::time::timeout(self.config.connect_timeout, connect).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(BackendError::Unreachable(e)),
            Err(_) => Err(BackendError::Timeout),
        }
    }

    /// Connects, negotiates TLS per the backend's mode, and logs in as the client.
    /// The whole exchange after the TCP connect is bounded: a server that accepts and
    /// then says nothing (in the SSL negotiation, the TLS handshake or the login)
    /// times out instead of hanging its caller.
    pub async fn connect(&self, params: &[(String, String)], creds: &BackendCredentials) -> Result<BackendConn, BackendError> {
        let stream = self.open().await?;
        let port = ports::PortGuard::hold(match &stream {
            Stream::Tcp(s) => s.local_addr().ok().map(|a| a.port()),
            _ => None,
        });
        let user = params.iter().find(|(k, _)| k == "user").map(|(_, v)| v.as_str()).unwrap_or_default();
        let handshake = async {
            let stream = match (&self.tls, stream) {
                (Some(tls), Stream::Tcp(tcp)) => self.negotiate_tls(tls.clone(), tcp).await?,
                (_, stream) => stream,
            };
            login::login(stream, params, user, creds).await
        };
        match tokio::time::timeout(self.config.connect_timeout.max(Duration::from_secs(1)) * 2, handshake).await {
            Ok(r) => r.map(|conn| BackendConn { port, ..conn }),
            Err(_) => Err(BackendError::Timeout),
        }
    }

    async fn negotiate_tls(&self, tls: Arc<rustls::ClientConfig>, mut tcp: TcpStream) -> Result<Stream, BackendError> {
        use tokio::io::AsyncReadExt;
        let request = [0u8, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        tcp.write_all(&request).await.map_err(BackendError::Unreachable)?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.map_err(BackendError::Unreachable)?;
        match answer[0] {
            b'S' => {
                let name = crate::tls::server_name(&self.config.host).map_err(BackendError::Tls)?;
                let connector = tokio_rustls::TlsConnector::from(tls);
                let stream = connector.connect(name, tcp).await.map_err(|e| BackendError::Tls(e.to_string()))?;
                Ok(Stream::ClientTls(Box::new(stream)))
            }
            b'N' if self.config.tls == BackendTlsMode::Prefer => Ok(Stream::Tcp(tcp)),
            b'N' => Err(BackendError::Tls("the server does not support SSL".into())),
            other => Err(BackendError::Protocol(format!("unexpected answer {other:#x} to SSLRequest"))),
        }
    }

    /// Sends a CancelRequest for `key` to this backend; best effort, as in libpq.
    pub async fn cancel(&self, key: CancelKey) {
        match self.open().await {
            Ok(mut s) => {
                if let Err(e) = s.write_all(&encode_cancel(key)).await {
                    tracing::warn!(backend = %self.name, error = %e, "cancel request not delivered");
                }
                // The server closes the connection once it has read the request.
                let mut sink = [0u8; 1];
                let _ = tokio::time::timeout(Duration::from_secs(1), tokio::io::AsyncReadExt::read(&mut s, &mut sink)).await;
            }
            Err(e) => tracing::warn!(backend = %self.name, error = %e, "cancel request not delivered"),
        }
    }
}
