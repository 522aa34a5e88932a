//! The client side: accept connections, negotiate TLS, read the startup packet,
//! authenticate, and hand a logged-in client to a session.

mod auth;
pub use auth::fuzzing;
mod handshake;
pub mod listener;

use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;

use crate::auth::BackendCredentials;
use crate::net::Stream;
use crate::protocol::startup::StartupMessage;
use crate::server::Proxy;

/// A client that has authenticated and waits for its backend.
pub struct Login {
    pub stream: Stream,
    pub startup: StartupMessage,
    pub creds: BackendCredentials,
    pub peer: String,
    /// Holds one of `max_client_connections` until the session ends.
    pub permit: OwnedSemaphorePermit,
}

/// Serves one accepted connection from its first byte to its end.
pub async fn handle(proxy: Arc<Proxy>, stream: Stream, peer: String) {
    // The handshake's state is large and short-lived: boxed, an idle session's task
    // does not carry room for it.
    let accepted = Box::pin(handshake::accept(&proxy, stream, peer)).await;
    match accepted {
        Some(handshake::Accepted::Login(login)) => crate::session::run(proxy, login).await,
        Some(handshake::Accepted::Cancel(stream, key)) => {
            Box::pin(proxy.cancel(key)).await;
            // Acknowledged (closed) only now that the cancel was delivered.
            drop(stream);
        }
        Some(handshake::Accepted::Admin(stream, startup)) => Box::pin(crate::admin::serve(proxy, stream, startup)).await,
        None => {}
    }
}
