//! Startup and authentication towards a backend, with the client's credentials:
//! trust, cleartext password, md5, SCRAM-SHA-256 and SCRAM-SHA-256-PLUS.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::{Buf, BytesMut};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{BackendConn, BackendError};
use crate::auth::scram::{self, ChannelBinding, ScramClient, ScramKeys};
use crate::auth::{md5, BackendCredentials};
use crate::net::Stream;
use crate::protocol::read::{parse_fields, read_message, ReadError, HANDSHAKE_MESSAGE_LIMIT};
use crate::protocol::startup::{encode_startup, CancelKey};
use crate::protocol::write;

fn io_error(e: ReadError) -> BackendError {
    match e {
        ReadError::Closed => BackendError::Protocol("the backend closed the connection during login".into()),
        ReadError::Io(e) => BackendError::Unreachable(e),
        ReadError::Protocol(p) => BackendError::Protocol(p.message),
        ReadError::Silent(why) => BackendError::Protocol(why.into()),
    }
}

async fn send(stream: &mut Stream, buf: &[u8]) -> Result<(), BackendError> {
    stream.write_all(buf).await.map_err(BackendError::Unreachable)
}

async fn next(stream: &mut Stream) -> Result<(u8, BytesMut), BackendError> {
    read_message(stream, HANDSHAKE_MESSAGE_LIMIT).await.map_err(io_error)
}

fn refused(body: BytesMut) -> BackendError {
    let fields = parse_fields(&body);
    let message = fields.iter().find(|(c, _)| *c == b'M').map(|(_, m)| m.clone()).unwrap_or_default();
    let mut frame = BytesMut::with_capacity(body.len() + 5);
    write::frontend_message(&mut frame, b'E', &body);
    BackendError::Refused { frame, message }
}

pub(super) async fn login(
    mut stream: Stream,
    params: &[(String, String)],
    user: &str,
    creds: &BackendCredentials,
) -> Result<BackendConn, BackendError> {
    send(&mut stream, &encode_startup(params)).await?;
    let mut key = CancelKey { pid: 0, secret: 0 };
    let mut server_params = Vec::new();
    loop {
        let (tag, mut body) = next(&mut stream).await?;
        match tag {
            b'R' => {
                if body.len() < 4 {
                    return Err(BackendError::Protocol("short authentication request".into()));
                }
                match body.get_i32() {
                    0 => {}
                    3 => {
                        let password = match creds {
                            BackendCredentials::Plain(p) => p.clone(),
                            _ => return Err(BackendError::Login(format!("the backend asks for the password of \"{user}\" in clear text, and only a hash of it is configured"))),
                        };
                        let mut out = BytesMut::new();
                        write::password_message(&mut out, &password);
                        send(&mut stream, &out).await?;
                    }
                    5 => {
                        let salt: [u8; 4] = body.get(..4).and_then(|s| s.try_into().ok()).ok_or_else(|| BackendError::Protocol("short md5 salt".into()))?;
                        let stored = match creds {
                            BackendCredentials::Plain(p) => md5::stored_hash(p, user),
                            BackendCredentials::Md5(h) => h.clone(),
                            _ => return Err(BackendError::Login(format!("the backend asks for an md5 password for \"{user}\", and none is configured"))),
                        };
                        let mut out = BytesMut::new();
                        write::password_message(&mut out, &md5::salted_response(&stored, &salt));
                        send(&mut stream, &out).await?;
                    }
                    10 => scram_exchange(&mut stream, body, user, creds).await?,
                    other => return Err(BackendError::Login(format!("the backend asks for an unsupported authentication method (code {other})"))),
                }
            }
            b'S' => {
                let mut b = body;
                let name = crate::protocol::read::take_cstr(&mut b);
                let value = crate::protocol::read::take_cstr(&mut b);
                if let (Some(n), Some(v)) = (name, value) {
                    server_params.push((n, v));
                }
            }
            b'K' => {
                if body.len() < 8 {
                    return Err(BackendError::Protocol("short BackendKeyData".into()));
                }
                key = CancelKey { pid: body.get_i32(), secret: body.get_i32() };
            }
            b'Z' => {
                let ready_status = body.first().copied().unwrap_or(b'I');
                return Ok(BackendConn { stream, key, params: server_params, ready_status, port: super::ports::PortGuard::none() });
            }
            b'E' => return Err(refused(body)),
            b'N' | b'v' => {}
            other => return Err(BackendError::Protocol(format!("unexpected message {other:#x} during login"))),
        }
    }
}

