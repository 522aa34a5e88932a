//! SCRAM-SHA-256 key material (RFC 5802, RFC 7677) and the backend leg's client side.
//!
//! The client leg's server side is pgwire's `ScramServerAuth`; this file adds what it
//! does not offer: PostgreSQL verifier parsing, recovery of the client's `ClientKey`
//! for pass-through, and a client that logs in from keys rather than a password.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const DEFAULT_ITERATIONS: u32 = 4096;
const KEY_LEN: usize = 32;

type Key = [u8; KEY_LEN];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("server nonce does not extend the client nonce")]
    NonceMismatch,
    #[error("server signature does not match: the server does not know this password")]
    BadServerSignature,
    #[error("the backend's SCRAM salt or iteration count differs from the configured verifier")]
    VerifierMismatch,
    #[error("the server reported a SCRAM error: {0}")]
    ServerError(String),
}

fn hmac(key: &[u8], msg: &[u8]) -> Key {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail here.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> Key {
    Sha256::digest(data).into()
}

fn xor(a: &Key, b: &Key) -> Key {
    let mut out = [0u8; KEY_LEN];
    for i in 0..KEY_LEN {
        out[i] = a[i] ^ b[i];
    }
    out
}

fn key_from(bytes: &[u8]) -> Option<Key> {
    bytes.try_into().ok()
}

pub fn random_salt() -> Vec<u8> {
    let mut salt = vec![0u8; 16];
    rand::thread_rng().fill_bytes(&mut salt);
    salt
}

fn random_nonce() -> String {
    let mut raw = [0u8; 18];
    rand::thread_rng().fill_bytes(&mut raw);
    B64.encode(raw)
}

/// `Hi(Normalize(password), salt, i)`. PostgreSQL applies SASLprep and falls back to
/// the raw bytes when the password is not valid for it; so do we.
pub fn salted_password(password: &str, salt: &[u8], iterations: u32) -> Key {
    let prepared = stringprep::saslprep(password).map(|c| c.into_owned()).unwrap_or_else(|_| password.to_owned());
    let mut out = [0u8; KEY_LEN];
    pbkdf2::pbkdf2_hmac::<Sha256>(prepared.as_bytes(), salt, iterations, &mut out);
    out
}

/// A PostgreSQL SCRAM verifier: `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Key,
    pub server_key: Key,
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ScramVerifier {{ iterations: {}, .. }}", self.iterations)
    }
}

impl ScramVerifier {
    pub fn parse(text: &str) -> Result<ScramVerifier, String> {
        let bad = || "not a SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey> verifier".to_string();
        let rest = text.strip_prefix("SCRAM-SHA-256$").ok_or_else(bad)?;
        let (params, keys) = rest.split_once('$').ok_or_else(bad)?;
        let (iter, salt) = params.split_once(':').ok_or_else(bad)?;
        let (stored, server) = keys.split_once(':').ok_or_else(bad)?;
        let iterations: u32 = iter.parse().map_err(|_| bad())?;
        if iterations == 0 {
            return Err(bad());
        }
        let salt = B64.decode(salt).map_err(|_| bad())?;
        let stored_key = B64.decode(stored).ok().and_then(|k| key_from(&k)).ok_or_else(bad)?;
        let server_key = B64.decode(server).ok().and_then(|k| key_from(&k)).ok_or_else(bad)?;
        Ok(ScramVerifier { iterations, salt, stored_key, server_key })
    }

    pub fn derive(password: &str, salt: &[u8], iterations: u32) -> ScramVerifier {
        ScramKeys::from_salted_password(&salted_password(password, salt, iterations), salt, iterations).verifier()
    }

    /// A verifier for a user that does not exist: stable for a given name (so that
    /// repeated probes see the same salt), matching no password.
    pub fn mock(user: &str, server_secret: &[u8]) -> ScramVerifier {
        let salt = hmac(server_secret, user.as_bytes())[..16].to_vec();
        let stored_key = hmac(server_secret, b"mock stored key");
        let server_key = hmac(server_secret, b"mock server key");
        ScramVerifier { iterations: DEFAULT_ITERATIONS, salt, stored_key, server_key }
    }

    pub fn to_pgwire(&self) -> pgwire::api::auth::sasl::scram::ScramSecret {
        pgwire::api::auth::sasl::scram::ScramSecret::Verifier {
            salt: self.salt.clone(),
            iterations: self.iterations as usize,
            stored_key: self.stored_key.to_vec(),
            server_key: self.server_key.to_vec(),
        }
    }

