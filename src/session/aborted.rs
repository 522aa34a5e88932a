//! The client's view of a transaction the proxy ended.
//!
//! When a pause's deadline cancels a session's work, the proxy ends the transaction
//! on the backend at once (so the drain need not wait for the client), and then
//! answers the client as PostgreSQL would answer inside a failed transaction: one
//! 40001 if the client has not seen it yet, `ROLLBACK` (or `COMMIT`, which reports
//! ROLLBACK) succeeds, anything else gets 25P02 — without reaching the backend.

use bytes::BytesMut;

use crate::protocol::{sqlstate, write, PgError};

pub fn cancelled_error() -> PgError {
    PgError::error(
        sqlstate::SERIALIZATION_FAILURE,
        "the transaction was cancelled by pgcutover for a pause or cutover; retry it",
    )
}

fn aborted_error() -> PgError {
    PgError::error("25P02", "current transaction is aborted, commands ignored until end of transaction block")
}

/// Ends a transaction block whatever its state (COMMIT of a failed one rolls back).
pub fn is_transaction_end(sql: &str) -> bool {
    let text = sql.trim().trim_end_matches(';').trim().to_ascii_lowercase();
    let words: Vec<&str> = text.split_whitespace().collect();
    match words.as_slice() {
        [verb] => matches!(*verb, "rollback" | "abort" | "commit" | "end"),
        [verb, "work" | "transaction"] => matches!(*verb, "rollback" | "abort" | "commit" | "end"),
        [verb, "and", "no", "chain"] | [verb, "work" | "transaction", "and", "no", "chain"] => matches!(*verb, "rollback" | "abort" | "commit" | "end"),
        _ => false,
    }
}

/// The emulated failed transaction, and an extended batch being answered.
#[derive(Debug)]
pub struct Aborted {
    pub error_pending: bool,
    batch: Option<Batch>,
}

#[derive(Debug, Default)]
struct Batch {
    errored: bool,
    ended: bool,
}

/// What one client frame produced.
pub struct Reply {
    pub bytes: BytesMut,
    /// The client's transaction ended: back to normal relaying.
    pub done: bool,
}

fn cstr(body: &[u8]) -> &str {
    let end = body.iter().position(|b| *b == 0).unwrap_or(body.len());
    std::str::from_utf8(&body[..end]).unwrap_or("")
}

impl Aborted {
    pub fn new(error_pending: bool) -> Aborted {
        Aborted { error_pending, batch: None }
    }

    fn error(&mut self, out: &mut BytesMut) {
        let err = if std::mem::take(&mut self.error_pending) { cancelled_error() } else { aborted_error() };
        write::error_response(out, &err);
    }

    /// Answers one whole client frame (`tag`, `body`).
    pub fn on_frame(&mut self, tag: u8, body: &[u8]) -> Reply {
        let mut out = BytesMut::new();
        let mut done = false;
        match (&mut self.batch, tag) {
            (None, b'Q') => {
                if !self.error_pending && is_transaction_end(cstr(body)) {
                    command_complete(&mut out, "ROLLBACK");
                    write::ready_for_query(&mut out, b'I');
                    done = true;
                } else {
                    self.error(&mut out);
                    write::ready_for_query(&mut out, b'E');
                }
            }
            (None, b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S' | b'F') => {
                self.batch = Some(Batch::default());
                return self.on_frame(tag, body);
            }
            (Some(batch), b'S') => {
                let ended = !batch.errored && batch.ended;
                self.batch = None;
                write::ready_for_query(&mut out, if ended { b'I' } else { b'E' });
                done = ended;
            }
            (Some(batch), _) if batch.errored => {}
            (Some(batch), b'P') => {
                // Parse: statement name, then the query.
                let name_len = body.iter().position(|b| *b == 0).map_or(body.len(), |n| n + 1);
                if !self.error_pending && is_transaction_end(cstr(&body[name_len.min(body.len())..])) {
                    out.extend_from_slice(&[b'1', 0, 0, 0, 4]);
                } else {
                    batch.errored = true;
                    self.error(&mut out);
                }
            }
            (Some(_), b'B') => out.extend_from_slice(&[b'2', 0, 0, 0, 4]),
            (Some(_), b'D') => {
                if body.first() == Some(&b'S') {
                    out.extend_from_slice(&[b't', 0, 0, 0, 6, 0, 0]);
                }
                out.extend_from_slice(&[b'n', 0, 0, 0, 4]);
            }
            (Some(batch), b'E') => {
                batch.ended = true;
                command_complete(&mut out, "ROLLBACK");
            }
            (Some(_), b'C') => out.extend_from_slice(&[b'3', 0, 0, 0, 4]),
            (Some(_), b'H') => {}
            (Some(batch), _) => {
                batch.errored = true;
                self.error(&mut out);
            }
            // CopyData/CopyDone/CopyFail/password messages outside any request: ignored,
            // as PostgreSQL ignores them outside COPY.
            (None, _) => {}
        }
        Reply { bytes: out, done }
    }
}

fn command_complete(out: &mut BytesMut, tag: &str) {
    let mut body = tag.as_bytes().to_vec();
    body.push(0);
    write::frontend_message(out, b'C', &body);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = b;
        while rest.len() >= 5 {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            out.push(rest[0]);
            rest = &rest[len + 1..];
        }
        out
    }

    #[test]
    fn transaction_ends_are_recognised() {
        for sql in ["ROLLBACK", "rollback;", " Abort Work ", "COMMIT", "end transaction", "ROLLBACK AND NO CHAIN"] {
            assert!(is_transaction_end(sql), "{sql}");
        }
        for sql in ["SELECT 1", "ROLLBACK TO SAVEPOINT a", "rollback; select 1", "begin"] {
            assert!(!is_transaction_end(sql), "{sql}");
        }
    }

    #[test]
    fn the_40001_comes_once_then_25p02_until_rollback() {
        let mut a = Aborted::new(true);
        let r = a.on_frame(b'Q', b"UPDATE t SET x = 1\0");
        assert_eq!(tags(&r.bytes), b"EZ");
        assert!(r.bytes.windows(5).any(|w| w == b"40001"));
        let r = a.on_frame(b'Q', b"SELECT 1\0");
        assert!(r.bytes.windows(5).any(|w| w == b"25P02"));
        assert!(!r.done);
        let r = a.on_frame(b'Q', b"ROLLBACK\0");
        assert_eq!(tags(&r.bytes), b"CZ");
        assert!(r.done);
    }

    #[test]
    fn an_extended_rollback_is_answered_message_by_message() {
        let mut a = Aborted::new(false);
        let mut all = Vec::new();
        for (tag, body) in [(b'P', &b"\0ROLLBACK\0\0\0"[..]), (b'B', b"\0\0\0\0\0\0\0\0"), (b'D', b"P\0"), (b'E', b"\0\0\0\0\0"), (b'S', b"")] {
            let r = a.on_frame(tag, body);
            all.extend_from_slice(&r.bytes);
            if tag == b'S' {
                assert!(r.done);
            }
        }
        assert_eq!(tags(&all), b"12nCZ");
    }

    #[test]
    fn an_extended_statement_in_a_failed_transaction_errors_until_sync() {
        let mut a = Aborted::new(false);
        let mut all = Vec::new();
        for (tag, body) in [(b'P', &b"\0SELECT 1\0\0\0"[..]), (b'B', b""), (b'E', b""), (b'S', b"")] {
            all.extend_from_slice(&a.on_frame(tag, body).bytes);
        }
        assert_eq!(tags(&all), b"EZ");
    }
}
