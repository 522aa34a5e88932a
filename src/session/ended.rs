//! A transaction the proxy ended for a pause, as its client goes on to see it.
//!
//! At a pause's deadline the proxy ends the session's transaction on the backend at
//! once (so the drain never waits for a client). The client still believes it is
//! inside that transaction. From then on it is answered as PostgreSQL answers a
//! failed transaction, without guessing at statement texts:
//! - its next request gets the one 40001, answered by the proxy the way PostgreSQL
//!   answers a request whose first message fails (an extended batch is skipped up
//!   to its Sync), with ReadyForQuery `E`;
//! - before the request after that, the proxy opens a genuinely aborted transaction
//!   block on the backend (a swallowed `BEGIN` and a failing statement), so that
//!   PostgreSQL itself answers every message type: 25P02 for everything, and
//!   ROLLBACK or COMMIT (which reports ROLLBACK) ends it.
//!
//! Nothing is answered as success that did not happen, and no statement runs.

use crate::protocol::{sqlstate, write, PgError};
use bytes::BytesMut;

/// Where a session stands with a transaction the proxy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Nothing ended: the client and the backend agree.
    No,
    /// The backend is idle; the client believes it is in a transaction and has not
    /// been told it is gone: its next request gets the 40001.
    Owed40001,
    /// The backend is idle; the client knows its transaction failed (status `E`).
    RolledBack,
    /// The backend holds an aborted block the proxy opened, matching the client's view.
    Aborted,
}

impl Ended {
    /// The client believes it is inside a transaction block.
    pub fn client_in_transaction(self) -> bool {
        self != Ended::No
    }
}

pub fn cancelled_error() -> PgError {
    PgError::error(sqlstate::SERIALIZATION_FAILURE, "the transaction was cancelled by pgcutover for a pause or cutover; retry it")
}

/// Opens an aborted transaction block on an idle backend. The failing statement
/// says in the server's log why it is there.
pub const PRELUDE: &str = "BEGIN; SELECT 'pgcutover ended this transaction for a pause; the client rolls it back'::pg_catalog.int4";

/// A portal no client names: executing it fails, which aborts whatever the batch
/// had begun.
const NO_SUCH_PORTAL: &[u8] = b"pgcutover: no such portal\0\0\0\0\0";

/// The messages that end a backend's transaction whatever its state: an open
/// extended batch is failed and synced first, then ROLLBACK.
pub fn end_transaction(batch_open: bool) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    if batch_open {
        out.push((b'E', NO_SUCH_PORTAL.to_vec()));
        out.push((b'S', Vec::new()));
    }
    out.push((b'Q', b"ROLLBACK\0".to_vec()));
    out
}

/// The one 40001, answered for the client's next request.
pub fn error_40001(out: &mut BytesMut) {
    write::error_response(out, &cancelled_error());
}
