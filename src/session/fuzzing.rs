//! The relay driven by arbitrary bytes, for the fuzz targets and tests: a session
//! whose client and backend are the far ends of two socket pairs.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::inbox::Inbox;
use super::registry::{BackendLink, NewSession, Registry, SessionGuard};
use super::relay::{BackendSide, Event, Relay};
use crate::backend::BackendTarget;
use crate::config::BackendConfig;
use crate::net::Stream;
use crate::protocol::startup::CancelKey;

/// Feeds `client` and `backend` bytes to a relay (each side then closes) and
/// returns what reached the backend and the client, and how the relay ended.
/// A registered session with no connections behind it: its registry entry, its
/// control inbox, and a backend target (port 1, never reached).
pub(crate) fn lone_session() -> std::io::Result<(SessionGuard, Inbox, Arc<BackendTarget>, CancelKey)> {
    let config = BackendConfig {
        host: "127.0.0.1".into(),
        port: 1,
        tls: crate::config::BackendTlsMode::Disable,
        tls_ca: None,
        connect_timeout: Duration::from_secs(1),
        admin_user: "postgres".into(),
        admin_password: None,
        standby_of: None,
    };
    let target = Arc::new(BackendTarget::new("fuzz", &config).map_err(|e| std::io::Error::other(e.to_string()))?);
    let key = CancelKey { pid: 1234, secret: 1 };
    let (guard, inbox) = Arc::new(Registry::default()).register(NewSession {
        user: "fuzz".into(),
        database: "fuzz".into(),
        application_name: String::new(),
        client_addr: "fuzz".into(),
        backend: BackendLink { target: target.clone(), key },
        tx_status: b'I',
        startup_params: Default::default(),
        creds: Default::default(),
    });
    Ok((guard, inbox, target, key))
}

pub async fn relay_bytes(client: &[u8], backend: &[u8]) -> std::io::Result<(Vec<u8>, Vec<u8>, String)> {
    let (guard, _inbox, target, key) = lone_session()?;
    let (client_near, client_far) = UnixStream::pair()?;
    let (backend_near, backend_far) = UnixStream::pair()?;
    let gate = Arc::new(crate::gate::Gate::new());
    let mut relay = Relay::new(guard.info.clone(), gate, Stream::Unix(client_near), BackendSide { stream: Stream::Unix(backend_near), target, key, port: crate::backend::ports::PortGuard::none() }, 1 << 20, b'I', &[]);
    // The client closes once it has sent its bytes; the backend stays until the
    // relay ends, so that the end says what the bytes caused.
    let feed = |mut far: UnixStream, bytes: Vec<u8>, close: bool| async move {
        let _ = far.write_all(&bytes).await;
        if close {
            let _ = far.shutdown().await;
        }
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), far.read_to_end(&mut got)).await;
        got
    };
    let client_task = tokio::spawn(feed(client_far, client.to_vec(), true));
    let backend_task = tokio::spawn(feed(backend_far, backend.to_vec(), false));
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match std::future::poll_fn(|cx| relay.poll_relay(cx)).await {
                Event::End(end) => return format!("{end:?}"),
                Event::Hold => relay.holding = false,
                Event::Ready => relay.want = Default::default(),
                // No other backend here: the session stays where it is.
                Event::Reroute => relay.route_seen = relay.gate.route(),
            }
        }
    })
    .await
    .unwrap_or_else(|_| "timed out".into());
    let _ = relay.flush_backend().await;
    let _ = relay.flush_client().await;
    drop(relay);
    // What each far end read is what the relay sent that side.
    let to_client = client_task.await.map_err(std::io::Error::other)?;
    let to_backend = backend_task.await.map_err(std::io::Error::other)?;
    Ok((to_backend, to_client, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::protocol::frame::tests::frame;

    #[tokio::test]
    async fn frames_pass_both_ways_unchanged_and_a_notification_gets_the_client_pid() {
        let client = [frame(b'Q', b"SELECT 1\0"), frame(b'X', b"")].concat();
        let mut notify = 1234i32.to_be_bytes().to_vec();
        notify.extend_from_slice(b"ch\0hi\0");
        let backend = [frame(b'T', b"\0\0"), frame(b'C', b"SELECT 1\0"), frame(b'Z', b"I"), frame(b'A', &notify)].concat();
        let (to_backend, to_client, end) = relay_bytes(&client, &backend).await.unwrap();
        assert_eq!(to_backend, client);
        assert!(end.contains("ClientTerminated") || end.contains("Gone"), "{end}");
        // The pid in the notification is rewritten only if it is the backend's own.
        assert_eq!(&to_client[..to_client.len() - 16], &backend[..backend.len() - 16]);
    }

    #[tokio::test]
    async fn bad_lengths_end_the_relay_with_a_protocol_error() {
        let (_, _, end) = relay_bytes(&[b'Q', 0, 0, 0, 2], b"").await.unwrap();
        assert!(end.contains("ClientProtocol"), "{end}");
        let (_, _, end) = relay_bytes(&[b'Q', 0, 0, 0, 4], &[b'Z', 0, 0, 0, 1]).await.unwrap();
        assert!(end.contains("BackendProtocol") || end.contains("ClientGone"), "{end}");
    }
}
