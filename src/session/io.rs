//! A relay direction's input, and the polled reads and writes the relay is made of.
//!
//! Cancellation safety: every function here keeps its progress in the buffers it is
//! given, never in a future: a poll that returns Pending, or is dropped, loses no
//! byte.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::buffer::{IoBuf, CHUNK};
use crate::net::Stream;
use crate::protocol::frame::Scanner;

/// One direction's input: what was read and how far its frames were walked.
pub struct Inbound {
    pub buf: IoBuf,
    pub scanner: Scanner,
    /// The rest of the current frame is dropped rather than forwarded.
    pub(super) dropping: bool,
}

impl Inbound {
    pub(super) fn new(limit: u32) -> Inbound {
        Inbound { buf: IoBuf::default(), scanner: Scanner::new(limit), dropping: false }
    }

    /// Between frames: nothing partial has been passed on.
    pub fn at_boundary(&self) -> bool {
        self.scanner.at_boundary()
    }

    /// Moves the frame at the front (`total` bytes, maybe not all read yet: the rest
    /// follows as body) to `out`, or drops it. Returns the bytes forwarded.
    pub(super) fn pass_frame(&mut self, total: usize, drop: bool, out: &mut IoBuf) -> usize {
        let n = self.scanner.pass(total, self.buf.len());
        self.dropping = drop;
        self.pass_body(n, out)
    }

    /// Moves `n` bytes of the current frame to `out`, or drops them.
    pub(super) fn pass_body(&mut self, n: usize, out: &mut IoBuf) -> usize {
        let forwarded = if self.dropping { 0 } else { n };
        out.extend(&self.buf.bytes()[..forwarded]);
        self.buf.consume(n);
        if self.at_boundary() {
            self.dropping = false;
        }
        forwarded
    }
}

/// Writes all of `out` to `s` and flushes it.
pub(super) async fn write_out(s: &mut Stream, out: &mut IoBuf, unflushed: &mut bool) -> std::io::Result<()> {
    std::future::poll_fn(|cx| loop {
        match poll_out(s, out, unflushed, cx)? {
            Poll::Ready(_) if out.is_empty() && !*unflushed => return Poll::Ready(Ok(())),
            Poll::Ready(_) => continue,
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}

/// Writes what is queued in `out` to `s` (and flushes a buffered stream once it is
/// all written). Ready(true) if anything moved; Pending when the socket is full.
pub(super) fn poll_out(s: &mut Stream, out: &mut IoBuf, unflushed: &mut bool, cx: &mut Context<'_>) -> Poll<std::io::Result<bool>> {
    let mut moved = false;
    while !out.is_empty() {
        match Pin::new(&mut *s).poll_write(cx, out.bytes()) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                out.consume(n);
                moved = true;
                *unflushed = s.is_tls();
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return if moved { Poll::Ready(Ok(true)) } else { Poll::Pending },
        }
    }
    out.release();
    if *unflushed {
        match Pin::new(&mut *s).poll_flush(cx) {
            Poll::Ready(Ok(())) => *unflushed = false,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return if moved { Poll::Ready(Ok(true)) } else { Poll::Pending },
        }
    }
    Poll::Ready(Ok(moved))
}

/// Reads what `s` has into `inb`. Ready(n) with n bytes read (0: end of stream).
pub(super) fn poll_in(s: &mut Stream, inb: &mut Inbound, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
    // Most polls find nothing to read: ask the socket before taking a buffer.
    match s.poll_read_ready(cx) {
        Poll::Pending => return Poll::Pending,
        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
        Poll::Ready(Ok(())) => {}
    }
    let spare = inb.buf.spare(CHUNK);
    let mut rb = ReadBuf::new(spare);
    match Pin::new(&mut *s).poll_read(cx, &mut rb) {
        Poll::Ready(Ok(())) => {
            let n = rb.filled().len();
            inb.buf.filled(n);
            Poll::Ready(Ok(n))
        }
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => {
            inb.buf.release();
            Poll::Pending
        }
    }
}

