//! The untyped packets that open a connection: SSLRequest, GSSENCRequest,
//! CancelRequest and StartupMessage (`length`, `code`, payload).
//!
//! Lengths are checked here, before pgwire's startup decoder sees the bytes: pgwire's
//! decoders trust the length word and panic on short input.

use bytes::{BufMut, BytesMut};
use pgwire::messages::startup::Startup;
use pgwire::messages::{DecodeContext, Message};

use super::{sqlstate, PgError};

pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// PostgreSQL's `MAX_STARTUP_PACKET_LENGTH` (10,000), which counts the packet
/// without its length word.
pub const MAX_STARTUP_PACKET_LEN: u32 = 10_004;
/// Length word + code.
pub const MIN_STARTUP_PACKET_LEN: u32 = 8;
pub const PROTOCOL_3_0: u32 = 3 << 16;

/// The key a CancelRequest carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub pid: i32,
    pub secret: i32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelKey),
    Startup(StartupMessage),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub minor_version: u16,
    /// Parameters in the order received; `user` is guaranteed present.
    pub params: Vec<(String, String)>,
    /// `_pq_.*` protocol options, which protocol 3.0 does not know.
    pub unsupported_options: Vec<String>,
}

impl StartupMessage {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn user(&self) -> &str {
        self.get("user").unwrap_or_default()
    }

    /// The database, which defaults to the user name as in PostgreSQL.
    pub fn database(&self) -> &str {
        self.get("database").filter(|d| !d.is_empty()).unwrap_or_else(|| self.user())
    }
}

fn violation(message: impl Into<String>) -> PgError {
    PgError::fatal(sqlstate::PROTOCOL_VIOLATION, message)
}

/// A startup packet refused, answered as PostgreSQL answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupError {
    /// PostgreSQL logs it (`COMMERROR`) and closes without a word: a bad length
    /// word (node-postgres's Terminate sent before its StartupMessage reads as a
    /// 1.4 GB length), a short packet, a CancelRequest of the wrong size.
    Silent(&'static str),
    Fatal(PgError),
    /// Protocol 1.x or 2.x: the error in the old protocol's format (an `E` and a
    /// NUL-terminated text), which those clients can read.
    FatalV2(String),
}

impl StartupError {
    /// What the client is sent before the connection closes.
    pub fn reply(&self) -> Option<BytesMut> {
        match self {
            StartupError::Silent(_) => None,
            StartupError::Fatal(e) => {
                let mut b = BytesMut::new();
                super::write::error_response(&mut b, e);
                Some(b)
            }
            StartupError::FatalV2(text) => {
                let mut b = BytesMut::with_capacity(text.len() + 10);
                b.put_u8(b'E');
                b.put_slice(b"FATAL:  ");
                b.put_slice(text.as_bytes());
                b.put_slice(b"\n\0");
                Some(b)
            }
        }
    }
}

impl std::fmt::Display for StartupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartupError::Silent(why) => f.write_str(why),
            StartupError::Fatal(e) => write!(f, "{e}"),
            StartupError::FatalV2(text) => f.write_str(text),
        }
    }
}

impl From<PgError> for StartupError {
    fn from(e: PgError) -> Self {
        StartupError::Fatal(e)
    }
}

/// Checks the length word of a startup-phase packet.
pub fn check_length(len: u32) -> Result<usize, StartupError> {
    if (MIN_STARTUP_PACKET_LEN..=MAX_STARTUP_PACKET_LEN).contains(&len) {
        Ok(len as usize)
    } else {
        Err(StartupError::Silent("invalid length of startup packet"))
    }
}

/// Where a connection stands in its negotiation: which of SSLRequest and
/// GSSENCRequest it has made already (each may be made once, as in PostgreSQL).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Negotiated {
    pub ssl: bool,
    pub gss: bool,
}

