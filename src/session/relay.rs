//! The relay: bytes in, bytes out, between one client and its backend.
//!
//! One [`Relay`] owns both streams and every buffer of a session. A single poll
//! function moves bytes both ways (so a backend blocked on writing results never
//! stalls a client still sending: no pipelining deadlock) and returns only at an
//! event: a request to hold, a point where the session may move, or an end. It keeps
//! no state of its own between polls, so dropping it in a `select!` loses nothing.
//! The client side — its stream, buffers and any partial frame — lives across a
//! backend swap: only `backend` changes. The same poll runs as the session's tokio
//! task or, between cutovers, on an express lane's own event loop (`express`).
//!
//! Each direction reads into a pooled buffer, walks whole frames with the scanner,
//! looks only at the few messages the proxy must understand, and moves what it
//! forwards to the peer's output buffer (handing the buffer itself over when it
//! holds nothing else). What the proxy says itself is appended
//! there between whole frames, so ordering is never in doubt. Every write to a
//! stream that can buffer (TLS) is flushed before the relay waits.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;

use super::buffer::{IoBuf, CHUNK};
use super::learn;
use super::io::{poll_in, poll_out, write_out, Inbound};
use super::ended::{self, Ended};
use super::params::Params;
use super::pipeline::{Answer, Backend, Frontend, Pipeline};
use super::registry::{bump, SessionInfo, TxState};
use crate::backend::BackendTarget;
use crate::gate::Gate;
use crate::net::Stream;
use crate::protocol::frame::{FrameError, Scan};
use crate::protocol::read::parse_fields;
use crate::protocol::{sqlstate, write, PgError};

/// Stop reading a side while this much waits to be written to the other.
const HIGH_WATER: usize = 64 * 1024;
/// While a request is held, at most this much more of the client is buffered
/// (enough to see it leave).
const HOLD_BUFFER: usize = 64 * 1024;
/// Frames the proxy reads whole to look inside are at most this large; larger ones
/// only pass.
const INSPECT_LIMIT: usize = 64 * 1024;

/// Why a session ends.
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
    /// The proxy closes the session with this error (it could not move, say).
    Closed(PgError),
}

/// What the relay stops for.
#[derive(Debug)]
pub enum Event {
    /// A new request arrived while the gate is closed: hold it.
    Hold,
    /// Nothing is in flight and a deferred request ([`Want`]) can be carried out.
    Ready,
    /// A new request is about to start after a repoint: the session must look at the
    /// active backend (and move there) before the request goes anywhere.
    Reroute,
    End(End),
}

/// A request from the control plane waiting for a point where nothing is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Want {
    pub prepare: bool,
    pub migrate: bool,
    pub shutdown: bool,
}

impl Want {
    pub fn any(self) -> bool {
        self.prepare || self.migrate || self.shutdown
    }
}

/// A pause's cancel of the running request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    No,
    /// Sent to the backend: its 57014 becomes the client's 40001.
    Sent,
    /// The client got its 40001.
    Delivered,
}

/// The backend side: its stream and who it is.
pub struct BackendSide {
    pub stream: Stream,
    pub target: Arc<BackendTarget>,
    pub key: crate::protocol::startup::CancelKey,
    /// Keeps the connection's local port known as the proxy's own until it is gone.
    pub port: crate::backend::ports::PortGuard,
}

