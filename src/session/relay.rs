//! The relay: bytes in, bytes out, between one client and its backend.
//!
//! Two pumps run concurrently in the session's task, one per direction, so that a
//! backend blocked on writing results can never stall a client still sending (the
//! classic proxy deadlock with pipelined batches). Each pump reads into a reused
//! buffer, walks whole frames with the scanner, looks only at the few messages the
//! proxy must understand, and writes what it read in one call.
//!
//! The client→backend pump owns the backend's write side: it counts request units,
//! holds new requests at the pause gate, and carries out control requests. The
//! backend→client pump owns the client's write side: it tracks the transaction
//! state, and is the only writer of what the proxy itself tells the client.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::aborted::{cancelled_error, Aborted};
use super::registry::{Control, SessionInfo, TxState, CANCEL_DELIVERED, CANCEL_NONE, CANCEL_PENDING};
use crate::gate::Gate;
use crate::protocol::frame::{FrameError, Scan, Scanner};
use crate::protocol::read::parse_fields;
use crate::protocol::{sqlstate, write};

/// Free space guaranteed before each read.
const READ_CHUNK: usize = 16 * 1024;
/// Frames the proxy must read whole (error responses, requests in an emulated
/// failed transaction) are at most this large; larger ones only pass.
const INSPECT_LIMIT: usize = 64 * 1024;

/// A direction's buffer and scanner state. It lives outside the pump futures, so
/// that dropping a pump (when the other direction ends) loses no read bytes.
pub struct Pump {
    buf: BytesMut,
    scanner: Scanner,
    /// INVARIANT: true from before a write starts until it completed; if a pump is
    /// dropped while true, the peer may hold a partial frame and nothing may be
    /// injected into that stream any more.
    writing: AtomicBool,
    /// The frame being passed over is dropped rather than forwarded.
    dropping: bool,
    /// The last complete frame forwarded was an ErrorResponse.
    last_was_error: bool,
}

impl Pump {
    pub fn new(limit: u32) -> Pump {
        Pump {
            buf: BytesMut::with_capacity(2 * READ_CHUNK),
            scanner: Scanner::new(limit),
            writing: AtomicBool::new(false),
            dropping: false,
            last_was_error: false,
        }
    }

    /// True when the peer this pump writes to has seen only whole frames.
    pub fn peer_at_boundary(&self) -> bool {
        !self.writing.load(Ordering::Relaxed) && self.scanner.at_boundary() && !self.dropping
    }

    pub fn last_was_error(&self) -> bool {
        self.last_was_error
    }

    async fn fill<R: AsyncRead + Unpin>(&mut self, rd: &mut R) -> std::io::Result<usize> {
        self.buf.reserve(READ_CHUNK);
        rd.read_buf(&mut self.buf).await
    }

    /// Writes `buf[..upto]` and drops it from the buffer.
    async fn flush<W: AsyncWrite + Unpin>(&mut self, wr: &mut W, upto: usize) -> std::io::Result<()> {
        if upto > 0 {
            self.write(wr, upto).await?;
            self.buf.advance(upto);
        }
        Ok(())
    }