/// Parses a whole packet: `packet` starts with the length word. A second
/// SSLRequest or GSSENCRequest is refused as PostgreSQL refuses it.
pub fn parse(packet: &[u8], done: Negotiated) -> Result<StartupPacket, StartupError> {
    let len_word: [u8; 4] = packet.get(..4).and_then(|s| s.try_into().ok()).ok_or(StartupError::Silent("incomplete startup packet"))?;
    let len = check_length(u32::from_be_bytes(len_word))?;
    if packet.len() != len {
        return Err(StartupError::Silent("incomplete startup packet"));
    }
    let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    let (major, minor) = (code >> 16, code & 0xffff);
    match code {
        // PostgreSQL does not check these two's length.
        SSL_REQUEST_CODE if !done.ssl => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE if !done.gss => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE if len == 16 => {
            let pid = i32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
            let secret = i32::from_be_bytes([packet[12], packet[13], packet[14], packet[15]]);
            Ok(StartupPacket::Cancel(CancelKey { pid, secret }))
        }
        CANCEL_REQUEST_CODE => Err(StartupError::Silent("invalid length of startup packet")),
        _ if major == 3 => parse_startup(packet, minor as u16),
        _ if major < 3 => Err(StartupError::FatalV2(format!("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"))),
        _ => Err(StartupError::Fatal(PgError::fatal(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"),
        ))),
    }
}

fn parse_startup(packet: &[u8], minor_version: u16) -> Result<StartupPacket, StartupError> {
    // PostgreSQL says this of every layout it cannot read: a missing final NUL, an
    // odd number of strings, bytes after the terminator.
    let layout = || violation("invalid startup packet layout: expected terminator as last byte");
    if packet.last() != Some(&0) || !well_formed(&packet[8..]) {
        return Err(layout().into());
    }
    let mut buf = BytesMut::with_capacity(packet.len());
    buf.put_slice(packet);
    let decoded = Startup::decode(&mut buf, &DecodeContext::default()).map_err(|_| layout())?.ok_or_else(layout)?;
    let mut params = Vec::with_capacity(decoded.parameters.len());
    let mut unsupported_options = Vec::new();
    for (key, value) in decoded.parameters {
        if key.starts_with("_pq_.") {
            unsupported_options.push(key);
        } else {
            params.push((key, value));
        }
    }
    if !params.iter().any(|(k, v)| k == "user" && !v.is_empty()) {
        return Err(PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet",
        )
        .into());
    }
    Ok(StartupPacket::Startup(StartupMessage { minor_version, params, unsupported_options }))
}

/// Name/value pairs, each NUL-terminated, then one NUL that ends the list and
/// the packet (PostgreSQL's own reading of the layout).
fn well_formed(mut b: &[u8]) -> bool {
    loop {
        let Some(end) = b.iter().position(|c| *c == 0) else { return false };
        if end == 0 {
            // The list's terminator must be the last byte.
            return b.len() == 1;
        }
        b = &b[end + 1..];
        // A value, possibly empty.
        let Some(end) = b.iter().position(|c| *c == 0) else { return false };
        b = &b[end + 1..];
    }
}

/// Encodes a StartupMessage for a backend (protocol 3.0).
pub fn encode_startup(params: &[(String, String)]) -> BytesMut {
    let mut buf = BytesMut::with_capacity(256);
    buf.put_u32(0);
    buf.put_u32(PROTOCOL_3_0);
    for (k, v) in params {
        buf.put_slice(k.as_bytes());
        buf.put_u8(0);
        buf.put_slice(v.as_bytes());
        buf.put_u8(0);
    }
    buf.put_u8(0);
    let len = buf.len() as u32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    buf
}