    /// Recovers `ClientKey` from a verified exchange: `ClientKey = ClientProof XOR
    /// HMAC(StoredKey, AuthMessage)`, checked against `StoredKey`. The arguments are
    /// the three messages as they crossed the wire.
    pub fn recover_keys(&self, client_first: &str, server_first: &str, client_final: &str) -> Option<ScramKeys> {
        // client-first = gs2-header client-first-bare, where gs2-header = flag "," [authzid] ","
        let mut parts = client_first.splitn(3, ',');
        let (_flag, _authzid, bare) = (parts.next()?, parts.next()?, parts.next()?);
        let (without_proof, proof) = client_final.rsplit_once(",p=")?;
        let proof = key_from(&B64.decode(proof).ok()?)?;
        let auth_message = format!("{bare},{server_first},{without_proof}");
        let client_key = xor(&proof, &hmac(&self.stored_key, auth_message.as_bytes()));
        if !bool::from(sha256(&client_key).ct_eq(&self.stored_key)) {
            return None;
        }
        Some(ScramKeys {
            salt: self.salt.clone(),
            iterations: self.iterations,
            client_key,
            server_key: self.server_key,
        })
    }

    pub fn to_text(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

/// What a SCRAM client needs to log in: enough to prove, and to check the server.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub client_key: Key,
    pub server_key: Key,
}

impl ScramKeys {
    pub fn from_salted_password(salted: &Key, salt: &[u8], iterations: u32) -> ScramKeys {
        ScramKeys {
            salt: salt.to_vec(),
            iterations,
            client_key: hmac(salted, b"Client Key"),
            server_key: hmac(salted, b"Server Key"),
        }
    }

    pub fn verifier(&self) -> ScramVerifier {
        ScramVerifier {
            iterations: self.iterations,
            salt: self.salt.clone(),
            stored_key: sha256(&self.client_key),
            server_key: self.server_key,
        }
    }
}

/// How the client side binds SCRAM to the TLS channel.
#[derive(Debug, Clone)]
pub enum ChannelBinding {
    /// No TLS: gs2 flag `n`.
    None,
    /// TLS, but the server did not offer -PLUS: gs2 flag `y`.
    Unsupported,
    /// `tls-server-end-point` with the hash of the server's certificate.
    TlsServerEndPoint(Vec<u8>),
}

/// The parameters a server-first message carries.
#[derive(Debug)]
pub struct ServerFirst {
    pub salt: Vec<u8>,
    pub iterations: u32,
}

/// The client side of one SCRAM exchange.
pub struct ScramClient {
    gs2_header: String,
    cbind_data: Vec<u8>,
    nonce: String,
    client_first_bare: String,
    server_first: Option<(String, String)>, // (message, combined nonce)
    expected_server_signature: Option<Key>,
}

impl ScramClient {
    pub fn new(binding: ChannelBinding) -> ScramClient {
        let (gs2_header, cbind_data) = match binding {
            ChannelBinding::None => ("n,,".to_string(), Vec::new()),
            ChannelBinding::Unsupported => ("y,,".to_string(), Vec::new()),
            ChannelBinding::TlsServerEndPoint(hash) => ("p=tls-server-end-point,,".to_string(), hash),
        };
        let nonce = random_nonce();
        // PostgreSQL takes the user name from the startup packet and ignores this one.
        let client_first_bare = format!("n=,r={nonce}");
        ScramClient {
            gs2_header,
            cbind_data,
            nonce,
            client_first_bare,
            server_first: None,
            expected_server_signature: None,
        }
    }

    pub fn mechanism(&self) -> &'static str {
        if self.gs2_header.starts_with("p=") {
            "SCRAM-SHA-256-PLUS"
        } else {
            "SCRAM-SHA-256"
        }
    }

    pub fn client_first(&self) -> String {
        format!("{}{}", self.gs2_header, self.client_first_bare)
    }

