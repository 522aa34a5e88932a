//! The accept loops: TCP and the Unix socket, one task per connection on the
//! least busy event loop (see `shards`), until shutdown.

use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use crate::net::Stream;
use crate::server::Proxy;
use crate::shards::Socket;

pub async fn accept_tcp(proxy: Arc<Proxy>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    let _ = socket.set_nodelay(true);
                    serve(&proxy, Stream::Tcp(socket), peer.to_string());
                }
                Err(e) => {
                    // EMFILE and friends: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

pub async fn accept_unix(proxy: Arc<Proxy>, listener: UnixListener, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => {
                    serve(&proxy, Stream::Unix(socket), "unix socket".to_string());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Runs the connection on the least busy event loop (or here, before they exist).
fn serve(proxy: &Arc<Proxy>, socket: Stream, peer: String) {
    let Some(shards) = proxy.shards() else {
        tokio::spawn(super::handle(proxy.clone(), socket, peer));
        return;
    };
    match Socket::detach(socket) {
        Ok(socket) => {
            let proxy = proxy.clone();
            shards.run(socket, move |stream| super::handle(proxy, stream, peer));
        }
        Err(e) => tracing::warn!(error = %e, "cannot hand a new connection to an event loop"),
    }
}
