//! The relay: bytes in, bytes out, between one client and its backend.
//!
//! Two pumps run concurrently in the session's task, one per direction, so that a
//! backend blocked on writing results can never stall a client still sending (the
//! classic proxy deadlock with pipelined batches). Each pump reads into a reused
//! buffer, walks whole frames with the scanner, looks only at the few messages the
//! proxy must understand, and writes what it read in one call.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::registry::SessionInfo;
use crate::protocol::frame::{FrameError, Scan, Scanner};

/// Free space guaranteed before each read.
const READ_CHUNK: usize = 16 * 1024;

/// A direction's buffer and scanner state. It lives outside the pump futures, so
/// that dropping a pump (when the other direction ends) loses no read bytes.
pub struct Pump {
    buf: BytesMut,
    scanner: Scanner,
    /// INVARIANT: true from before a write starts until it completed; if a pump is
    /// dropped while true, the peer may hold a partial frame and nothing may be
    /// injected into that stream any more.
    writing: AtomicBool,
    /// The last complete frame forwarded was an ErrorResponse.
    last_was_error: bool,
}

impl Pump {
    pub fn new(limit: u32) -> Pump {
        Pump { buf: BytesMut::with_capacity(2 * READ_CHUNK), scanner: Scanner::new(limit), writing: AtomicBool::new(false), last_was_error: false }
    }

    /// True when the peer this pump writes to has seen only whole frames.
    pub fn peer_at_boundary(&self) -> bool {
        !self.writing.load(Ordering::Relaxed) && self.scanner.at_boundary()
    }

    pub fn last_was_error(&self) -> bool {
        self.last_was_error
    }

    async fn fill<R: AsyncRead + Unpin>(&mut self, rd: &mut R) -> std::io::Result<usize> {
        self.buf.reserve(READ_CHUNK);
        rd.read_buf(&mut self.buf).await
    }

    async fn flush<W: AsyncWrite + Unpin>(&mut self, wr: &mut W, upto: usize) -> std::io::Result<()> {
        if upto > 0 {
            self.writing.store(true, Ordering::Relaxed);
            wr.write_all(&self.buf[..upto]).await?;
            self.writing.store(false, Ordering::Relaxed);
            self.buf.advance(upto);
        }
        Ok(())
    }
}

/// Why a pump stopped.
#[derive(Debug)]
pub enum End {
    /// The client sent Terminate (forwarded to the backend).
    ClientTerminated,
    /// The client closed its connection or it failed.
    ClientGone(Option<std::io::Error>),
    ClientProtocol(FrameError),
    BackendGone(Option<std::io::Error>),
    BackendProtocol(FrameError),
}

/// Client → backend. Counts requests (Query, Sync, FunctionCall) so the session
/// knows when a ReadyForQuery answers the last of them.
pub async fn client_to_backend<R, W>(rd: &mut R, wr: &mut W, pump: &mut Pump, info: &SessionInfo) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        match pump.fill(rd).await {
            Ok(0) => return End::ClientGone(None),
            Ok(n) => info.bytes_in.fetch_add(n as u64, Ordering::Relaxed),
            Err(e) => return End::ClientGone(Some(e)),
        };
        let mut pos = 0;
        let mut terminated = false;
        while !terminated {
            match pump.scanner.scan(&pump.buf[pos..]) {
                Err(e) => return End::ClientProtocol(e),
                Ok(Scan::Incomplete) => break,
                Ok(Scan::Body(n)) => pos += n,
                Ok(Scan::Frame { tag, total }) => {
                    match tag {
                        b'Q' | b'S' | b'F' => info.on_request(),
                        b'X' => terminated = true,
                        _ => {}
                    }
                    pos += pump.scanner.pass(total, pump.buf.len() - pos);
                }
            }
        }
        if let Err(e) = pump.flush(wr, pos).await {
            return End::BackendGone(Some(e));
        }
        if terminated {
            return End::ClientTerminated;
        }
    }
}

/// Backend → client. Tracks the transaction state from ReadyForQuery and shows the
/// client its minted pid in NotificationResponse.
pub async fn backend_to_client<R, W>(rd: &mut R, wr: &mut W, pump: &mut Pump, info: &SessionInfo, backend_pid: i32) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let backend_pid = backend_pid.to_be_bytes();
    let client_pid = info.key.pid.to_be_bytes();
    loop {
        match pump.fill(rd).await {
            Ok(0) => return End::BackendGone(None),
            Ok(_) => {}
            Err(e) => return End::BackendGone(Some(e)),
        }
        let mut pos = 0;
        loop {
            let avail = pump.buf.len() - pos;
            match pump.scanner.scan(&pump.buf[pos..]) {
                Err(e) => return End::BackendProtocol(e),
                Ok(Scan::Incomplete) => break,
                Ok(Scan::Body(n)) => pos += n,
                Ok(Scan::Frame { tag, total }) => {
                    // How much of this frame must be at hand to look at it.
                    let need = match tag {
                        b'Z' => 6,
                        b'A' => 9,
                        _ => 0,
                    };
                    if avail < need.min(total) {
                        break;
                    }
                    let frame = &mut pump.buf[pos..];
                    match tag {
                        b'Z' if total >= 6 => info.on_ready(frame[5]),
                        b'A' if total >= 9 && frame[5..9] == backend_pid => frame[5..9].copy_from_slice(&client_pid),
                        _ => {}
                    }
                    pump.last_was_error = tag == b'E';
                    pos += pump.scanner.pass(total, avail);
                }
            }
        }
        if let Err(e) = pump.flush(wr, pos).await {
            return End::ClientGone(Some(e));
        }
        info.bytes_out.fetch_add(pos as u64, Ordering::Relaxed);
    }
}

/// A session to run the pumps with, for the fuzz targets: registered, with a backend
/// that is never connected.
pub mod fuzzing {
    use std::sync::Arc;

    use crate::backend::BackendTarget;
    use crate::config::BackendConfig;
    use crate::protocol::startup::CancelKey;
    use crate::session::registry::{BackendLink, NewSession, Registry, SessionGuard};

    pub fn session() -> SessionGuard {
        let config = BackendConfig {
            host: "127.0.0.1".into(),
            port: 1,
            tls: crate::config::BackendTlsMode::Disable,
            tls_ca: None,
            connect_timeout: std::time::Duration::from_secs(1),
        };
        let target = match BackendTarget::new("fuzz", &config) {
            Ok(t) => Arc::new(t),
            Err(e) => panic!("a backend without TLS cannot fail to build: {e}"),
        };
        Arc::new(Registry::default()).register(NewSession {
            user: "fuzz".into(),
            database: "fuzz".into(),
            application_name: String::new(),
            client_addr: "fuzz".into(),
            backend: BackendLink { target, key: CancelKey { pid: 1234, secret: 1 } },
            tx_status: b'I',
        })
    }
}
