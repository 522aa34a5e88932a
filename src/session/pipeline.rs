//! What a backend still owes its client: one typed queue per session.
//!
//! Every request the client sends pushes the response that completes it (the
//! backend answers strictly in order); every response pops what it completes. "In
//! flight", "at a request boundary" and "may be moved" are read off this queue, not
//! kept in counters. The corners it must get exactly right:
//! - an extended batch is open (an implicit transaction may be) from its first
//!   message to its Sync, even when every answer so far has arrived;
//! - a Flush expects nothing, so a lone Flush leaves the session idle;
//! - an error inside an extended batch makes the backend skip to the next Sync;
//! - during COPY FROM STDIN the backend ignores Sync and Flush (libpq and
//!   tokio-postgres send a Sync before they know the command was COPY, and another
//!   after CopyDone: two Syncs, one ReadyForQuery).
//!
//! Items the proxy injected itself are marked `ours`: their answers never reach the
//! client.

use std::collections::VecDeque;

/// Message types a client sends, by tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frontend {
    Query,
    Parse,
    Bind,
    Describe,
    Execute,
    Close,
    Sync,
    Flush,
    FunctionCall,
    CopyData,
    CopyDone,
    CopyFail,
    Terminate,
    Other(u8),
}

impl Frontend {
    pub fn of(tag: u8) -> Frontend {
        match tag {
            b'Q' => Frontend::Query,
            b'P' => Frontend::Parse,
            b'B' => Frontend::Bind,
            b'D' => Frontend::Describe,
            b'E' => Frontend::Execute,
            b'C' => Frontend::Close,
            b'S' => Frontend::Sync,
            b'H' => Frontend::Flush,
            b'F' => Frontend::FunctionCall,
            b'd' => Frontend::CopyData,
            b'c' => Frontend::CopyDone,
            b'f' => Frontend::CopyFail,
            b'X' => Frontend::Terminate,
            t => Frontend::Other(t),
        }
    }

    /// A message of the extended protocol (answered up to the next Sync).
    pub fn is_extended(self) -> bool {
        matches!(self, Frontend::Parse | Frontend::Bind | Frontend::Describe | Frontend::Execute | Frontend::Close)
    }

    /// Part of a COPY FROM STDIN data stream rather than a request of its own.
    pub fn is_copy(self) -> bool {
        matches!(self, Frontend::CopyData | Frontend::CopyDone | Frontend::CopyFail)
    }
}

/// Message types a backend sends, by tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    ReadyForQuery,
    ErrorResponse,
    NoticeResponse,
    Notification,
    ParameterStatus,
    CommandComplete,
    EmptyQuery,
    PortalSuspended,
    ParseComplete,
    BindComplete,
    CloseComplete,
    ParameterDescription,
    RowDescription,
    NoData,
    CopyInResponse,
    CopyOutResponse,
    CopyBothResponse,
    Other(u8),
}

impl Backend {
    pub fn of(tag: u8) -> Backend {
        match tag {
            b'Z' => Backend::ReadyForQuery,
            b'E' => Backend::ErrorResponse,
            b'N' => Backend::NoticeResponse,
            b'A' => Backend::Notification,
            b'S' => Backend::ParameterStatus,
            b'C' => Backend::CommandComplete,
            b'I' => Backend::EmptyQuery,
            b's' => Backend::PortalSuspended,
            b'1' => Backend::ParseComplete,
            b'2' => Backend::BindComplete,
            b'3' => Backend::CloseComplete,
            b't' => Backend::ParameterDescription,
            b'T' => Backend::RowDescription,
            b'n' => Backend::NoData,
            b'G' => Backend::CopyInResponse,
            b'H' => Backend::CopyOutResponse,
            b'W' => Backend::CopyBothResponse,
            t => Backend::Other(t),
        }
    }

    /// Sent on the backend's own initiative, whatever is in flight.
    pub fn is_asynchronous(self) -> bool {
        matches!(self, Backend::NoticeResponse | Backend::Notification | Backend::ParameterStatus)
    }
}