pub fn encode_cancel(key: CancelKey) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&16u32.to_be_bytes());
    out[4..8].copy_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    out[8..12].copy_from_slice(&key.pid.to_be_bytes());
    out[12..].copy_from_slice(&key.secret.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = ((payload.len() + 8) as u32).to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn startup_parameters_are_kept_in_order() {
        let p = encode_startup(&[("user".into(), "app".into()), ("database".into(), "shop".into()), ("application_name".into(), "".into())]);
        let StartupPacket::Startup(m) = parse(&p, Negotiated::default()).unwrap() else { panic!() };
        assert_eq!(m.user(), "app");
        assert_eq!(m.database(), "shop");
        assert_eq!(m.minor_version, 0);
    }

    #[test]
    fn database_defaults_to_user() {
        let p = encode_startup(&[("user".into(), "app".into())]);
        let StartupPacket::Startup(m) = parse(&p, Negotiated::default()).unwrap() else { panic!() };
        assert_eq!(m.database(), "app");
    }

    #[test]
    fn startup_without_user_is_refused_with_28000() {
        let p = encode_startup(&[("database".into(), "x".into())]);
        assert!(matches!(parse(&p, Negotiated::default()), Err(StartupError::Fatal(e)) if e.code == sqlstate::INVALID_AUTHORIZATION));
    }

    #[test]
    fn requests_are_recognised() {
        assert_eq!(parse(&packet(SSL_REQUEST_CODE, b""), Negotiated::default()).unwrap(), StartupPacket::SslRequest);
        assert_eq!(parse(&packet(GSSENC_REQUEST_CODE, b""), Negotiated::default()).unwrap(), StartupPacket::GssEncRequest);
        let key = CancelKey { pid: 42, secret: -7 };
        assert_eq!(parse(&encode_cancel(key), Negotiated::default()).unwrap(), StartupPacket::Cancel(key));
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        for bad in [&b"GET / HTTP/1.1\r\n"[..], &[0, 0, 0, 3], &[0, 0, 0, 8, 0, 1, 0, 0], &[0, 0, 0, 12, 4, 210, 22, 46, 0, 0, 0, 1]] {
            assert!(parse(bad, Negotiated::default()).is_err(), "{bad:?}");
        }
        assert!(matches!(parse(&packet(4 << 16, b"user\0x\0\0"), Negotiated::default()), Err(StartupError::Fatal(e)) if e.code == sqlstate::FEATURE_NOT_SUPPORTED));
    }

    /// PostgreSQL closes without a word on a bad length (node-postgres's Terminate
    /// before its StartupMessage), answers the old protocols in their own format,
    /// reads any layout it cannot parse as the same FATAL, and takes each of
    /// SSLRequest and GSSENCRequest once.
    #[test]
    fn malformed_packets_are_refused_as_postgresql_refuses_them() {
        let none = Negotiated::default();
        assert_eq!(check_length(0x5800_0000), Err(StartupError::Silent("invalid length of startup packet")));
        assert_eq!(check_length(4), Err(StartupError::Silent("invalid length of startup packet")));
        assert_eq!(check_length(10_004), Ok(10_004));
        assert!(matches!(parse(&packet(CANCEL_REQUEST_CODE, &[0; 4]), none), Err(StartupError::Silent(_))));
        let v2 = parse(&packet(2 << 16, b"user\0x\0\0"), none).unwrap_err();
        assert_eq!(&v2.reply().unwrap()[..], &b"EFATAL:  unsupported frontend protocol 2.0: server supports 3.0 to 3.0\n\0"[..]);
        for layout in [&b"user\0x\0"[..], b"user\0x\0y\0\0", b"user\0x\0\0extra\0", b""] {
            let e = parse(&packet(PROTOCOL_3_0, layout), none).unwrap_err();
            assert!(matches!(&e, StartupError::Fatal(e) if e.message == "invalid startup packet layout: expected terminator as last byte"), "{layout:?}: {e:?}");
        }
        assert_eq!(parse(&packet(SSL_REQUEST_CODE, &[0; 4]), none), Ok(StartupPacket::SslRequest), "the length is not checked");
        let again = parse(&packet(SSL_REQUEST_CODE, b""), Negotiated { ssl: true, gss: false }).unwrap_err();
        assert!(matches!(&again, StartupError::Fatal(e) if e.message == "unsupported frontend protocol 1234.5679: server supports 3.0 to 3.0"), "{again:?}");
    }

    #[test]
    fn protocol_options_are_set_aside() {
        let mut payload = b"user\0app\0_pq_.compression\0on\0".to_vec();
        payload.push(0);
        let StartupPacket::Startup(m) = parse(&packet(PROTOCOL_3_0 | 2, &payload), Negotiated::default()).unwrap() else { panic!() };
        assert_eq!(m.minor_version, 2);
        assert_eq!(m.unsupported_options, vec!["_pq_.compression".to_string()]);
    }
}
