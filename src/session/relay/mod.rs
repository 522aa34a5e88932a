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
//! stream that can buffer (TLS) is flushed before the relay waits. The walk of each
//! direction has a file of its own: `client` (client → backend) and `backend`
//! (backend → client).

mod backend;
mod client;

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;

use super::buffer::IoBuf;
use super::io::{poll_in, poll_out, write_out, Inbound};
use super::ended::Ended;
use super::params::Params;
use super::pipeline::Pipeline;
use super::registry::{bump, SessionInfo, TxState};
use crate::backend::BackendTarget;
use crate::gate::Gate;
use crate::net::Stream;
use crate::protocol::frame::FrameError;
use crate::protocol::{write, PgError};

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
    /// The Parse of the unnamed statement of a batch that has not run it yet (a
    /// quiet batch's): a state read's simple query drops the unnamed statement, and
    /// a move leaves it behind, so it is parsed again where the session goes on.
    pub unnamed_parse: Option<Box<[u8]>>,
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
            unnamed_parse: None,
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
        (self.pipeline.is_idle() && (self.ended != Ended::No || self.tx == TxState::Idle)) || self.quiet_batch()
    }

    /// Outside any transaction, in a batch that ran nothing (see
    /// [`Pipeline::quiet_batch`]): its next message may be held like a new request.
    pub fn quiet_batch(&self) -> bool {
        self.pipeline.quiet_batch() && self.ended == Ended::No && self.tx == TxState::Idle && self.skip_to_sync.is_none()
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
