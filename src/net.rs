//! One stream type for every leg: TCP, Unix socket, or TLS over TCP on either side;
//! and a plain socket off tokio's event loop, riding a session's express lane.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A client that negotiated TLS with us.
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// A backend we negotiated TLS with.
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// A plain socket on an express lane (`session::express`): read and written
    /// directly, its readiness kept by the lane's event loop, not by tokio's.
    Raw(RawStream),
    /// A socket lost in a failed move between event loops: reads find its end,
    /// writes fail.
    Lost(Lost),
}

/// A connection before it is registered with an event loop.
pub enum Socket {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Socket {
    /// Takes a connection off the event loop that accepted it.
    pub fn detach(s: Stream) -> io::Result<Socket> {
        match s {
            Stream::Tcp(t) => Ok(Socket::Tcp(t.into_std()?)),
            Stream::Unix(u) => Ok(Socket::Unix(u.into_std()?)),
            _ => Err(io::Error::other("only a plain socket can move to another event loop")),
        }
    }

    /// Registers it with the current runtime's event loop.
    pub fn attach(self) -> io::Result<Stream> {
        match self {
            Socket::Tcp(t) => Ok(Stream::Tcp(TcpStream::from_std(t)?)),
            Socket::Unix(u) => Ok(Stream::Unix(UnixStream::from_std(u)?)),
        }
    }

    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Socket::Tcp(t) => t.as_raw_fd(),
            Socket::Unix(u) => u.as_raw_fd(),
        }
    }
}

/// A plain non-blocking socket and what its event loop last said of it. An edge
/// (epoll's `EPOLLET`) sets a flag; a read or write that finds the socket empty or
/// full clears it, and the next edge comes when that changes.
pub struct RawStream {
    pub sock: Socket,
    /// The socket may have bytes (or its end) to read.
    pub readable: bool,
    /// The socket may take bytes.
    pub writable: bool,
    /// The peer has closed its side (or the socket failed): final, never cleared.
    /// A short read then does not clear `readable`, since no later edge would say
    /// that the end is still to be read (data and the close often come in one edge).
    pub read_closed: bool,
}

impl RawStream {
    /// One read or write, if the flag says it may find the socket ready: the flag
    /// is cleared when the socket turns out empty or full, or when `drained` says
    /// the call moved fewer bytes than it could have (as tokio does: the next edge
    /// says when there is more).
    fn attempt(sock: &Socket, ready: &mut bool, mut f: impl FnMut(&Socket) -> io::Result<usize>, drained: impl Fn(usize) -> bool) -> Poll<io::Result<usize>> {
        if !*ready {
            return Poll::Pending;
        }
        loop {
            match f(sock) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    *ready = false;
                    return Poll::Pending;
                }
                Ok(n) if drained(n) => {
                    *ready = false;
                    return Poll::Ready(Ok(n));
                }
                r => return Poll::Ready(r),
            }
        }
    }

    /// Reads what the socket has (0: its end).
    pub fn read(&mut self, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        use std::io::Read;
        let len = buf.len();
        let read = |s: &Socket| match s {
            Socket::Tcp(t) => (&*t).read(buf),
            Socket::Unix(u) => (&*u).read(buf),
        };
        let closed = self.read_closed;
        Self::attempt(&self.sock, &mut self.readable, read, |n| n > 0 && n < len && !closed)
    }

    /// Writes what the socket takes.
    pub fn write(&mut self, buf: &[u8]) -> Poll<io::Result<usize>> {
        use std::io::Write;
        let write = |s: &Socket| match s {
            Socket::Tcp(t) => (&*t).write(buf),
            Socket::Unix(u) => (&*u).write(buf),
        };
        Self::attempt(&self.sock, &mut self.writable, write, |n| n < buf.len())
    }
}

/// See [`Stream::Lost`].
pub struct Lost;