    pub fn handle_server_first(&mut self, message: &[u8]) -> Result<ServerFirst, ScramError> {
        let text = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("server-first is not UTF-8"))?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for attr in text.split(',') {
            match attr.split_at_checked(2) {
                Some(("r=", v)) => nonce = Some(v),
                Some(("s=", v)) => salt = Some(B64.decode(v).map_err(|_| ScramError::Malformed("salt is not base64"))?),
                Some(("i=", v)) => iterations = Some(v.parse::<u32>().map_err(|_| ScramError::Malformed("bad iteration count"))?),
                Some(("e=", v)) => return Err(ScramError::ServerError(v.to_owned())),
                _ => {}
            }
        }
        let nonce = nonce.ok_or(ScramError::Malformed("server-first without nonce"))?;
        let salt = salt.ok_or(ScramError::Malformed("server-first without salt"))?;
        let iterations = iterations.filter(|i| *i > 0).ok_or(ScramError::Malformed("server-first without iterations"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::NonceMismatch);
        }
        self.server_first = Some((text.to_owned(), nonce.to_owned()));
        Ok(ServerFirst { salt, iterations })
    }

    /// The client-final message, proving knowledge of `keys`.
    pub fn client_final(&mut self, keys: &ScramKeys) -> Result<String, ScramError> {
        let (server_first, nonce) = self.server_first.as_ref().ok_or(ScramError::Malformed("client-final before server-first"))?;
        let mut cbind_input = self.gs2_header.as_bytes().to_vec();
        cbind_input.extend_from_slice(&self.cbind_data);
        let without_proof = format!("c={},r={}", B64.encode(&cbind_input), nonce);
        let auth_message = format!("{},{},{}", self.client_first_bare, server_first, without_proof);
        let stored_key = sha256(&keys.client_key);
        let proof = xor(&keys.client_key, &hmac(&stored_key, auth_message.as_bytes()));
        self.expected_server_signature = Some(hmac(&keys.server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    pub fn verify_server_final(&self, message: &[u8]) -> Result<(), ScramError> {
        let text = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("server-final is not UTF-8"))?;
        if let Some(e) = text.strip_prefix("e=") {
            return Err(ScramError::ServerError(e.to_owned()));
        }
        let sig = text
            .split(',')
            .find_map(|a| a.strip_prefix("v="))
            .ok_or(ScramError::Malformed("server-final without verifier"))?;
        let sig = B64.decode(sig).map_err(|_| ScramError::Malformed("server signature is not base64"))?;
        let expected = self.expected_server_signature.ok_or(ScramError::Malformed("server-final before client-final"))?;
        if bool::from(sig.as_slice().ct_eq(&expected)) {
            Ok(())
        } else {
            Err(ScramError::BadServerSignature)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7677 section 3: user "user", password "pencil".
    const SALT_B64: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
    const CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &str = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";

    fn rfc_keys() -> ScramKeys {
        let salt = B64.decode(SALT_B64).unwrap();
        ScramKeys::from_salted_password(&salted_password("pencil", &salt, 4096), &salt, 4096)
    }

    #[test]
    fn client_key_is_recovered_from_the_rfc_exchange() {
        let keys = rfc_keys();
        let recovered = keys.verifier().recover_keys(CLIENT_FIRST, SERVER_FIRST, CLIENT_FINAL).unwrap();
        assert!(recovered == keys);
    }

    #[test]
    fn a_wrong_proof_recovers_nothing() {
        let keys = ScramKeys::from_salted_password(&salted_password("pencil2", &[1; 16], 4096), &[1; 16], 4096);
        assert!(keys.verifier().recover_keys(CLIENT_FIRST, SERVER_FIRST, CLIENT_FINAL).is_none());
    }

    #[test]
    fn client_produces_the_rfc_proof() {
        let mut client = ScramClient::new(ChannelBinding::None);
        // Replay the RFC's nonce and bare message.
        client.nonce = "rOprNGfwEbeRWgbNEkqO".into();
        client.client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO".into();
        let first = client.handle_server_first(SERVER_FIRST.as_bytes()).unwrap();
        assert_eq!(first.iterations, 4096);
        assert_eq!(client.client_final(&rfc_keys()).unwrap(), CLIENT_FINAL);
        client.verify_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=").unwrap();
        assert_eq!(client.verify_server_final(b"v=AAAA"), Err(ScramError::BadServerSignature));
    }

    #[test]
    fn verifier_round_trips_through_text() {
        let v = ScramVerifier::derive("secret", b"0123456789abcdef", 4096);
        assert!(ScramVerifier::parse(&v.to_text()).unwrap() == v);
    }

    #[test]
    fn short_nonce_from_server_is_refused() {
        let mut client = ScramClient::new(ChannelBinding::None);
        let msg = format!("r={},s=AAAA,i=4096", client.nonce);
        assert_eq!(client.handle_server_first(msg.as_bytes()).unwrap_err(), ScramError::NonceMismatch);
    }
}
