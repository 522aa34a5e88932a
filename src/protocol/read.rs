//! Whole-message reads for the handshakes, where messages are few and small.
//!
//! Every length is checked before a body is read or decoded.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{sqlstate, PgError};

/// Messages exchanged during a handshake are small; a longer one is an attack or a bug.
pub const HANDSHAKE_MESSAGE_LIMIT: u32 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Protocol(PgError),
    /// A startup packet PostgreSQL refuses without a word (see
    /// [`StartupError::Silent`](super::startup::StartupError::Silent)).
    #[error("{0}")]
    Silent(&'static str),
}

impl ReadError {
    pub fn protocol(message: impl Into<String>) -> ReadError {
        ReadError::Protocol(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, message))
    }
}

fn eof_is_closed(e: std::io::Error) -> ReadError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        ReadError::Closed
    } else {
        ReadError::Io(e)
    }
}

/// Reads one typed message (`tag`, length, body) and returns the tag and body.
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R, limit: u32) -> Result<(u8, BytesMut), ReadError> {
    let mut header = [0u8; 5];
    r.read_exact(&mut header).await.map_err(eof_is_closed)?;
    let tag = header[0];
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if len < 4 || len > limit {
        return Err(ReadError::protocol(format!("invalid message length {len}")));
    }
    let mut body = BytesMut::zeroed(len as usize - 4);
    r.read_exact(&mut body).await.map_err(eof_is_closed)?;
    Ok((tag, body))
}

/// Reads an untyped startup-phase packet, length word included.
pub async fn read_startup_packet<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, ReadError> {
    let mut len_word = [0u8; 4];
    r.read_exact(&mut len_word).await.map_err(eof_is_closed)?;
    let len = super::startup::check_length(u32::from_be_bytes(len_word)).map_err(|e| match e {
        super::startup::StartupError::Silent(why) => ReadError::Silent(why),
        other => ReadError::protocol(other.to_string()),
    })?;
    let mut packet = vec![0u8; len];
    packet[..4].copy_from_slice(&len_word);
    r.read_exact(&mut packet[4..]).await.map_err(eof_is_closed)?;
    Ok(packet)
}

/// Splits a NUL-terminated string off the front of `buf`.
pub fn take_cstr(buf: &mut BytesMut) -> Option<String> {
    let end = buf.iter().position(|b| *b == 0)?;
    let s = String::from_utf8(buf.split_to(end).to_vec()).ok();
    buf.advance(1);
    s
}

/// A SASLInitialResponse body: mechanism name and initial data. Parsed here, with
/// bounds checks, because pgwire's decoder panics on a short or negative length.
pub fn parse_sasl_initial_response(mut body: BytesMut) -> Result<(String, BytesMut), ReadError> {
    let bad = || ReadError::protocol("malformed SASLInitialResponse message");
    let mechanism = take_cstr(&mut body).ok_or_else(bad)?;
    if body.len() < 4 {
        return Err(bad());
    }
    let len = body.get_i32();
    if len < 0 || len as usize != body.len() {
        return Err(bad());
    }
    Ok((mechanism, body))
}

/// An ErrorResponse or NoticeResponse body, as (field code, value) pairs.
pub fn parse_fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let Some(end) = tail.iter().position(|b| *b == 0) else { break };
        out.push((code, String::from_utf8_lossy(&tail[..end]).into_owned()));
        rest = &tail[end + 1..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sasl_initial_response_lengths_are_checked() {
        let ok = BytesMut::from(&b"SCRAM-SHA-256\0\0\0\0\x03abc"[..]);
        let (m, data) = parse_sasl_initial_response(ok).unwrap();
        assert_eq!((m.as_str(), &data[..]), ("SCRAM-SHA-256", &b"abc"[..]));
        for bad in [&b"SCRAM-SHA-256\0\0\0"[..], b"SCRAM-SHA-256\0\xff\xff\xff\xfeabc", b"SCRAM-SHA-256\0\0\0\0\x09abc", b"noterminator"] {
            assert!(parse_sasl_initial_response(BytesMut::from(bad)).is_err());
        }
    }

    #[test]
    fn error_fields_are_parsed() {
        let f = parse_fields(b"SFATAL\0C28P01\0Mno\0\0");
        assert_eq!(f, vec![(b'S', "FATAL".into()), (b'C', "28P01".into()), (b'M', "no".into())]);
    }
}
