//! The messages the proxy writes itself, encoded with pgwire.

use bytes::{BufMut, BytesMut};
use pgwire::messages::response::{ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, SecretKey};
use pgwire::messages::Message;

use super::startup::CancelKey;
use super::PgError;

fn encode(buf: &mut BytesMut, msg: &impl Message) {
    // Encoding only fails for messages past pgwire's size limits; ours are small and
    // built from bounded inputs, so a failure would be a bug, not a peer's doing.
    if let Err(e) = msg.encode(buf) {
        tracing::error!(error = %e, "could not encode an outgoing message");
    }
}

/// An ErrorResponse with the fields PostgreSQL sends first: severity (localized
/// and not), SQLSTATE, message, detail.
pub fn error_response(buf: &mut BytesMut, err: &PgError) {
    let mut body = Vec::with_capacity(err.message.len() + 32);
    let severity = err.severity.as_str();
    let mut field = |code: u8, value: &str| {
        body.push(code);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    };
    field(b'S', severity);
    field(b'V', severity);
    field(b'C', err.code);
    field(b'M', &err.message);
    if let Some(detail) = &err.detail {
        field(b'D', detail);
    }
    body.push(0);
    frontend_message(buf, b'E', &body);
}

pub fn auth_ok(buf: &mut BytesMut) {
    encode(buf, &Authentication::Ok);
}

pub fn auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    encode(buf, &Authentication::MD5Password(salt.to_vec()));
}

pub fn auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    encode(buf, &Authentication::SASL(mechanisms.iter().map(|m| m.to_string()).collect()));
}

pub fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    encode(buf, &Authentication::SASLContinue(bytes::Bytes::copy_from_slice(data)));
}

pub fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    encode(buf, &Authentication::SASLFinal(bytes::Bytes::copy_from_slice(data)));
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    encode(buf, &ParameterStatus::new(name.to_owned(), value.to_owned()));
}

pub fn backend_key_data(buf: &mut BytesMut, key: CancelKey) {
    encode(buf, &BackendKeyData::new(key.pid, SecretKey::I32(key.secret)));
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    let status = match status {
        b'T' => TransactionStatus::Transaction,
        b'E' => TransactionStatus::Error,
        _ => TransactionStatus::Idle,
    };
    encode(buf, &ReadyForQuery::new(status));
}

pub fn negotiate_protocol_version(buf: &mut BytesMut, newest_minor: i32, unsupported: &[String]) {
    encode(buf, &NegotiateProtocolVersion::new(newest_minor, unsupported.to_vec()));
}

/// A typed frontend message: tag, length, body (used towards backends).
pub fn frontend_message(buf: &mut BytesMut, tag: u8, body: &[u8]) {
    buf.put_u8(tag);
    buf.put_u32(body.len() as u32 + 4);
    buf.put_slice(body);
}

/// SASLInitialResponse: mechanism, then the length-prefixed initial data.
pub fn sasl_initial_response(buf: &mut BytesMut, mechanism: &str, data: &[u8]) {
    let mut body = BytesMut::with_capacity(mechanism.len() + 5 + data.len());
    body.put_slice(mechanism.as_bytes());
    body.put_u8(0);
    body.put_u32(data.len() as u32);
    body.put_slice(data);
    frontend_message(buf, b'p', &body);
}

/// PasswordMessage: a NUL-terminated string.
pub fn password_message(buf: &mut BytesMut, password: &str) {
    let mut body = Vec::with_capacity(password.len() + 1);
    body.extend_from_slice(password.as_bytes());
    body.push(0);
    frontend_message(buf, b'p', &body);
}

pub const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// Sync, as the proxy sends it itself.
pub const SYNC: [u8; 5] = [b'S', 0, 0, 0, 4];
