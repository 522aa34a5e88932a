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
/// PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`.
pub const MAX_STARTUP_PACKET_LEN: u32 = 10_000;
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

/// Checks the length word of a startup-phase packet.
pub fn check_length(len: u32) -> Result<usize, PgError> {
    if (MIN_STARTUP_PACKET_LEN..=MAX_STARTUP_PACKET_LEN).contains(&len) {
        Ok(len as usize)
    } else {
        Err(violation("invalid length of startup packet"))
    }
}

/// Parses a whole packet: `packet` starts with the length word.
pub fn parse(packet: &[u8]) -> Result<StartupPacket, PgError> {
    let len_word: [u8; 4] = packet.get(..4).and_then(|s| s.try_into().ok()).ok_or_else(|| violation("incomplete startup packet"))?;
    let len = check_length(u32::from_be_bytes(len_word))?;
    if packet.len() != len {
        return Err(violation("incomplete startup packet"));
    }
    let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    match code {
        SSL_REQUEST_CODE if len == 8 => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE if len == 8 => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE if len == 16 => {
            let pid = i32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
            let secret = i32::from_be_bytes([packet[12], packet[13], packet[14], packet[15]]);
            Ok(StartupPacket::Cancel(CancelKey { pid, secret }))
        }
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE => Err(violation("invalid length of startup packet")),
        _ if code >> 16 == 3 => parse_startup(packet, (code & 0xffff) as u16),
        _ => Err(PgError::fatal(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!(
                "unsupported frontend protocol {}.{}: server supports 3.0 to 3.0",
                code >> 16,
                code & 0xffff
            ),
        )),
    }
}

fn parse_startup(packet: &[u8], minor_version: u16) -> Result<StartupPacket, PgError> {
    if packet.last() != Some(&0) {
        return Err(violation("invalid startup packet layout: expected terminator as last byte"));
    }
    let mut buf = BytesMut::with_capacity(packet.len());
    buf.put_slice(packet);
    let decoded = Startup::decode(&mut buf, &DecodeContext::default())
        .map_err(|_| violation("invalid startup packet layout"))?
        .ok_or_else(|| violation("incomplete startup packet"))?;
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
        ));
    }
    Ok(StartupPacket::Startup(StartupMessage { minor_version, params, unsupported_options }))
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
        let StartupPacket::Startup(m) = parse(&p).unwrap() else { panic!() };
        assert_eq!(m.user(), "app");
        assert_eq!(m.database(), "shop");
        assert_eq!(m.minor_version, 0);
    }

    #[test]
    fn database_defaults_to_user() {
        let p = encode_startup(&[("user".into(), "app".into())]);
        let StartupPacket::Startup(m) = parse(&p).unwrap() else { panic!() };
        assert_eq!(m.database(), "app");
    }

    #[test]
    fn startup_without_user_is_refused_with_28000() {
        let p = encode_startup(&[("database".into(), "x".into())]);
        assert_eq!(parse(&p).unwrap_err().code, sqlstate::INVALID_AUTHORIZATION);
    }

    #[test]
    fn requests_are_recognised() {
        assert_eq!(parse(&packet(SSL_REQUEST_CODE, b"")).unwrap(), StartupPacket::SslRequest);
        assert_eq!(parse(&packet(GSSENC_REQUEST_CODE, b"")).unwrap(), StartupPacket::GssEncRequest);
        let key = CancelKey { pid: 42, secret: -7 };
        assert_eq!(parse(&encode_cancel(key)).unwrap(), StartupPacket::Cancel(key));
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        for bad in [&b"GET / HTTP/1.1\r\n"[..], &[0, 0, 0, 3], &[0, 0, 0, 8, 0, 1, 0, 0], &[0, 0, 0, 12, 4, 210, 22, 46, 0, 0, 0, 1]] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse(&packet(2 << 16, b"user\0x\0\0")).unwrap_err().code, sqlstate::FEATURE_NOT_SUPPORTED);
    }

    #[test]
    fn protocol_options_are_set_aside() {
        let mut payload = b"user\0app\0_pq_.compression\0on\0".to_vec();
        payload.push(0);
        let StartupPacket::Startup(m) = parse(&packet(PROTOCOL_3_0 | 2, &payload)).unwrap() else { panic!() };
        assert_eq!(m.minor_version, 2);
        assert_eq!(m.unsupported_options, vec!["_pq_.compression".to_string()]);
    }
}
