//! Credentials: what `[[auth.users]]` holds, and what the proxy presents to a backend.
//!
//! A user's secret serves both legs. The client leg checks the client against it; the
//! backend leg logs in with it. A SCRAM verifier is enough for the backend leg too:
//! after a successful SCRAM exchange the client's `ClientKey` is recovered from its
//! proof (as PgBouncer does) and replayed to a backend that stores the same verifier.

pub mod md5;
pub mod scram;

use std::collections::HashMap;
use std::sync::Arc;

pub use scram::{ScramKeys, ScramVerifier};

/// A configured password, in one of the forms PostgreSQL itself stores.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    Plain(String),
    /// `md5` followed by 32 hex digits: md5(password || user).
    Md5(String),
    Scram(ScramVerifier),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::Plain(_) => f.write_str("Secret::Plain(<redacted>)"),
            Secret::Md5(_) => f.write_str("Secret::Md5(<redacted>)"),
            Secret::Scram(_) => f.write_str("Secret::Scram(<redacted>)"),
        }
    }
}

impl Secret {
    pub fn parse(text: &str) -> Result<Secret, String> {
        if text.starts_with("SCRAM-SHA-256$") {
            return ScramVerifier::parse(text).map(Secret::Scram);
        }
        if text.len() == 35 && text.starts_with("md5") && text[3..].bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Secret::Md5(text.to_ascii_lowercase()));
        }
        Ok(Secret::Plain(text.to_owned()))
    }
}

/// What the proxy logs in to a backend with, on behalf of one client.
#[derive(Clone, Default)]
pub enum BackendCredentials {
    /// No password known: the backend must trust the user.
    #[default]
    None,
    Plain(String),
    Md5(String),
    /// Keys recovered from the client's SCRAM exchange (or derived from a plaintext
    /// password); usable against a backend whose verifier has the same salt.
    Scram(Arc<ScramKeys>),
}

/// The users table, built once per configuration load.
#[derive(Debug, Default)]
pub struct Users {
    users: HashMap<String, Arc<UserEntry>>,
}

#[derive(Debug)]
pub struct UserEntry {
    pub name: String,
    pub secret: Option<Secret>,
    /// For plaintext secrets: a SCRAM verifier derived once, so that a client login
    /// costs no key stretching.
    pub verifier: Option<ScramVerifier>,
    pub admin: bool,
}

impl Users {
    pub fn from_config(cfg: &crate::config::AuthConfig) -> Users {
        let users = cfg
            .users
            .iter()
            .map(|u| {
                let secret = u.password.as_deref().and_then(|p| Secret::parse(p).ok());
                let verifier = match &secret {
                    Some(Secret::Plain(p)) => Some(ScramVerifier::derive(p, &scram::random_salt(), scram::DEFAULT_ITERATIONS)),
                    Some(Secret::Scram(v)) => Some(v.clone()),
                    _ => None,
                };
                let entry = UserEntry { name: u.name.clone(), secret, verifier, admin: u.admin };
                (u.name.clone(), Arc::new(entry))
            })
            .collect();
        Users { users }
    }

    pub fn get(&self, name: &str) -> Option<Arc<UserEntry>> {
        self.users.get(name).cloned()
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn has_admin(&self) -> bool {
        self.users.values().any(|u| u.admin)
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

impl UserEntry {
    /// The credentials for the backend leg when the client leg proved nothing more.
    pub fn backend_credentials(&self) -> BackendCredentials {
        match &self.secret {
            Some(Secret::Plain(p)) => BackendCredentials::Plain(p.clone()),
            Some(Secret::Md5(h)) => BackendCredentials::Md5(h.clone()),
            Some(Secret::Scram(_)) | None => BackendCredentials::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_forms_are_recognised() {
        assert!(matches!(Secret::parse("hunter2").unwrap(), Secret::Plain(_)));
        assert!(matches!(
            Secret::parse("md5a3556571e93b0d20722ba62be61e8c2d").unwrap(),
            Secret::Md5(_)
        ));
        let v = "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$ZXhhbXBsZXN0b3JlZGtleWV4YW1wbGVzdG9yZWRrZXk=:ZXhhbXBsZXNlcnZlcmtleWV4YW1wbGVzZXJ2ZXJrZXk=";
        assert!(matches!(Secret::parse(v).unwrap(), Secret::Scram(_)));
        assert!(Secret::parse("SCRAM-SHA-256$oops").is_err());
    }
}