pub struct Relay {
    pub info: Arc<SessionInfo>,
    pub gate: Arc<Gate>,
    pub client: Stream,
    pub backend: BackendSide,
    pub from_client: Inbound,
    pub to_backend: IoBuf,
    backend_unflushed: bool,
    pub from_backend: Inbound,
    pub to_client: IoBuf,
    client_unflushed: bool,
    pub pipeline: Pipeline,
    /// The transaction status the client last saw.
    pub tx: TxState,
    pub ended: Ended,
    /// Answering an extended batch with the 40001 locally: its messages are dropped
    /// up to its Sync, answered with ReadyForQuery of this status.
    skip_to_sync: Option<u8>,
    pub cancel: Cancel,
    /// Times the proxy re-sent ROLLBACK because its own ended in a transaction.
    rollback_retries: u8,
    /// A request is held at the gate.
    pub holding: bool,
    pub want: Want,
    /// The ParameterStatus values the client has seen.
    pub params: Params,
    /// The last whole frame forwarded to the client was an ErrorResponse.
    pub last_was_error: bool,
    busy_published: bool,
    /// The gate's route when this session last looked at the active backend.
    pub route_seen: u64,
    /// Requests started so far: a copy of the session's state made when this was n
    /// is current while it still is n (any request may change session state).
    pub requests: u64,
    /// Custom setting names the session's statements may have set (see `learn`).
    pub custom: Vec<Box<str>>,
}

fn frame_len(b: &[u8]) -> Option<usize> {
    let len = u32::from_be_bytes([*b.get(1)?, *b.get(2)?, *b.get(3)?, *b.get(4)?]) as usize;
    Some(len + 1)
}

/// Does the client's buffered input hold a Terminate among its whole frame headers?
fn terminate_ahead(mut b: &[u8]) -> bool {
    while b.len() >= 5 {
        if b[0] == b'X' {
            return true;
        }
        match frame_len(b) {
            Some(n) if n >= 5 && n <= b.len() => b = &b[n..],
            _ => return false,
        }
    }
    false
}

fn message(out: &mut IoBuf, tag: u8, body: &[u8]) {
    let mut b = BytesMut::with_capacity(body.len() + 5);
    write::frontend_message(&mut b, tag, body);
    out.extend(&b);
}

impl Relay {
    pub fn new(info: Arc<SessionInfo>, gate: Arc<Gate>, client: Stream, backend: BackendSide, limit: u32, tx: u8, params: &[(String, String)]) -> Relay {
        Relay {
            route_seen: gate.route(),
            info,
            gate,
            client,
            backend,
            from_client: Inbound::new(limit),
            to_backend: IoBuf::default(),
            backend_unflushed: false,
            from_backend: Inbound::new(limit),
            to_client: IoBuf::default(),
            client_unflushed: false,
            pipeline: Pipeline::default(),
            tx: TxState::from_status(tx),
            ended: Ended::No,
            skip_to_sync: None,
            cancel: Cancel::No,
            rollback_retries: 0,
            holding: false,
            want: Want::default(),
            params: Params::from(params),
            last_was_error: false,
            busy_published: tx != b'I',
            requests: 0,
            custom: Vec::new(),
        }
    }

    /// The client believes it is outside any transaction and nothing is in flight:
    /// its next request is a new one, which the gate may hold.
    pub fn client_idle(&self) -> bool {
        self.pipeline.is_idle() && self.tx == TxState::Idle && self.ended == Ended::No && self.skip_to_sync.is_none()
    }

    /// Nothing runs and nothing is open on the backend (a block the proxy aborted
    /// holds nothing, and a batch answered locally involves no backend): a drain
    /// need not wait for this session.
    fn quiescent(&self) -> bool {
        self.pipeline.is_idle() && (self.ended != Ended::No || self.tx == TxState::Idle)
    }

    /// The backend may be swapped, or asked about the session's state, now: nothing
    /// owed, no partial frame in either direction towards or from it.
    pub fn movable(&self) -> bool {
        self.quiescent() && self.from_client.at_boundary() && self.from_backend.at_boundary() && self.from_backend.is_empty() && self.to_backend.is_empty()
    }

    /// Whether any of the session's buffers holds an allocation (an idle session
    /// should hold none: memory follows traffic).
    pub fn holds_buffers(&self) -> bool {
        self.from_client.holds_memory() || self.from_backend.holds_memory() || self.to_client.holds_memory() || self.to_backend.holds_memory()
    }

