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
            Stream::Raw(r) => Ok(r.sock),
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
}

impl RawStream {
    fn io<T>(&mut self, mut f: impl FnMut(&Socket) -> io::Result<T>) -> Poll<io::Result<T>> {
        loop {
            match f(&self.sock) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                r => return Poll::Ready(r),
            }
        }
    }

    /// Reads what the socket has; Pending (with `readable` cleared) when it has
    /// nothing. A read that did not fill `buf` emptied the socket: the next one
    /// waits for an edge (as tokio does).
    pub fn read(&mut self, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        use std::io::Read;
        if !self.readable {
            return Poll::Pending;
        }
        let r = self.io(|s| match s {
            Socket::Tcp(t) => (&*t).read(buf),
            Socket::Unix(u) => (&*u).read(buf),
        });
        match r {
            Poll::Ready(Ok(n)) if n > 0 && n < buf.len() => self.readable = false,
            Poll::Pending => self.readable = false,
            _ => {}
        }
        r
    }

    /// Writes what the socket takes; Pending (with `writable` cleared) when it is full.
    pub fn write(&mut self, buf: &[u8]) -> Poll<io::Result<usize>> {
        use std::io::Write;
        if !self.writable {
            return Poll::Pending;
        }
        let r = self.io(|s| match s {
            Socket::Tcp(t) => (&*t).write(buf),
            Socket::Unix(u) => (&*u).write(buf),
        });
        match r {
            Poll::Ready(Ok(n)) if n < buf.len() => self.writable = false,
            Poll::Pending => self.writable = false,
            _ => {}
        }
        r
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
        *self = Stream::Raw(RawStream { sock, readable: true, writable: true });
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