/// A response the backend owes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owed {
    /// ReadyForQuery ending a simple Query.
    QueryReady,
    /// ReadyForQuery ending a FunctionCall.
    CallReady,
    /// ReadyForQuery answering a Sync.
    SyncReady,
    ParseComplete,
    BindComplete,
    /// RowDescription or NoData (after a ParameterDescription for a statement).
    Description,
    /// CommandComplete, EmptyQueryResponse or PortalSuspended.
    ExecuteDone,
    CloseComplete,
    /// Not a response: the client ended a COPY (CopyDone/CopyFail) before the backend
    /// said the command was a COPY. Syncs between the command and this are ignored.
    CopyEnd,
}

impl Owed {
    fn ends_with_ready(self) -> bool {
        matches!(self, Owed::QueryReady | Owed::CallReady | Owed::SyncReady)
    }

    /// An extended-protocol message's own answer (skipped after an error).
    fn is_extended(self) -> bool {
        matches!(self, Owed::ParseComplete | Owed::BindComplete | Owed::Description | Owed::ExecuteDone | Owed::CloseComplete)
    }

    /// Could start a COPY.
    fn may_copy(self) -> bool {
        matches!(self, Owed::QueryReady | Owed::ExecuteDone)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Item {
    owed: Owed,
    ours: bool,
}

/// Who a backend message answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The client's request (or nothing: asynchronous or unexpected).
    Client,
    /// A request the proxy injected: the client must not see it.
    Ours,
}

/// What a ReadyForQuery completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    pub answer: Answer,
    /// Nothing is owed any more.
    pub drained: bool,
}

#[derive(Debug, Default)]
pub struct Pipeline {
    owed: VecDeque<Item>,
    /// Extended messages went out since the last Sync: the backend may hold an
    /// implicit transaction, and the batch's next message is no new request.
    batch_open: bool,
    /// The backend is reading COPY data from the client (it said CopyInResponse and
    /// the client has not sent CopyDone/CopyFail yet).
    copy_in: bool,
    /// The open batch holds only Parse, Describe and Close, none of which failed:
    /// it changed nothing on the server but its prepared statements.
    inert: bool,
}

impl Pipeline {
    /// Nothing owed, no batch open, no COPY going on: the next message the client
    /// sends starts a new request.
    pub fn is_idle(&self) -> bool {
        self.owed.is_empty() && !self.batch_open && !self.copy_in
    }

    /// Responses are owed (a request is running or queued on the backend).
    pub fn is_running(&self) -> bool {
        !self.owed.is_empty()
    }

    /// Extended messages went out since the last Sync.
    pub fn batch_open(&self) -> bool {
        self.batch_open
    }

    /// A quiescent batch: open (no Sync yet), but holding only Parse, Describe and
    /// Close that have all been answered without an error — asyncpg prepares every
    /// statement this way, with a Flush. It runs nothing and writes nothing: the
    /// session may be held, asked about its state and moved as if idle (the batch
    /// is closed with a Sync of the proxy's own first, see [`Pipeline::closed`]).
    pub fn quiet_batch(&self) -> bool {
        self.batch_open && self.inert && self.owed.is_empty() && !self.copy_in
    }

    /// No batch is open, or the open one holds only Parse, Describe and Close so
    /// far (answered or not).
    pub fn prepares_only(&self) -> bool {
        !self.batch_open || self.inert
    }

    /// The proxy closed a quiet batch with a Sync of its own (answered).
    pub fn closed(&mut self) {
        self.batch_open = false;
    }

    /// The proxy's own injected requests are still being answered.
    pub fn ours_pending(&self) -> bool {
        self.owed.iter().any(|i| i.ours)
    }

    fn push(&mut self, owed: Owed, ours: bool) {
        self.owed.push_back(Item { owed, ours });
    }

