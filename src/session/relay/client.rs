//! Client → backend: what the client sent is forwarded, held at a closed gate, or
//! answered by the proxy itself (a transaction it ended for a pause).

use bytes::BytesMut;

use super::{message, End, Event, Relay};
use crate::protocol::frame::Scan;
use crate::protocol::{sqlstate, write, PgError};
use crate::session::buffer::CHUNK;
use crate::session::ended::{self, Ended};
use crate::session::learn;
use crate::session::pipeline::Frontend;
use crate::session::registry::TxState;

fn frame_len(b: &[u8]) -> Option<usize> {
    let len = u32::from_be_bytes([*b.get(1)?, *b.get(2)?, *b.get(3)?, *b.get(4)?]) as usize;
    Some(len + 1)
}

/// Does the client's buffered input hold one of `tags` among its whole frame headers?
fn tag_ahead(mut b: &[u8], tags: &[u8]) -> bool {
    while b.len() >= 5 {
        if tags.contains(&b[0]) {
            return true;
        }
        match frame_len(b) {
            Some(n) if n >= 5 && n <= b.len() => b = &b[n..],
            _ => return false,
        }
    }
    false
}

impl Relay {
    /// Client → backend: forwards, holds or answers what the client sent.
    #[inline]
    pub(super) fn process_client(&mut self) -> Option<Event> {
        let ev = self.walk_client();
        self.from_client.flush(&mut self.to_backend);
        ev
    }

    fn walk_client(&mut self) -> Option<Event> {
        loop {
            if self.holding {
                if tag_ahead(self.from_client.data(), b"X") {
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
                    let starts = (self.pipeline.is_idle() || self.quiet_batch()) && !msg.is_copy() && msg != Frontend::Flush;
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
                                self.answer_failed(msg, &ended::cancelled_error(), status);
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
                    self.remember_unnamed(msg, total);
                    self.pipeline.sent(msg, false);
                    self.pass_client(total, false);
                }
            }
        }
    }

    /// The client cancelled the request held at the gate: it never runs, and is
    /// answered as PostgreSQL answers a statement cancelled at its start — 57014,
    /// then ReadyForQuery (an extended batch skipped up to its Sync first). False
    /// when no request is held (the cancel is for the backend).
    pub fn cancel_held(&mut self) -> bool {
        if !self.holding || !self.from_client.at_boundary() || !self.from_backend.at_boundary() {
            return false;
        }
        let Ok(Scan::Frame { tag, total }) = self.from_client.scan() else { return false };
        self.pass_client(total, true);
        // A held request starts with the client idle: it is answered idle.
        self.answer_failed(Frontend::of(tag), &PgError::error(sqlstate::QUERY_CANCELED, "canceling statement due to user request"), b'I');
        true
    }

    /// Answers a request whose first message (`msg`, already dropped) the proxy
    /// fails itself, as PostgreSQL answers one that fails at once: the error, then
    /// ReadyForQuery `status` — for an extended batch once its Sync arrives.
    fn answer_failed(&mut self, msg: Frontend, err: &PgError, status: u8) {
        self.answer_client(|out| write::error_response(out, err));
        self.last_was_error = true;
        if msg.is_extended() {
            self.skip_to_sync = Some(status);
        } else {
            self.answer_client(|out| write::ready_for_query(out, status));
            self.tx = TxState::from_status(status);
            self.info.on_ready(status);
        }
    }

    /// Keeps the Parse of an unnamed statement that a batch prepares without running
    /// it (no Bind or Execute behind it yet): see `Relay::unnamed_parse`. A Bind,
    /// an Execute or a simple Query (which drops the unnamed statement) ends that.
    fn remember_unnamed(&mut self, msg: Frontend, total: usize) {
        match msg {
            Frontend::Parse => {
                let inert = self.pipeline.prepares_only();
                let frame = self.from_client.data();
                let whole = frame.len() >= total;
                let unnamed = frame.get(5) == Some(&0);
                if unnamed {
                    self.unnamed_parse = (inert && whole && !tag_ahead(&frame[total.min(frame.len())..], b"BE")).then(|| frame[..total].into());
                }
            }
            Frontend::Bind | Frontend::Execute | Frontend::Query => self.unnamed_parse = None,
            _ => {}
        }
    }

    /// Passes the client frame at the front on to the backend, or drops it.
    fn pass_client(&mut self, total: usize, drop: bool) {
        self.from_client.pass_frame(total, drop, &mut self.to_backend);
    }

    /// Appends what the proxy answers itself (between whole frames).
    pub(super) fn answer_client(&mut self, f: impl FnOnce(&mut BytesMut)) {
        self.from_backend.flush(&mut self.to_client);
        let mut out = BytesMut::new();
        f(&mut out);
        self.to_client.extend(&out);
    }
}