    async fn write<W: AsyncWrite + Unpin>(&self, wr: &mut W, upto: usize) -> std::io::Result<()> {
        self.writing.store(true, Ordering::Relaxed);
        wr.write_all(&self.buf[..upto]).await?;
        self.writing.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Drops the frame at the front of the buffer (`total` bytes, possibly not all
    /// read yet: the rest is dropped as it arrives).
    fn drop_frame(&mut self, total: usize) {
        let consumed = self.scanner.pass(total, self.buf.len());
        self.buf.advance(consumed);
        self.dropping = !self.scanner.at_boundary();
    }

    /// Passes over `n` body bytes at the front of a dropped frame.
    fn drop_body(&mut self, n: usize) {
        self.buf.advance(n);
        self.dropping = !self.scanner.at_boundary();
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
    /// The proxy is shutting down (or was told to end this session).
    Shutdown,
    /// The session is idle and must move to the active backend.
    Migrate,
    /// The session is idle: copy its state onto its prewarmed connection.
    Prepare,
}

/// The client→backend side's state beyond its buffer.
pub struct Upstream<'a> {
    pub info: &'a SessionInfo,
    pub gate: &'a Gate,
    pub gate_rx: watch::Receiver<bool>,
    pub control: mpsc::UnboundedReceiver<Control>,
    /// What the proxy answers itself goes to the client through the other pump.
    pub to_client: mpsc::UnboundedSender<Bytes>,
    /// Extended-protocol messages were sent since the last Sync.
    open_batch: bool,
    /// The client believes it is in a failed transaction the proxy ended.
    aborted: Option<Aborted>,
}

impl<'a> Upstream<'a> {
    pub fn new(info: &'a SessionInfo, gate: &'a Gate, control: mpsc::UnboundedReceiver<Control>, to_client: mpsc::UnboundedSender<Bytes>) -> Upstream<'a> {
        Upstream { info, gate, gate_rx: gate.subscribe(), control, to_client, open_batch: false, aborted: None }
    }

    /// Does a frame with this tag start a new request unit? Returns the answer and
    /// the batch state that follows if it is let through.
    fn unit(&self, tag: u8) -> (bool, bool) {
        match tag {
            b'Q' | b'F' => (true, self.open_batch),
            b'S' => (!self.open_batch, false),
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => (!self.open_batch, true),
            _ => (false, self.open_batch),
        }
    }

    /// Carries out a control request. Returns how the session ends, if it does.
    async fn on_control<W: AsyncWrite + Unpin>(&mut self, c: Control, pump: &Pump, wr: &mut W) -> Option<End> {
        match c {
            Control::Kill => Some(End::Shutdown),
            Control::Migrate | Control::Prepare => {
                let idle = self.info.quiescent() && pump.scanner.at_boundary() && self.info.swallow.load(Ordering::SeqCst) == 0;
                idle.then_some(if c == Control::Migrate { End::Migrate } else { End::Prepare })
            }
            Control::Shutdown => {
                self.info.shutting_down.store(true, Ordering::SeqCst);
                (self.info.quiescent() && pump.scanner.at_boundary()).then_some(End::Shutdown)
            }
            Control::EndTransaction { error_pending } => {
                // Only between requests: with a query running, the backend→client
                // pump asks again at its ReadyForQuery.
                if self.info.outstanding() > 0 || !pump.scanner.at_boundary() || self.aborted.is_some() {
                    return None;
                }
                self.info.cancel_mark.store(CANCEL_NONE, Ordering::SeqCst);
                if self.info.tx_state() == TxState::Idle {
                    return None;
                }
                self.aborted = Some(Aborted::new(error_pending));
                self.info.swallow.fetch_add(1, Ordering::SeqCst);
                self.info.begin_request();
                let mut q = BytesMut::new();
                write::frontend_message(&mut q, b'Q', b"ROLLBACK\0");
                if let Err(e) = wr.write_all(&q).await {
                    return Some(End::BackendGone(Some(e)));
                }
                tracing::info!(session = self.info.id, "transaction ended for a pause; the client is told when it next asks");
                None
            }
        }
    }

    /// Waits at the closed gate; a control request may end the wait.
    async fn hold<W: AsyncWrite + Unpin>(&mut self, pump: &Pump, wr: &mut W) -> Option<End> {
        let gate = self.gate;
        let info = self.info;
        let mut rx = self.gate_rx.clone();
        let held = gate.hold(&mut rx, info);
        tokio::pin!(held);
        loop {
            tokio::select! {
                biased;
                Some(c) = self.control.recv() => {
                    if let Some(end) = self.on_control(c, pump, wr).await {
                        return Some(end);
                    }
                }
                _ = &mut held => return None,
            }
        }
    }
}

/// Client → backend.
pub async fn client_to_backend<R, W>(rd: &mut R, wr: &mut W, pump: &mut Pump, up: &mut Upstream<'_>) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        if let Some(end) = process_client_bytes(wr, pump, up).await {
            return end;
        }
        tokio::select! {
            biased;
            Some(c) = up.control.recv() => {
                if let Some(end) = up.on_control(c, pump, wr).await {
                    return end;
                }
            }
            r = pump.fill(rd) => match r {
                Ok(0) => return End::ClientGone(None),
                Ok(n) => { up.info.bytes_in.fetch_add(n as u64, Ordering::Relaxed); }
                Err(e) => return End::ClientGone(Some(e)),
            },
        }
    }
}