    /// Records a message on its way to the backend.
    pub fn sent(&mut self, msg: Frontend, ours: bool) {
        match msg {
            Frontend::Query => self.push(Owed::QueryReady, ours),
            Frontend::FunctionCall => self.push(Owed::CallReady, ours),
            Frontend::Parse => self.extended(Owed::ParseComplete, ours),
            Frontend::Bind => self.extended(Owed::BindComplete, ours),
            Frontend::Describe => self.extended(Owed::Description, ours),
            Frontend::Execute => self.extended(Owed::ExecuteDone, ours),
            Frontend::Close => self.extended(Owed::CloseComplete, ours),
            // Read during COPY FROM STDIN, a Sync is ignored.
            Frontend::Sync if self.copy_in => {}
            Frontend::Sync => {
                self.batch_open = false;
                self.push(Owed::SyncReady, ours);
            }
            Frontend::CopyDone | Frontend::CopyFail => {
                if self.copy_in {
                    self.copy_in = false;
                } else if self.owed.iter().any(|i| i.owed.may_copy()) {
                    // Sent ahead of the backend's CopyInResponse.
                    self.push(Owed::CopyEnd, ours);
                }
                // Otherwise PostgreSQL ignores it, and so do we.
            }
            Frontend::Flush | Frontend::CopyData | Frontend::Terminate | Frontend::Other(_) => {}
        }
    }

    fn extended(&mut self, owed: Owed, ours: bool) {
        if !self.batch_open {
            self.inert = true;
        }
        self.batch_open = true;
        if matches!(owed, Owed::BindComplete | Owed::ExecuteDone) {
            self.inert = false;
        }
        self.push(owed, ours);
    }

    fn head(&self) -> Option<Item> {
        self.owed.front().copied()
    }

    fn pop(&mut self) -> Option<Item> {
        let item = self.owed.pop_front();
        // A CopyEnd with nothing before it that could start a COPY was a stray.
        while self.owed.front().is_some_and(|i| i.owed == Owed::CopyEnd) {
            self.owed.pop_front();
        }
        item
    }

    fn answer_of(item: Option<Item>) -> Answer {
        match item {
            Some(Item { ours: true, .. }) => Answer::Ours,
            _ => Answer::Client,
        }
    }

    /// Who the next non-ReadyForQuery response answers.
    pub fn current(&self) -> Answer {
        Self::answer_of(self.head())
    }

    /// Records a message from the backend other than ReadyForQuery; returns whom it
    /// answers.
    pub fn received(&mut self, msg: Backend) -> Answer {
        let head = self.head();
        let answer = Self::answer_of(head);
        let Some(item) = head else { return answer };
        match msg {
            Backend::ParseComplete if item.owed == Owed::ParseComplete => drop(self.pop()),
            Backend::BindComplete if item.owed == Owed::BindComplete => drop(self.pop()),
            Backend::CloseComplete if item.owed == Owed::CloseComplete => drop(self.pop()),
            Backend::RowDescription | Backend::NoData if item.owed == Owed::Description => drop(self.pop()),
            Backend::CommandComplete | Backend::EmptyQuery | Backend::PortalSuspended if item.owed == Owed::ExecuteDone => drop(self.pop()),
            Backend::ErrorResponse if item.owed.is_extended() => {
                // The backend skips everything up to the next Sync.
                self.inert = false;
                while self.head().is_some_and(|i| i.owed != Owed::SyncReady) {
                    self.pop();
                }
                self.copy_in = false;
            }
            Backend::ErrorResponse => self.copy_in = false,
            Backend::CopyInResponse | Backend::CopyBothResponse if item.owed.may_copy() => {
                // Syncs already sent after the command are read in COPY mode and
                // ignored, up to the client's CopyDone/CopyFail if it sent one.
                let i = 1;
                let mut ended = false;
                let mut ignored = false;
                while let Some(next) = self.owed.get(i).copied() {
                    match next.owed {
                        Owed::SyncReady => {
                            self.owed.remove(i);
                            ignored = true;
                        }
                        Owed::CopyEnd => {
                            self.owed.remove(i);
                            ended = true;
                            break;
                        }
                        _ => break,
                    }
                }
                // If the last Sync sent was ignored, the batch is still open.
                if ignored && item.owed == Owed::ExecuteDone && !self.owed.iter().skip(i).any(|o| o.owed == Owed::SyncReady) {
                    self.batch_open = true;
                }
                self.copy_in = !ended;
            }
            _ => {}
        }
        answer
    }

