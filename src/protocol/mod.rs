//! The PostgreSQL v3 wire protocol, as far as a relay needs it.
//!
//! `frame` walks typed messages without decoding them; `startup` parses the untyped
//! packets that open a connection; `write` builds the few messages the proxy itself
//! sends; `read` reads whole small messages during handshakes.

pub mod frame;
pub mod read;
pub mod startup;
pub mod write;

/// An error the client sees: SQLSTATE and a message that leaks nothing internal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

impl PgError {
    pub fn fatal(code: &'static str, message: impl Into<String>) -> PgError {
        PgError { severity: Severity::Fatal, code, message: message.into(), detail: None }
    }

    pub fn error(code: &'static str, message: impl Into<String>) -> PgError {
        PgError { severity: Severity::Error, code, message: message.into(), detail: None }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> PgError {
        self.detail = Some(detail.into());
        self
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity.as_str(), self.code, self.message)
    }
}

/// SQLSTATE codes the proxy uses.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    pub const SERIALIZATION_FAILURE: &str = "40001";
    pub const QUERY_CANCELED: &str = "57014";
    pub const SYNTAX_ERROR: &str = "42601";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
    pub const INTERNAL_ERROR: &str = "XX000";
}