impl Stream {
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::ServerTls(_) | Stream::ClientTls(_))
    }

    pub fn is_unix(&self) -> bool {
        matches!(self, Stream::Unix(_) | Stream::Raw(RawStream { sock: Socket::Unix(_), .. }))
    }

    /// A TCP or Unix socket on tokio's event loop: one that can ride a lane.
    pub fn is_plain(&self) -> bool {
        matches!(self, Stream::Tcp(_) | Stream::Unix(_))
    }

    /// The socket of a stream riding a lane.
    pub fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        match self {
            Stream::Raw(r) => Some(r.sock.as_raw_fd()),
            _ => None,
        }
    }

    pub fn as_raw_mut(&mut self) -> Option<&mut RawStream> {
        match self {
            Stream::Raw(r) => Some(r),
            _ => None,
        }
    }

    /// Takes a plain socket off tokio's event loop, for a lane's. Anything else stays.
    /// On an error the socket is lost.
    pub fn to_raw(&mut self) -> io::Result<()> {
        if !self.is_plain() {
            return Ok(());
        }
        let sock = Socket::detach(std::mem::replace(self, Stream::Lost(Lost)))?;
        *self = Stream::Raw(RawStream { sock, readable: true, writable: true, read_closed: false });
        Ok(())
    }

    /// Registers a socket back from a lane with the current runtime's event loop.
    /// On an error the socket is lost.
    pub fn to_tokio(&mut self) -> io::Result<()> {
        if !matches!(self, Stream::Raw(_)) {
            return Ok(());
        }
        if let Stream::Raw(r) = std::mem::replace(self, Stream::Lost(Lost)) {
            *self = r.sock.attach()?;
        }
        Ok(())
    }

    /// Whether a read may find bytes (registers the waker when not). A TLS stream
    /// may hold decrypted bytes the socket no longer shows: always worth a read.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Tcp(s) => s.poll_read_ready(cx),
            Stream::Unix(s) => s.poll_read_ready(cx),
            Stream::ServerTls(_) | Stream::ClientTls(_) | Stream::Lost(_) => Poll::Ready(Ok(())),
            // Woken by the lane's event loop, not through `cx`.
            Stream::Raw(r) => if r.readable { Poll::Ready(Ok(())) } else { Poll::Pending },
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Tcp($s) => { let $s = Pin::new($s); $e }
            Stream::Unix($s) => { let $s = Pin::new($s); $e }
            Stream::ServerTls($s) => { let $s = Pin::new(&mut **$s); $e }
            Stream::ClientTls($s) => { let $s = Pin::new(&mut **$s); $e }
            Stream::Raw($s) => { let $s = Pin::new($s); $e }
            Stream::Lost($s) => { let $s = Pin::new($s); $e }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
            Stream::ServerTls(s) => s.is_write_vectored(),
            Stream::ClientTls(s) => s.is_write_vectored(),
            Stream::Raw(_) | Stream::Lost(_) => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

/// A raw stream ignores `cx`: the lane's event loop runs the relay again at the
/// socket's next edge.
impl AsyncRead for RawStream {
    fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.read(buf.initialize_unfilled()).map_ok(|n| buf.advance(n))
    }
}

impl AsyncWrite for RawStream {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().write(buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = match &self.sock {
            Socket::Tcp(t) => t.shutdown(std::net::Shutdown::Write),
            Socket::Unix(u) => u.shutdown(std::net::Shutdown::Write),
        };
        Poll::Ready(r.or_else(|e| if e.kind() == io::ErrorKind::NotConnected { Ok(()) } else { Err(e) }))
    }
}

impl AsyncRead for Lost {
    fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Lost {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::ErrorKind::NotConnected.into()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A raw stream tries the socket only while its flag says it may be ready, and
    /// clears the flag when the socket turns out empty or full: the next try waits
    /// for the lane's next edge to set it again.
    #[test]
    fn a_raw_stream_clears_its_flags_when_the_socket_is_empty_or_full() {
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut raw = RawStream { sock: Socket::Unix(ours), readable: true, writable: true, read_closed: false };
        let mut buf = [0u8; 64];

        assert!(raw.read(&mut buf).is_pending(), "nothing to read yet");
        assert!(!raw.readable);
        theirs.write_all(b"hello").unwrap();
        assert!(raw.read(&mut buf).is_pending(), "no edge seen: the socket is not tried");
        raw.readable = true;
        assert!(matches!(raw.read(&mut buf), Poll::Ready(Ok(5))));
        assert_eq!(&buf[..5], b"hello");
        assert!(!raw.readable, "a short read emptied the socket");

        let chunk = [7u8; 4096];
        let mut sent = 0;
        while let Poll::Ready(n) = raw.write(&chunk) {
            sent += n.unwrap();
        }
        assert!(!raw.writable, "a full socket clears the flag");
        assert!(raw.write(&chunk).is_pending(), "no edge seen: the socket is not tried");
        let mut drained = vec![0u8; sent];
        theirs.read_exact(&mut drained).unwrap();
        assert!(drained.iter().all(|b| *b == 7));
        raw.writable = true;
        assert!(matches!(raw.write(b"more"), Poll::Ready(Ok(4))));
        theirs.read_exact(&mut buf[..4]).unwrap();
        assert_eq!(&buf[..4], b"more");

        drop(theirs);
        raw.readable = true;
        assert!(matches!(raw.read(&mut buf), Poll::Ready(Ok(0))), "the peer's end reads as 0");
        assert!(raw.readable, "an end stays readable");
    }

    /// The last bytes and the peer's close often come in one edge: the short read
    /// that takes the bytes must leave the end to be read, or the session never
    /// learns that its peer has gone.
    #[test]
    fn the_end_after_a_short_read_is_still_read_when_the_edge_said_closed() {
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut raw = RawStream { sock: Socket::Unix(ours), readable: false, writable: true, read_closed: false };
        theirs.write_all(b"FATAL").unwrap();
        drop(theirs);
        // One edge: readable and closed.
        raw.readable = true;
        raw.read_closed = true;
        let mut buf = [0u8; 64];
        assert!(matches!(raw.read(&mut buf), Poll::Ready(Ok(5))));
        assert!(matches!(raw.read(&mut buf), Poll::Ready(Ok(0))), "the end is read without another edge");
    }
}