/// Forwards, holds or answers what the client sent, frame by frame.
async fn process_client_bytes<W: AsyncWrite + Unpin>(wr: &mut W, pump: &mut Pump, up: &mut Upstream<'_>) -> Option<End> {
    let backend_gone = |e| Some(End::BackendGone(Some(e)));
    // INVARIANT: buf[..pos] is scanned and owed to the backend; while dropping, pos == 0.
    let mut pos = 0;
    loop {
        let scan = match pump.scanner.scan(&pump.buf[pos..]) {
            Ok(s) => s,
            Err(e) => return Some(End::ClientProtocol(e)),
        };
        match scan {
            Scan::Incomplete => break,
            Scan::Body(n) if pump.dropping => pump.drop_body(n),
            Scan::Body(n) => pos += n,
            Scan::Frame { tag, total } => {
                let avail = pump.buf.len() - pos;
                if up.aborted.is_some() {
                    // Answer from the emulated failed transaction; the backend sees nothing.
                    if total <= INSPECT_LIMIT && avail < total {
                        break;
                    }
                    if let Err(e) = pump.flush(wr, pos).await {
                        return backend_gone(e);
                    }
                    pos = 0;
                    if tag == b'X' {
                        return match wr.write_all(&write::TERMINATE).await {
                            Ok(()) => Some(End::ClientTerminated),
                            Err(e) => backend_gone(e),
                        };
                    }
                    let body_end = total.min(pump.buf.len());
                    let reply = up.aborted.as_mut().map(|a| a.on_frame(tag, &pump.buf[5..body_end]));
                    pump.drop_frame(total);
                    if let Some(reply) = reply {
                        if reply.done {
                            up.aborted = None;
                        }
                        if !reply.bytes.is_empty() {
                            let _ = up.to_client.send(reply.bytes.freeze());
                        }
                    }
                    continue;
                }
                let (starts, batch_after) = up.unit(tag);
                if starts {
                    let before = up.info.begin_request();
                    let idle = before == 0 && up.info.tx_state() == TxState::Idle;
                    if idle && (up.gate.is_closed() || up.info.shutting_down.load(Ordering::SeqCst)) {
                        up.info.unbegin_request();
                        if let Err(e) = pump.flush(wr, pos).await {
                            return backend_gone(e);
                        }
                        pos = 0;
                        if up.info.shutting_down.load(Ordering::SeqCst) {
                            return Some(End::Shutdown);
                        }
                        if let Some(end) = up.hold(pump, wr).await {
                            return Some(end);
                        }
                        // Look at the same frame again: the gate may have closed anew.
                        continue;
                    }
                }
                up.open_batch = batch_after;
                pos += pump.scanner.pass(total, avail);
                if tag == b'X' {
                    if let Err(e) = pump.flush(wr, pos).await {
                        return backend_gone(e);
                    }
                    return Some(End::ClientTerminated);
                }
            }
        }
    }
    match pump.flush(wr, pos).await {
        Ok(()) => None,
        Err(e) => backend_gone(e),
    }
}

