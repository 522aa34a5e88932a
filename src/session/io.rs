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
use crate::protocol::frame::{FrameError, Scan, Scanner};

/// One direction's input: what was read and how far its frames were walked.
///
/// Frames walked and forwarded stay at the front of the buffer until
/// [`Inbound::flush`] moves them to the peer's output in one step — by handing the
/// whole buffer over, without a copy, when the output is empty and the buffer holds
/// only them (the usual request or result). Anything else written to that output
/// first flushes, so order is kept.
pub struct Inbound {
    buf: IoBuf,
    /// Bytes at the front of `buf` walked and forwarded, not yet moved.
    walked: usize,
    pub scanner: Scanner,
    /// The rest of the current frame is dropped rather than forwarded.
    pub(super) dropping: bool,
}

impl Inbound {
    pub(super) fn new(limit: u32) -> Inbound {
        Inbound { buf: IoBuf::default(), walked: 0, scanner: Scanner::new(limit), dropping: false }
    }

    /// Between frames: nothing partial has been passed on.
    pub fn at_boundary(&self) -> bool {
        self.scanner.at_boundary()
    }

    /// Looks at the next frame (or the next piece of the current one).
    pub fn scan(&mut self) -> Result<Scan, FrameError> {
        self.scanner.scan(&self.buf.bytes()[self.walked..])
    }

    pub fn holds_memory(&self) -> bool {
        self.buf.holds_memory()
    }

    /// The bytes not walked yet.
    pub fn data(&self) -> &[u8] {
        &self.buf.bytes()[self.walked..]
    }

    pub fn data_mut(&mut self) -> &mut [u8] {
        let walked = self.walked;
        &mut self.buf.bytes_mut()[walked..]
    }

    pub fn len(&self) -> usize {
        self.buf.len() - self.walked
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Passes the frame at the front (`total` bytes, maybe not all read yet: the rest
    /// follows as body) on to `out`, or drops it. Returns the bytes forwarded.
    pub(super) fn pass_frame(&mut self, total: usize, drop: bool, out: &mut IoBuf) -> usize {
        let n = self.scanner.pass(total, self.len());
        self.dropping = drop;
        self.pass_body(n, out)
    }

    /// Passes `n` bytes of the current frame on to `out`, or drops them.
    pub(super) fn pass_body(&mut self, n: usize, out: &mut IoBuf) -> usize {
        let forwarded = if self.dropping {
            self.flush(out);
            self.buf.consume(n);
            0
        } else {
            self.walked += n;
            n
        };
        if self.at_boundary() {
            self.dropping = false;
        }
        forwarded
    }

    /// Moves what was passed on into `out`.
    pub(super) fn flush(&mut self, out: &mut IoBuf) {
        if self.walked == 0 {
            return;
        }
        if out.is_empty() && self.walked == self.buf.len() {
            std::mem::swap(out, &mut self.buf);
            self.buf.release();
        } else {
            out.extend(&self.buf.bytes()[..self.walked]);
            self.buf.consume(self.walked);
        }
        self.walked = 0;
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
    // Most polls find nothing to read: ask the socket before taking a buffer. A
    // side that waits gives back a buffer it emptied (an idle session holds none).
    match s.poll_read_ready(cx) {
        Poll::Pending => {
            inb.buf.release();
            return Poll::Pending;
        }
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