    /// Records a ReadyForQuery.
    pub fn ready(&mut self) -> Ready {
        let mut answer = Answer::Client;
        while let Some(item) = self.pop() {
            if item.owed.ends_with_ready() {
                answer = Self::answer_of(Some(item));
                break;
            }
        }
        if self.owed.is_empty() {
            // The backend waits for a new command: no COPY is going on.
            self.copy_in = false;
        }
        Ready { answer, drained: self.owed.is_empty() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Backend as B;
    use Frontend as F;

    fn send(p: &mut Pipeline, msgs: &[Frontend]) {
        for m in msgs {
            p.sent(*m, false);
        }
    }

    #[test]
    fn a_simple_query_with_several_statements_owes_one_ready() {
        let mut p = Pipeline::default();
        send(&mut p, &[F::Query]);
        assert!(!p.is_idle());
        for m in [B::RowDescription, B::CommandComplete, B::RowDescription, B::CommandComplete] {
            p.received(m);
        }
        assert!(!p.is_idle());
        assert!(p.ready().drained);
        assert!(p.is_idle());
    }

    #[test]
    fn pipelined_batches_are_idle_only_after_the_last_sync_is_answered() {
        let mut p = Pipeline::default();
        send(&mut p, &[F::Bind, F::Execute, F::Sync, F::Bind, F::Execute, F::Sync]);
        p.received(B::BindComplete);
        p.received(B::CommandComplete);
        assert!(!p.ready().drained);
        assert!(!p.is_idle());
        p.received(B::BindComplete);
        p.received(B::CommandComplete);
        assert!(p.ready().drained);
        assert!(p.is_idle());
    }

    #[test]
    fn a_lone_flush_owes_nothing_but_an_unsynced_batch_stays_open() {
        let mut p = Pipeline::default();
        send(&mut p, &[F::Flush]);
        assert!(p.is_idle(), "a Flush alone is no request");
        send(&mut p, &[F::Parse, F::Flush]);
        p.received(B::ParseComplete);
        assert!(!p.is_running());
        assert!(!p.is_idle(), "the batch is open until its Sync");
        send(&mut p, &[F::Sync]);
        assert!(p.ready().drained);
        assert!(p.is_idle());
    }

    #[test]
    fn a_batch_of_parse_and_describe_answered_after_a_flush_is_quiet_until_a_bind() {
        // asyncpg's prepare: Parse, Describe, Flush and no Sync.
        let mut p = Pipeline::default();
        send(&mut p, &[F::Parse, F::Describe, F::Flush]);
        assert!(!p.quiet_batch(), "answers are still owed");
        p.received(B::ParseComplete);
        p.received(B::ParameterDescription);
        p.received(B::RowDescription);
        assert!(p.quiet_batch());
        assert!(!p.is_idle(), "the batch is still open");
        send(&mut p, &[F::Close, F::Flush]);
        p.received(B::CloseComplete);
        assert!(p.quiet_batch(), "a Close keeps it quiet");
        send(&mut p, &[F::Bind, F::Execute, F::Sync]);
        assert!(!p.quiet_batch(), "a Bind runs something");
        p.received(B::BindComplete);
        p.received(B::CommandComplete);
        assert!(!p.quiet_batch());
        assert!(p.ready().drained);
        assert!(p.is_idle());
    }

    #[test]
    fn a_failed_parse_is_no_quiet_batch_and_a_proxy_closed_one_is_idle() {
        let mut p = Pipeline::default();
        send(&mut p, &[F::Parse, F::Flush]);
        p.received(B::ErrorResponse);
        assert!(!p.quiet_batch(), "the backend skips to the client's Sync");
        send(&mut p, &[F::Sync]);
        assert!(p.ready().drained);
        send(&mut p, &[F::Parse, F::Describe, F::Flush]);
        p.received(B::ParseComplete);
        p.received(B::NoData);
        assert!(p.quiet_batch());
        p.closed();
        assert!(p.is_idle());
        assert!(!p.quiet_batch());
    }

    #[test]
    fn an_error_mid_pipeline_skips_to_the_sync() {
        let mut p = Pipeline::default();
        send(&mut p, &[F::Parse, F::Bind, F::Execute, F::Parse, F::Bind, F::Execute, F::Sync, F::Query]);
        p.received(B::ParseComplete);
        p.received(B::ErrorResponse);
        assert!(!p.ready().drained, "the Query is still owed");
        p.received(B::ErrorResponse);
        assert!(p.ready().drained);
        assert!(p.is_idle());
    }

    #[test]
    fn extended_copy_in_with_two_syncs_owes_one_ready() {
        // libpq: PQsendQueryParams("COPY ... FROM STDIN") then PQputCopyEnd.
        let mut p = Pipeline::default();
        send(&mut p, &[F::Parse, F::Bind, F::Describe, F::Execute, F::Sync]);
        p.received(B::ParseComplete);
        p.received(B::BindComplete);
        p.received(B::NoData);
        p.received(B::CopyInResponse);
        send(&mut p, &[F::CopyData, F::CopyData, F::CopyDone, F::Sync]);
        p.received(B::CommandComplete);
        assert!(p.ready().drained);
        assert!(p.is_idle(), "the Sync read during COPY is ignored by PostgreSQL");
    }

    #[test]
    fn copy_data_sent_before_the_copy_in_response_is_accounted() {
        let mut p = Pipeline::default();
        send(&mut p, &[F::Bind, F::Execute, F::Sync, F::CopyData, F::CopyDone, F::Sync]);
        p.received(B::BindComplete);
        p.received(B::CopyInResponse);
        p.received(B::CommandComplete);
        assert!(p.ready().drained);
        assert!(p.is_idle());
    }

    #[test]
    fn an_error_during_extended_copy_in_skips_to_the_sync_after_copy_done() {
        let mut p = Pipeline::default();
        send(&mut p, &[F::Bind, F::Execute, F::Sync]);
        p.received(B::BindComplete);
        p.received(B::CopyInResponse);
        send(&mut p, &[F::CopyData]);
        p.received(B::ErrorResponse);
        assert!(!p.is_idle());
        send(&mut p, &[F::CopyDone, F::Sync]);
        assert!(p.ready().drained);
        assert!(p.is_idle());
    }

    #[test]
    fn simple_copy_in_and_out() {
        let mut p = Pipeline::default();
        send(&mut p, &[F::Query]);
        p.received(B::CopyInResponse);
        send(&mut p, &[F::CopyData, F::Sync, F::CopyDone]);
        p.received(B::CommandComplete);
        assert!(p.ready().drained);
        assert!(p.is_idle());
        send(&mut p, &[F::Query]);
        p.received(B::CopyOutResponse);
        p.received(B::CommandComplete);
        assert!(p.ready().drained);
        // A stray CopyDone outside COPY is ignored by PostgreSQL.
        send(&mut p, &[F::CopyDone]);
        assert!(p.is_idle());
    }

    #[test]
    fn function_call_and_statement_describe() {
        let mut p = Pipeline::default();
        send(&mut p, &[F::FunctionCall]);
        assert!(p.ready().drained);
        send(&mut p, &[F::Parse, F::Describe, F::Sync]);
        p.received(B::ParseComplete);
        p.received(B::ParameterDescription);
        p.received(B::RowDescription);
        assert!(p.ready().drained);
        assert!(p.is_idle());
    }

    #[test]
    fn answers_to_injected_requests_are_ours() {
        let mut p = Pipeline::default();
        p.sent(F::Query, true);
        send(&mut p, &[F::Query]);
        assert_eq!(p.received(B::CommandComplete), Answer::Ours);
        assert_eq!(p.ready(), Ready { answer: Answer::Ours, drained: false });
        assert_eq!(p.received(B::CommandComplete), Answer::Client);
        assert_eq!(p.ready(), Ready { answer: Answer::Client, drained: true });
        assert_eq!(p.ready().answer, Answer::Client, "an unexpected ReadyForQuery is nobody's");
    }
}