/// Backend → client. Tracks the transaction state, shows the client its minted pid
/// in NotificationResponse, turns a pause's cancel into 40001, hides the answers to
/// queries the proxy injected, and writes what the proxy answers itself.
pub async fn backend_to_client<R, W>(
    rd: &mut R,
    wr: &mut W,
    pump: &mut Pump,
    info: &SessionInfo,
    gate: &Gate,
    from_proxy: &mut mpsc::UnboundedReceiver<Bytes>,
    backend_pid: i32,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let backend_pid = backend_pid.to_be_bytes();
    let client_pid = info.key.pid.to_be_bytes();
    loop {
        let at_boundary = pump.scanner.at_boundary() && !pump.dropping;
        tokio::select! {
            biased;
            Some(bytes) = from_proxy.recv(), if at_boundary => {
                if let Err(e) = wr.write_all(&bytes).await {
                    return End::ClientGone(Some(e));
                }
                continue;
            }
            r = pump.fill(rd) => match r {
                Ok(0) => return End::BackendGone(None),
                Ok(_) => {}
                Err(e) => return End::BackendGone(Some(e)),
            },
        }
        // INVARIANT: buf[..pos] is scanned and owed to the client; while dropping, pos == 0.
        let mut pos = 0;
        let mut sent = 0u64;
        loop {
            let avail = pump.buf.len() - pos;
            let scan = match pump.scanner.scan(&pump.buf[pos..]) {
                Ok(s) => s,
                Err(e) => return End::BackendProtocol(e),
            };
            match scan {
                Scan::Incomplete => break,
                Scan::Body(n) if pump.dropping => pump.drop_body(n),
                Scan::Body(n) => pos += n,
                Scan::Frame { tag, total } => {
                    let swallowing = info.swallow.load(Ordering::SeqCst) > 0 && !matches!(tag, b'A' | b'N' | b'S');
                    let rewrite = tag == b'E' && info.cancel_mark.load(Ordering::SeqCst) == CANCEL_PENDING && total <= INSPECT_LIMIT;
                    // How much of this frame must be at hand to look at it.
                    let need = match tag {
                        _ if swallowing || rewrite => total.min(INSPECT_LIMIT),
                        b'Z' => 6,
                        b'A' => 9,
                        _ => 0,
                    };
                    if avail < need.min(total) {
                        break;
                    }
                    let frame = &mut pump.buf[pos..];
                    let mut replacement = None;
                    match tag {
                        b'Z' if total >= 6 => {
                            let status = frame[5];
                            if info.on_ready(status) {
                                gate.notify_quiescent();
                                if info.shutting_down.load(Ordering::SeqCst) {
                                    info.control(Control::Shutdown);
                                }
                            }
                            let mark = info.cancel_mark.load(Ordering::SeqCst);
                            if !swallowing && mark != CANCEL_NONE {
                                if status == b'I' {
                                    info.cancel_mark.store(CANCEL_NONE, Ordering::SeqCst);
                                } else {
                                    // INVARIANT: asked before the client sees this
                                    // ReadyForQuery, so its next request finds the
                                    // emulated failed transaction in place.
                                    info.control(Control::EndTransaction { error_pending: mark == CANCEL_PENDING });
                                }
                            }
                            if swallowing {
                                info.swallow.fetch_sub(1, Ordering::SeqCst);
                            }
                        }
                        b'A' if total >= 9 && frame[5..9] == backend_pid => frame[5..9].copy_from_slice(&client_pid),
                        b'E' if rewrite => {
                            let fields = parse_fields(&frame[5..total]);
                            if fields.iter().any(|(c, v)| *c == b'C' && v == sqlstate::QUERY_CANCELED) {
                                info.cancel_mark.store(CANCEL_DELIVERED, Ordering::SeqCst);
                                let mut out = BytesMut::new();
                                write::error_response(&mut out, &cancelled_error());
                                replacement = Some(out);
                            }
                        }
                        _ => {}
                    }
                    if swallowing || replacement.is_some() {
                        if let Err(e) = pump.flush(wr, pos).await {
                            return End::ClientGone(Some(e));
                        }
                        sent += pos as u64;
                        pos = 0;
                        if let Some(out) = replacement {
                            if let Err(e) = wr.write_all(&out).await {
                                return End::ClientGone(Some(e));
                            }
                            pump.last_was_error = true;
                        }
                        pump.drop_frame(total);
                        continue;
                    }
                    pump.last_was_error = tag == b'E';
                    pos += pump.scanner.pass(total, avail);
                }
            }
        }
        if let Err(e) = pump.flush(wr, pos).await {
            return End::ClientGone(Some(e));
        }
        info.bytes_out.fetch_add(sent + pos as u64, Ordering::Relaxed);
    }
}

/// A session to run the pumps with, for the fuzz targets: registered, with a backend
/// that is never connected.
pub mod fuzzing {
    use std::sync::Arc;

    use crate::backend::BackendTarget;
    use crate::config::BackendConfig;
    use crate::protocol::startup::CancelKey;
    use crate::session::registry::{BackendLink, Control, NewSession, Registry, SessionGuard};

    pub fn session() -> (SessionGuard, tokio::sync::mpsc::UnboundedReceiver<Control>) {
        let config = BackendConfig {
            host: "127.0.0.1".into(),
            port: 1,
            tls: crate::config::BackendTlsMode::Disable,
            tls_ca: None,
            connect_timeout: std::time::Duration::from_secs(1),
            admin_user: "postgres".into(),
            admin_password: None,
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
            startup_params: Vec::new(),
            creds: Default::default(),
        })
    }
}