    /// Publishes quiescence for the gate; wakes a drain that may be waiting.
    pub fn publish(&mut self) {
        let busy = !self.quiescent();
        if busy != self.busy_published {
            self.busy_published = busy;
            self.info.set_busy(busy);
            if !busy {
                self.gate.notify_quiescent();
            }
        }
        self.info.set_running(self.pipeline.is_running());
    }

    /// Polls until an event. Cancellation safety: all state lives in `self`; a
    /// poll that is dropped leaves every byte where it was.
    pub fn poll_relay(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        // One turn: read both sides, walk what came in, write what is queued. A
        // turn runs again only when a read brought bytes (the next read registers
        // the waker) or a write made room for a read that was held back; a turn
        // after a write alone would only find every socket Pending. A side whose
        // read returned Pending has its waker set: later turns of this poll skip it.
        let (mut backend_waits, mut client_waits) = (false, false);
        let mut first = true;
        loop {
            let mut again = false;
            // A move waits for a whole frame from the backend: finish a partial one
            // even when the client reads slowly (one frame is bounded).
            let finish_frame = self.want.any() && !self.from_backend.at_boundary();
            let read_backend = self.to_client.len() < HIGH_WATER || finish_frame;
            if read_backend && !backend_waits {
                match poll_in(&mut self.backend.stream, &mut self.from_backend, cx) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Event::End(End::BackendGone(None))),
                    Poll::Ready(Ok(_)) => again = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Event::End(End::BackendGone(Some(e)))),
                    Poll::Pending => backend_waits = true,
                }
            }
            let read_client = if self.holding { self.from_client.len() < HOLD_BUFFER } else { self.to_backend.len() < HIGH_WATER };
            if read_client && !client_waits {
                match poll_in(&mut self.client, &mut self.from_client, cx) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Event::End(End::ClientGone(None))),
                    Poll::Ready(Ok(n)) => {
                        bump(&self.info.bytes_in, n as u64);
                        again = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Event::End(End::ClientGone(Some(e)))),
                    Poll::Pending => client_waits = true,
                }
            }
            if !again && !first {
                // A later turn that read nothing has nothing new to walk, and the
                // last turn's writes are done or wait with their wakers set.
                return Poll::Pending;
            }
            first = false;
            if let Some(ev) = self.process_backend() {
                return Poll::Ready(ev);
            }
            if let Some(ev) = self.process_client() {
                return Poll::Ready(ev);
            }
            // Quiescence is published before the client can see the ReadyForQuery
            // that ends its request (a pause it asks for next finds it idle).
            self.publish();
            match poll_out(&mut self.backend.stream, &mut self.to_backend, &mut self.backend_unflushed, cx) {
                Poll::Ready(Ok(moved)) => again |= moved && !read_client && !self.holding,
                Poll::Ready(Err(e)) => return Poll::Ready(Event::End(End::BackendGone(Some(e)))),
                Poll::Pending => {}
            }
            match poll_out(&mut self.client, &mut self.to_client, &mut self.client_unflushed, cx) {
                Poll::Ready(Ok(moved)) => again |= moved && !read_backend,
                Poll::Ready(Err(e)) => return Poll::Ready(Event::End(End::ClientGone(Some(e)))),
                Poll::Pending => {}
            }
            if self.want.any() && self.movable() && (!self.want.shutdown || self.client_idle()) {
                return Poll::Ready(Event::Ready);
            }
            if !again {
                // Every read returned Pending (its waker is set) or waits for room
                // that a write with its waker set will make; every write is done
                // or returned Pending.
                return Poll::Pending;
            }
        }
    }

    /// Client → backend: forwards, holds or answers what the client sent.
    fn process_client(&mut self) -> Option<Event> {
        let ev = self.walk_client();
        self.from_client.flush(&mut self.to_backend);
        ev
    }

    fn walk_client(&mut self) -> Option<Event> {
        loop {
            if self.holding {
                if terminate_ahead(self.from_client.data()) {
                    // The client left while held: its request is dropped, never run.
                    return Some(Event::End(End::ClientGone(None)));
                }
                return None;
            }
            let inb = &mut self.from_client;
            let scan = match inb.scan() {
                Ok(s) => s,
                Err(e) => return Some(Event::End(End::ClientProtocol(e))),
            };
            match scan {
                Scan::Incomplete => return None,
                Scan::Body(n) => drop(inb.pass_body(n, &mut self.to_backend)),
                Scan::Frame { tag, total } => {
                    let msg = Frontend::of(tag);
                    if msg == Frontend::Terminate {
                        self.pass_client(total, false);
                        return Some(Event::End(End::ClientTerminated));
                    }
                    if let Some(status) = self.skip_to_sync {
                        self.pass_client(total, true);
                        if msg == Frontend::Sync {
                            self.skip_to_sync = None;
                            self.answer_client(|out| write::ready_for_query(out, status));
                            self.tx = TxState::from_status(status);
                            self.info.on_ready(status);
                        }
                        continue;
                    }
                    if matches!(msg, Frontend::Query | Frontend::Parse) {
                        let avail = inb.len().min(total);
                        if avail < total && total <= CHUNK {
                            // Whole statements only, to learn the settings they set.
                            return None;
                        }
                        learn::custom_settings(inb.data().get(5..avail).unwrap_or_default(), &mut self.custom);
                    }
                    let starts = self.pipeline.is_idle() && !msg.is_copy() && msg != Frontend::Flush;
                    if starts && self.ended == Ended::No && self.tx == TxState::Idle {
                        // INVARIANT: busy is published before the gate is read (see
                        // the gate): either the drain sees this request or it holds.
                        self.info.set_busy(true);
                        self.busy_published = true;
                        if self.gate.is_closed() || self.want.shutdown {
                            self.publish();
                            self.holding = true;
                            return Some(Event::Hold);
                        }
                    }
                    // INVARIANT: the route is read after the gate was seen open; a
                    // repoint bumps it before it reopens the gate, so no request that
                    // starts after a repoint reaches the old backend.
                    if starts && (self.ended != Ended::No || self.tx == TxState::Idle) && self.gate.route() != self.route_seen {
                        return Some(Event::Reroute);
                    }
                    if starts {
                        self.requests += 1;
                        match self.ended {
                            Ended::Owed40001 => {
                                if !self.from_backend.at_boundary() {
                                    // The client is being sent part of a frame; answer after it.
                                    return None;
                                }
                                self.pass_client(total, true);
                                // An implicit transaction (an extended batch outside any
                                // block) fails and is over; an explicit one stays failed.
                                let status = if self.tx == TxState::Idle { b'I' } else { b'E' };
                                self.ended = if status == b'I' { Ended::No } else { Ended::RolledBack };
                                let extended = matches!(msg, Frontend::Parse | Frontend::Bind | Frontend::Describe | Frontend::Execute | Frontend::Close);
                                self.answer_client(ended::error_40001);
                                if extended {
                                    self.skip_to_sync = Some(status);
                                } else {
                                    self.answer_client(|out| write::ready_for_query(out, status));
                                    self.tx = TxState::from_status(status);
                                    self.info.on_ready(status);
                                }
                                self.last_was_error = true;
                                continue;
                            }
                            Ended::RolledBack => {
                                self.from_client.flush(&mut self.to_backend);
                                message(&mut self.to_backend, b'Q', format!("{}\0", ended::PRELUDE).as_bytes());
                                self.pipeline.sent(Frontend::Query, true);
                                self.ended = Ended::Aborted;
                            }
                            Ended::No | Ended::Aborted => {}
                        }
                    }
                    self.pipeline.sent(msg, false);
                    self.pass_client(total, false);
                }
            }
        }
    }

    /// Passes the client frame at the front on to the backend, or drops it.
    fn pass_client(&mut self, total: usize, drop: bool) {
        self.from_client.pass_frame(total, drop, &mut self.to_backend);
    }

    /// Appends what the proxy answers itself (between whole frames).
    fn answer_client(&mut self, f: impl FnOnce(&mut BytesMut)) {
        self.from_backend.flush(&mut self.to_client);
        let mut out = BytesMut::new();
        f(&mut out);
        self.to_client.extend(&out);
    }

    /// Backend → client: tracks what is owed, rewrites what the client must see
    /// differently, swallows the answers to the proxy's own requests.
    fn process_backend(&mut self) -> Option<Event> {
        let ev = self.walk_backend();
        self.from_backend.flush(&mut self.to_client);
        ev
    }

    fn walk_backend(&mut self) -> Option<Event> {
        loop {
            let inb = &mut self.from_backend;
            let scan = match inb.scan() {
                Ok(s) => s,
                Err(e) => return Some(Event::End(End::BackendProtocol(e))),
            };
            match scan {
                Scan::Incomplete => return None,
                Scan::Body(n) => {
                    let sent = inb.pass_body(n, &mut self.to_client);
                    bump(&self.info.bytes_out, sent as u64);
                }
                Scan::Frame { tag, total } => {
                    let msg = Backend::of(tag);
                    let inspect = match msg {
                        Backend::ReadyForQuery => 6,
                        Backend::Notification => 9,
                        Backend::ParameterStatus | Backend::ErrorResponse if total <= INSPECT_LIMIT => total,
                        _ => 5,
                    };
                    if inb.len() < inspect.min(total) {
                        return None;
                    }
                    if msg == Backend::ReadyForQuery {
                        self.on_ready(total);
                        continue;
                    }
                    let answer = if msg.is_asynchronous() { self.pipeline.current() } else { self.pipeline.received(msg) };
                    match msg {
                        Backend::Notification => {
                            let own = self.backend.key.pid.to_be_bytes();
                            let frame = self.from_backend.data_mut();
                            if total >= 9 && frame[5..9] == own {
                                frame[5..9].copy_from_slice(&self.info.key.pid.to_be_bytes());
                            }
                            self.pass_backend(total, false);
                        }
                        Backend::ParameterStatus => {
                            if total <= INSPECT_LIMIT {
                                let fields = split_cstrings(&self.from_backend.data()[5..total]);
                                if let [name, value, ..] = fields.as_slice() {
                                    self.params.set(name, value);
                                }
                            }
                            self.pass_backend(total, false);
                        }
                        _ if answer == Answer::Ours => self.pass_backend(total, true),
                        Backend::ErrorResponse if self.cancel == Cancel::Sent && total <= INSPECT_LIMIT => {
                            let fields = parse_fields(&self.from_backend.data()[5..total]);
                            if fields.iter().any(|(c, v)| *c == b'C' && v == sqlstate::QUERY_CANCELED) {
                                self.cancel = Cancel::Delivered;
                                self.pass_backend(total, true);
                                self.answer_client(ended::error_40001);
                            } else {
                                self.pass_backend(total, false);
                            }
                            self.last_was_error = true;
                        }
                        _ => {
                            self.last_was_error = msg == Backend::ErrorResponse;
                            self.pass_backend(total, false);
                        }
                    }
                }
            }
        }
    }

    /// Passes the backend frame at the front on to the client, or drops it.
    fn pass_backend(&mut self, total: usize, drop: bool) {
        let sent = self.from_backend.pass_frame(total, drop, &mut self.to_client);
        bump(&self.info.bytes_out, sent as u64);
    }

    fn on_ready(&mut self, total: usize) {
        let status = self.from_backend.data()[5];
        let ready = self.pipeline.ready();
        match ready.answer {
            Answer::Ours => {
                self.pass_backend(total, true);
                // The proxy's ROLLBACK must leave the backend idle (a cancel racing
                // it could abort it instead): try again, a few times.
                if ready.drained && status != b'I' && self.ended != Ended::Aborted && self.rollback_retries < 3 {
                    self.rollback_retries += 1;
                    self.end_transaction();
                } else if ready.drained {
                    self.rollback_retries = 0;
                    // A pause's cancel that found only the proxy's own requests
                    // running is spent: what it would end is ended already.
                    self.cancel = Cancel::No;
                }
            }
            Answer::Client => {
                self.pass_backend(total, false);
                self.last_was_error = false;
                self.tx = TxState::from_status(status);
                self.info.on_ready(status);
                if status == b'I' {
                    self.ended = Ended::No;
                }
                if ready.drained && self.cancel != Cancel::No {
                    if status != b'I' {
                        let told = self.cancel == Cancel::Delivered || status == b'E';
                        self.end_transaction();
                        self.ended = if told { Ended::RolledBack } else { Ended::Owed40001 };
                    }
                    self.cancel = Cancel::No;
                }
            }
        }
    }

    /// Ends the backend's transaction with the proxy's own (swallowed) requests.
    /// Only between requests, and only with no partial client frame sent on.
    fn end_transaction(&mut self) {
        self.from_client.flush(&mut self.to_backend);
        for (tag, body) in ended::end_transaction(self.pipeline.batch_open()) {
            message(&mut self.to_backend, tag, &body);
            self.pipeline.sent(Frontend::of(tag), true);
        }
    }

    /// The drain's deadline passed: cancel what runs, end what is open.
    pub fn cancel_for_pause(&mut self) -> Option<crate::protocol::startup::CancelKey> {
        if self.pipeline.is_running() && !self.pipeline.ours_pending() {
            self.cancel = Cancel::Sent;
            return Some(self.backend.key);
        }
        if self.pipeline.is_running() || !self.from_client.at_boundary() {
            // The proxy's own requests are running, or a request is on its way:
            // look again at its ReadyForQuery.
            self.cancel = Cancel::Sent;
            return None;
        }
        match (self.ended, self.tx) {
            (Ended::No, TxState::Idle) if !self.pipeline.batch_open() => {}
            (Ended::No, tx) => {
                self.end_transaction();
                self.ended = if tx == TxState::Failed { Ended::RolledBack } else { Ended::Owed40001 };
                tracing::info!(session = self.info.id, "transaction ended for a pause; the client is told when it next asks");
            }
            // Already ended by the proxy: nothing is open on the backend.
            _ => {}
        }
        None
    }

    /// Writes out everything queued for the client, flushing a buffered stream.
    pub async fn flush_client(&mut self) -> std::io::Result<()> {
        write_out(&mut self.client, &mut self.to_client, &mut self.client_unflushed).await
    }

    /// Writes out everything queued for the backend, flushing a buffered stream.
    pub async fn flush_backend(&mut self) -> std::io::Result<()> {
        write_out(&mut self.backend.stream, &mut self.to_backend, &mut self.backend_unflushed).await
    }

    /// Waits until the backend has closed the connection (after Terminate): its
    /// server process has left pg_stat_activity by then.
    pub async fn backend_gone(&mut self) {
        let mut sink = [0u8; 512];
        while let Ok(n) = tokio::io::AsyncReadExt::read(&mut self.backend.stream, &mut sink).await {
            if n == 0 {
                break;
            }
        }
    }
}

pub(super) fn split_cstrings(b: &[u8]) -> Vec<String> {
    b.split(|c| *c == 0).map(|s| String::from_utf8_lossy(s).into_owned()).collect()
}

/// Appends an error for the client, unless it holds part of a frame.
pub fn tell_client(relay: &mut Relay, err: &PgError) {
    if relay.from_backend.at_boundary() {
        let mut b = BytesMut::new();
        write::error_response(&mut b, err);
        relay.to_client.extend(&b);
    }
}
