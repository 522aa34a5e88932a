//! The frame scanner: walks a byte stream of typed messages (`tag`, big-endian
//! length that counts itself, body) without decoding or copying them.
//!
//! A relay hands it the bytes it has read; it reports either body bytes of a frame
//! already announced, a new frame header, or that a header is still incomplete. The
//! relay decides per tag whether it needs to see more than the header; everything
//! else flows through in whatever chunks the socket delivered, so a 1 GB message is
//! never held whole.

/// PostgreSQL's limit on one message (`PQ_LARGE_MESSAGE_LIMIT`, 1 GB - 1).
pub const PG_MAX_MESSAGE_LEN: u32 = 0x3fff_ffff;
pub const HEADER_LEN: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid message length {len} for message type {}", printable(*tag))]
    TooShort { tag: u8, len: u32 },
    #[error("message type {} of {len} bytes exceeds the limit of {limit} bytes", printable(*tag))]
    TooLong { tag: u8, len: u32, limit: u32 },
}

fn printable(tag: u8) -> String {
    if tag.is_ascii_graphic() {
        format!("'{}'", tag as char)
    } else {
        format!("0x{tag:02x}")
    }
}

/// What the next bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// `n` bytes (all available, or the rest of the frame) belong to a frame whose
    /// header has been passed already.
    Body(usize),
    /// A frame starts here: its tag and total size (tag + length word + body).
    Frame { tag: u8, total: usize },
    /// Fewer than five bytes are left: read more before scanning on.
    Incomplete,
}

/// Scanner state that survives between reads: how much of the current body is left.
#[derive(Debug, Clone)]
pub struct Scanner {
    body_left: usize,
    limit: u32,
}

impl Scanner {
    pub fn new(limit: u32) -> Scanner {
        Scanner { body_left: 0, limit }
    }

    /// True between frames, where a message may be injected or the stream cut cleanly.
    pub fn at_boundary(&self) -> bool {
        self.body_left == 0
    }

    /// Looks at `avail`, the unscanned bytes at the cursor.
    pub fn scan(&mut self, avail: &[u8]) -> Result<Scan, FrameError> {
        if self.body_left > 0 {
            let n = self.body_left.min(avail.len());
            self.body_left -= n;
            return Ok(if n == 0 { Scan::Incomplete } else { Scan::Body(n) });
        }
        let Some(header) = avail.get(..HEADER_LEN) else {
            return Ok(Scan::Incomplete);
        };
        let tag = header[0];
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        if len < 4 {
            return Err(FrameError::TooShort { tag, len });
        }
        if len > self.limit {
            return Err(FrameError::TooLong { tag, len, limit: self.limit });
        }
        Ok(Scan::Frame { tag, total: len as usize + 1 })
    }

    /// Moves the cursor over a frame announced by [`Scan::Frame`], of which `avail`
    /// bytes are at hand: consumes what is there and remembers the rest as body.
    /// Returns the number of bytes consumed.
    pub fn pass(&mut self, total: usize, avail: usize) -> usize {
        if avail >= total {
            total
        } else {
            self.body_left = total - avail;
            avail
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One protocol message: tag, length, body.
    pub(crate) fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// Feeds `stream` in chunks of `chunk` bytes and returns the tags seen.
    fn tags(stream: &[u8], chunk: usize) -> Vec<u8> {
        let mut s = Scanner::new(PG_MAX_MESSAGE_LEN);
        let mut buf: Vec<u8> = Vec::new();
        let mut seen = Vec::new();
        for piece in stream.chunks(chunk) {
            buf.extend_from_slice(piece);
            let mut pos = 0;
            loop {
                match s.scan(&buf[pos..]).unwrap() {
                    Scan::Body(n) => pos += n,
                    Scan::Incomplete => break,
                    Scan::Frame { tag, total } => {
                        seen.push(tag);
                        pos += s.pass(total, buf.len() - pos);
                    }
                }
            }
            buf.drain(..pos);
        }
        assert!(s.at_boundary());
        assert!(buf.is_empty());
        seen
    }

    #[test]
    fn frames_are_found_whatever_the_chunking() {
        let mut stream = frame(b'Q', b"select 1\0");
        stream.extend(frame(b'S', b""));
        stream.extend(frame(b'd', &vec![7u8; 10_000]));
        stream.extend(frame(b'X', b""));
        for chunk in [1, 2, 3, 4, 5, 6, 7, 100, 4096, 1 << 20] {
            assert_eq!(tags(&stream, chunk), b"QSdX", "chunk {chunk}");
        }
    }

    #[test]
    fn a_length_below_four_is_refused() {
        let mut s = Scanner::new(PG_MAX_MESSAGE_LEN);
        assert_eq!(s.scan(&[b'Q', 0, 0, 0, 3]), Err(FrameError::TooShort { tag: b'Q', len: 3 }));
        assert_eq!(s.scan(&[b'Q', 0, 0, 0, 0]), Err(FrameError::TooShort { tag: b'Q', len: 0 }));
    }

    #[test]
    fn a_length_above_the_limit_is_refused() {
        let mut s = Scanner::new(1000);
        assert!(matches!(s.scan(&[b'd', 0, 0, 0x03, 0xe9]), Err(FrameError::TooLong { .. })));
        assert_eq!(s.scan(&[b'd', 0, 0, 0x03, 0xe8]), Ok(Scan::Frame { tag: b'd', total: 1001 }));
    }

    #[test]
    fn postgres_one_gigabyte_limit_is_accepted() {
        let mut s = Scanner::new(PG_MAX_MESSAGE_LEN);
        let len = PG_MAX_MESSAGE_LEN.to_be_bytes();
        assert_eq!(
            s.scan(&[b'd', len[0], len[1], len[2], len[3]]),
            Ok(Scan::Frame { tag: b'd', total: PG_MAX_MESSAGE_LEN as usize + 1 })
        );
        assert!(s.scan(&[b'd', 0x40, 0, 0, 0]).is_err());
    }
}
