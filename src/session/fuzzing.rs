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

    /// A ReadyForQuery or NotificationResponse too short for its contents ends the
    /// session with a protocol error, alone or with more frames behind it (the
    /// next frame's bytes are never read as its contents).
    #[tokio::test]
    async fn a_backend_frame_too_short_for_its_contents_ends_the_session() {
        let query = frame(b'Q', b"SELECT 1\0");
        let short_ready = [b'Z', 0, 0, 0, 4];
        let short_notify = frame(b'A', &[0, 0, 4, 210, 0]);
        for backend in [short_ready.to_vec(), [short_ready.to_vec(), frame(b'Z', b"I")].concat(), [short_notify.clone(), frame(b'Z', b"I")].concat()] {
            let (_, to_client, end) = relay_bytes(&query, &backend).await.unwrap();
            assert!(end.contains("BackendProtocol"), "{backend:?}: {end}");
            assert!(!to_client.windows(6).any(|w| w == frame(b'Z', b"I").as_slice()), "the next frame was passed as if the short one were whole: {to_client:?}");
        }
    }

    /// Polls the relay (which must not stop) until `until` is done.
    async fn relay_until<F: std::future::Future>(relay: &mut Relay, until: F) -> F::Output {
        tokio::pin!(until);
        let run = async {
            tokio::select! {
                out = &mut until => out,
                ev = std::future::poll_fn(|cx| relay.poll_relay(cx)) => panic!("the relay stopped: {ev:?}"),
            }
        };
        tokio::time::timeout(Duration::from_secs(10), run).await.expect("the exchange timed out")
    }

    /// Memory follows traffic: after each exchange — a query, a result that
    /// arrives in pieces, a pipelined batch, a result the client reads slowly —
    /// the idle session holds no buffer.
    #[tokio::test]
    async fn an_idle_session_holds_no_relay_buffer() {
        let (guard, _inbox, target, key) = lone_session().unwrap();
        let (client_near, mut client_far) = UnixStream::pair().unwrap();
        let (backend_near, mut backend_far) = UnixStream::pair().unwrap();
        let gate = Arc::new(crate::gate::Gate::new());
        let mut relay = Relay::new(guard.info.clone(), gate, Stream::Unix(client_near), BackendSide { stream: Stream::Unix(backend_near), target, key, port: crate::backend::ports::PortGuard::none() }, 1 << 20, b'I', &[]);
        let query = frame(b'Q', b"SELECT 1\0");
        let result = [frame(b'T', b"\0\0"), frame(b'C', b"SELECT 1\0"), frame(b'Z', b"I")].concat();
        let batch = [frame(b'B', b"\0\0\0\0\0\0\0"), frame(b'E', b"\0\0\0\0\0"), frame(b'S', b"")].concat();
        let batch_result = [frame(b'2', b""), frame(b'C', b"SELECT 1\0"), frame(b'Z', b"I")].concat();
        let row = frame(b'D', &[7u8; 8000]);
        let big = [frame(b'T', b"\0\0"), row.repeat(100), frame(b'C', b"SELECT 100\0"), frame(b'Z', b"I")].concat();
        // (what the client sends, the pieces the backend answers with, whether the
        // client waits before it reads)
        let exchanges: Vec<(Vec<u8>, Vec<Vec<u8>>, bool)> = vec![
            (query.clone(), vec![result.clone()], false),
            (query.clone(), vec![result[..3].to_vec(), result[3..9].to_vec(), result[9..].to_vec()], false),
            ([batch.clone(), batch.clone()].concat(), vec![[batch_result.clone(), batch_result.clone()].concat()], false),
            (query.clone(), vec![big.clone()], true),
        ];
        for (i, (request, pieces, slow)) in exchanges.into_iter().enumerate() {
            client_far.write_all(&request).await.unwrap();
            let mut got = vec![0; request.len()];
            relay_until(&mut relay, backend_far.read_exact(&mut got)).await.unwrap();
            assert_eq!(got, request);
            let answer = pieces.concat();
            let mut back = vec![0; answer.len()];
            let client = async {
                if slow {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                client_far.read_exact(&mut back).await
            };
            let backend = async {
                for piece in &pieces {
                    backend_far.write_all(piece).await?;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok::<_, std::io::Error>(())
            };
            let (read, wrote) = relay_until(&mut relay, async { tokio::join!(client, backend) }).await;
            read.unwrap();
            wrote.unwrap();
            assert_eq!(back, answer, "exchange {i}");
            // Nothing more to read or write: the relay waits, holding nothing.
            let idle = std::future::poll_fn(|cx| std::task::Poll::Ready(relay.poll_relay(cx))).await;
            assert!(idle.is_pending(), "exchange {i}: {idle:?}");
            assert!(!relay.holds_buffers(), "exchange {i}: an idle session holds a buffer");
        }
    }
}