async fn scram_exchange(stream: &mut Stream, mut mechanisms: BytesMut, user: &str, creds: &BackendCredentials) -> Result<(), BackendError> {
    let mut offered = Vec::new();
    while let Some(m) = crate::protocol::read::take_cstr(&mut mechanisms) {
        if m.is_empty() {
            break;
        }
        offered.push(m);
    }
    let binding = match stream {
        Stream::ClientTls(tls) if offered.iter().any(|m| m == "SCRAM-SHA-256-PLUS") => {
            let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(crate::tls::server_end_point);
            match cert {
                Some(hash) => ChannelBinding::TlsServerEndPoint(hash),
                None => ChannelBinding::Unsupported,
            }
        }
        Stream::ClientTls(_) => ChannelBinding::Unsupported,
        _ => ChannelBinding::None,
    };
    if !offered.iter().any(|m| m.starts_with("SCRAM-SHA-256")) {
        return Err(BackendError::Login(format!("the backend offers no supported SASL mechanism ({offered:?})")));
    }
    let mut client = ScramClient::new(binding);
    let mut out = BytesMut::new();
    write::sasl_initial_response(&mut out, client.mechanism(), client.client_first().as_bytes());
    send(stream, &out).await?;

    let server_first = expect_sasl(stream, 11).await?;
    let params = client.handle_server_first(&server_first).map_err(|e| BackendError::Login(e.to_string()))?;
    let keys = keys_for(creds, user, &params).await?;
    let final_msg = client.client_final(&keys).map_err(|e| BackendError::Login(e.to_string()))?;
    out.clear();
    write::frontend_message(&mut out, b'p', final_msg.as_bytes());
    send(stream, &out).await?;

    let server_final = expect_sasl(stream, 12).await?;
    client.verify_server_final(&server_final).map_err(|e| BackendError::Login(e.to_string()))
}

/// Reads the next SASL step (`code` 11 continue, 12 final), or the backend's refusal.
async fn expect_sasl(stream: &mut Stream, code: i32) -> Result<BytesMut, BackendError> {
    let (tag, mut body) = next(stream).await?;
    match tag {
        b'R' if body.len() >= 4 && body.get_i32() == code => Ok(body),
        b'E' => Err(refused(body)),
        _ => Err(BackendError::Protocol("unexpected message during SASL authentication".into())),
    }
}

async fn keys_for(creds: &BackendCredentials, user: &str, params: &scram::ServerFirst) -> Result<ScramKeys, BackendError> {
    match creds {
        BackendCredentials::Scram(keys) if keys.salt == params.salt && keys.iterations == params.iterations => Ok((**keys).clone()),
        BackendCredentials::Scram(_) => Err(BackendError::Login(format!(
            "the backend's SCRAM secret for \"{user}\" has another salt or iteration count than the configured verifier"
        ))),
        BackendCredentials::Plain(password) => Ok(derive_cached(password, &params.salt, params.iterations).await),
        BackendCredentials::Md5(_) | BackendCredentials::None => Err(BackendError::Login(format!(
            "the backend asks for SCRAM authentication of \"{user}\", and no password or SCRAM verifier is configured"
        ))),
    }
}

type KeyCache = Mutex<HashMap<[u8; 32], Arc<ScramKeys>>>;

/// Key stretching costs milliseconds of CPU: it runs on the blocking pool, once per
/// (password, salt, iterations), so reconnects and prewarming cost no stretching.
async fn derive_cached(password: &str, salt: &[u8], iterations: u32) -> ScramKeys {
    static CACHE: OnceLock<KeyCache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut h = Sha256::new();
    h.update(password.as_bytes());
    h.update([0]);
    h.update(salt);
    h.update(iterations.to_be_bytes());
    let id: [u8; 32] = h.finalize().into();
    if let Some(k) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
        return (**k).clone();
    }
    let (pw, s) = (password.to_owned(), salt.to_vec());
    let keys = tokio::task::spawn_blocking(move || {
        let salted = scram::salted_password(&pw, &s, iterations);
        ScramKeys::from_salted_password(&salted, &s, iterations)
    })
    .await
    .unwrap_or_else(|_| {
        // The blocking pool only fails when the runtime shuts down; derive inline then.
        let salted = scram::salted_password(password, salt, iterations);
        ScramKeys::from_salted_password(&salted, salt, iterations)
    });
    cache.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Arc::new(keys.clone()));
    keys
}
