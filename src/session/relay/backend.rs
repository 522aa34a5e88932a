//! Backend → client: what is owed is tracked, what the client must see differently
//! is rewritten (pids, parameters, a pause's cancel), and the answers to the
//! proxy's own requests are swallowed.

use super::{message, split_cstrings, Cancel, End, Event, Relay, INSPECT_LIMIT};
use crate::protocol::frame::{FrameError, Scan};
use crate::protocol::read::parse_fields;
use crate::protocol::sqlstate;
use crate::session::ended::{self, Ended};
use crate::session::pipeline::{Answer, Backend, Frontend};
use crate::session::registry::{bump, TxState};

impl Relay {
    /// Backend → client: tracks what is owed, rewrites what the client must see
    /// differently, swallows the answers to the proxy's own requests.
    #[inline]
    pub(super) fn process_backend(&mut self) -> Option<Event> {
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
                    // The frames the proxy looks into must have the size their
                    // layout needs: a backend that breaks the protocol ends the
                    // session, and never makes the proxy read the next frame as
                    // this one's contents.
                    let short = match msg {
                        Backend::ReadyForQuery => total != 6,
                        // pid, channel and payload (two NUL-terminated strings).
                        Backend::Notification => total < 11,
                        _ => false,
                    };
                    if short {
                        return Some(Event::End(End::BackendProtocol(FrameError::TooShort { tag, len: (total - 1) as u32 })));
                    }
                    if msg == Backend::ReadyForQuery {
                        self.on_ready(total);
                        continue;
                    }
                    let answer = if msg.is_asynchronous() { self.pipeline.current() } else { self.pipeline.received(msg) };
                    match msg {
                        Backend::Notification => {
                            // The sender's pid as its client knows it: the minted pid
                            // of a session of this proxy; a sender from elsewhere
                            // keeps its own.
                            // Checked above: at least 9 bytes of the frame are here.
                            let frame = self.from_backend.data();
                            let pid = i32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]);
                            let minted = if pid == self.backend.key.pid { Some(self.info.key.pid) } else { self.info.minted_pid_of(&self.backend.target.name, pid) };
                            if let Some(minted) = minted {
                                self.from_backend.data_mut()[5..9].copy_from_slice(&minted.to_be_bytes());
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
    pub(super) fn end_transaction(&mut self) {
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
            (Ended::No, TxState::Idle) if !self.pipeline.batch_open() || self.pipeline.quiet_batch() => {}
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
}
