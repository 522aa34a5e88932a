//! `proxy.toml`: the schema, its defaults and its validation.
//!
//! The file is read once at start and again on SIGHUP or `RELOAD`; a file that does
//! not validate is rejected whole and the running configuration stays.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::auth::Secret;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The cause is part of the message and not also the error's source: a chain
    // printed with `{:#}` would say it twice.
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{path}: {error}")]
    Parse { path: PathBuf, error: toml::de::Error },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    pub backends: BTreeMap<String, BackendConfig>,
    pub cutover: CutoverConfig,
    /// Several instances that cut over together, coordinated through etcd.
    pub fleet: Option<FleetConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// etcd's client endpoints, e.g. `["http://127.0.0.1:2379"]`.
    pub etcd: Vec<String>,
    /// This instance's name in the fleet, unique (default: the host name).
    pub name: Option<String>,
    /// Where the fleet's keys live in etcd.
    #[serde(default = "default_fleet_prefix")]
    pub prefix: String,
    /// How long an instance that stops answering stays a member (and how long a
    /// dead leader holds the cutover lock).
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Where the other members reach this one (cancel requests are forwarded to
    /// the instance that owns the key); default: `[proxy] listen`.
    pub advertise: Option<SocketAddr>,
    pub etcd_user: Option<String>,
    pub etcd_password: Option<String>,
    /// PEM file of the CA that signed etcd's certificate (for `https://` endpoints).
    pub etcd_ca: Option<PathBuf>,
}

impl FleetConfig {
    /// This instance's name: `name`, or the host name.
    pub fn member_name(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most buf.len() bytes into buf.
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        match (rc, std::str::from_utf8(&buf[..end])) {
            (0, Ok(h)) if !h.is_empty() => h.to_string(),
            _ => "pgcutover".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// TCP address for application traffic.
    pub listen: SocketAddr,
    /// Directory of the Unix socket `.s.PGSQL.<port>` (applications and the admin console).
    pub socket_dir: Option<PathBuf>,
    /// Address of the Prometheus endpoint (`/metrics`).
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default = "default_max_clients")]
    pub max_client_connections: usize,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    #[serde(default)]
    pub tls_mode: ClientTlsMode,
    /// A client must finish TLS, startup and authentication within this time.
    #[serde(default = "default_login_timeout", with = "humantime_serde")]
    pub client_login_timeout: Duration,
    /// Largest message accepted from either side; PostgreSQL's own limit is 1 GB.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: u32,
    /// SIGTERM/SIGINT: how long open sessions get to finish their transaction.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Event loops (threads) the client connections are spread over; default one
    /// per four cores (see `shards`). Read at start only.
    #[serde(default = "crate::shards::default_count")]
    pub threads: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientTlsMode {
    /// SSLRequest is declined; clients continue in plaintext.
    #[default]
    Disable,
    /// TLS when the client asks for it, plaintext otherwise.
    Allow,
    /// Plaintext TCP clients are refused with a FATAL error.
    Require,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    Md5,
    Trust,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub method: AuthMethod,
    #[serde(default)]
    pub users: Vec<UserConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Plaintext, `md5<32 hex>`, or a `SCRAM-SHA-256$<iter>:<salt>$<stored>:<server>` verifier.
    pub password: Option<String>,
    /// May use the admin console (database `pgcutover`) over TCP too.
    #[serde(default)]
    pub admin: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendTlsMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyFull,
}

impl BackendTlsMode {
    /// As written in proxy.toml, and as libpq's `sslmode` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendTlsMode::Disable => "disable",
            BackendTlsMode::Prefer => "prefer",
            BackendTlsMode::Require => "require",
            BackendTlsMode::VerifyFull => "verify-full",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Host name or IP address; a path starting with `/` is a Unix socket directory.
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    #[serde(default)]
    pub tls: BackendTlsMode,
    /// PEM file of CA certificates for `verify-full` (the system's roots otherwise).
    pub tls_ca: Option<PathBuf>,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The cutover's own connections (fence, catch-up, sequences, preflight) log in
    /// as this user: a superuser, or one with the privileges those steps need.
    #[serde(default = "default_admin_user")]
    pub admin_user: String,
    pub admin_password: Option<String>,
    /// This backend is a physical (streaming) standby of the named backend: a
    /// cutover to it is a switchover (catch-up by WAL replay, then a promotion).
    /// Without it, a target found in recovery is treated as one all the same.
    pub standby_of: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnDrainTimeout {
    /// Cancel what still runs; its client gets one retryable 40001 error.
    #[default]
    Cancel,
    /// Reopen the gate and give up.
    Abort,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CutoverConfig {
    pub active: String,
    pub target: Option<String>,
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    #[serde(default)]
    pub on_drain_timeout: OnDrainTimeout,
    #[serde(default = "default_catchup_timeout", with = "humantime_serde")]
    pub catchup_timeout: Duration,
    #[serde(default = "default_max_pause", with = "humantime_serde")]
    pub max_pause: Duration,
    #[serde(default)]
    pub sequence_margin: i64,
    #[serde(default = "default_true")]
    pub fence_source: bool,
    /// Databases to cut over besides those with sessions at the time.
    #[serde(default)]
    pub databases: Vec<String>,
    /// Where the active backend is recorded after a cutover (default: the config
    /// file's path with `.state` appended).
    pub state_file: Option<PathBuf>,
    /// Preflight refuses when the target lags the source by more than this (bytes).
    #[serde(default = "default_max_lag")]
    pub max_lag_bytes: u64,
    /// Subscriptions on the target that stream from somewhere other than the source,
    /// known and left alone (any other such subscription refuses the cutover).
    #[serde(default)]
    pub other_subscriptions: Vec<String>,
    /// Make the way back ready at each cutover: the old database subscribes to the
    /// new one through a slot created at the switch point, so every write made
    /// after the switch flows back and a cutover back loses nothing.
    #[serde(default)]
    pub reverse_replication: bool,
    /// How the source reaches the target for reverse replication, as a libpq
    /// connection string without dbname (default: the target's host, port, admin
    /// user and password as the proxy sees them).
    pub reverse_conninfo: Option<String>,
    /// Roles the fence covers besides those of the proxy's sessions and users:
    /// applications' roles that reach the source some other way (a batch job, a
    /// reporting tool). They lose LOGIN, their sessions are terminated and, where
    /// the admin cannot ALTER SYSTEM, they are made read-only role by role.
    #[serde(default)]
    pub fence_roles: Vec<String>,
}

fn default_max_clients() -> usize {
    1000
}
fn default_login_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_max_message_size() -> u32 {
    crate::protocol::frame::PG_MAX_MESSAGE_LEN
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_pg_port() -> u16 {
    5432
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_drain_timeout() -> Duration {
    Duration::from_millis(500)
}
fn default_catchup_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_max_pause() -> Duration {
    Duration::from_secs(10)
}
fn default_admin_user() -> String {
    "postgres".into()
}
fn default_max_lag() -> u64 {
    16 * 1024 * 1024
}
fn default_fleet_prefix() -> String {
    "/pgcutover".into()
}
fn default_lease_ttl() -> Duration {
    Duration::from_secs(5)
}
fn default_true() -> bool {
    true
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.to_owned(), error })?;
        let config: Config = toml::from_str(&text).map_err(|error| ConfigError::Parse { path: path.to_owned(), error })?;
        config.validate()?;
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|error| ConfigError::Parse { path: PathBuf::from("<string>"), error })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.backends.is_empty() {
            return invalid("at least one [backends.NAME] is needed".into());
        }
        if !self.backends.contains_key(&self.cutover.active) {
            return invalid(format!("[cutover] active = {:?} names no backend", self.cutover.active));
        }
        if let Some(target) = &self.cutover.target {
            if !self.backends.contains_key(target) {
                return invalid(format!("[cutover] target = {target:?} names no backend"));
            }
        }
        if self.proxy.tls_cert.is_some() != self.proxy.tls_key.is_some() {
            return invalid("tls_cert and tls_key go together".into());
        }
        if self.proxy.tls_mode != ClientTlsMode::Disable && self.proxy.tls_cert.is_none() {
            return invalid(format!("tls_mode = {:?} needs tls_cert and tls_key", self.proxy.tls_mode));
        }
        if self.proxy.threads == 0 || self.proxy.threads > 1024 {
            return invalid(format!("threads must be between 1 and 1024, not {}", self.proxy.threads));
        }
        if self.proxy.max_message_size < 1024 {
            return invalid("max_message_size must be at least 1024 bytes".into());
        }
        if self.proxy.max_client_connections == 0 {
            return invalid("max_client_connections must be at least 1".into());
        }
        if let Some(f) = &self.fleet {
            if f.etcd.is_empty() {
                return invalid("[fleet] etcd needs at least one endpoint".into());
            }
            let name = f.member_name();
            if name.is_empty() || name.starts_with('.') || name.contains(['/', ' ']) {
                return invalid(format!("[fleet] name {name:?}: use letters, digits, '-', '_' or '.', not starting with '.'"));
            }
            if !f.prefix.starts_with('/') || f.prefix.ends_with('/') {
                return invalid(format!("[fleet] prefix {:?} must start with '/' and not end with one", f.prefix));
            }
            if f.lease_ttl < Duration::from_secs(1) {
                return invalid("[fleet] lease_ttl must be at least 1s (etcd counts leases in seconds)".into());
            }
            if f.etcd_user.is_some() != f.etcd_password.is_some() {
                return invalid("[fleet] etcd_user and etcd_password go together".into());
            }
        }
        let mut seen = std::collections::HashSet::new();
        for user in &self.auth.users {
            if !seen.insert(user.name.as_str()) {
                return invalid(format!("user {:?} is listed twice", user.name));
            }
            if let Some(p) = &user.password {
                Secret::parse(p).map_err(|e| ConfigError::Invalid(format!("user {:?}: {e}", user.name)))?;
            } else if self.auth.method != AuthMethod::Trust {
                return invalid(format!("user {:?} needs a password", user.name));
            }
        }
        for (name, b) in &self.backends {
            if b.tls == BackendTlsMode::VerifyFull && b.host.starts_with('/') {
                return invalid(format!("backend {name}: verify-full needs a host name, not a socket directory"));
            }
            if let Some(primary) = &b.standby_of {
                if primary == name || !self.backends.contains_key(primary) {
                    return invalid(format!("backend {name}: standby_of = {primary:?} names no other backend"));
                }
            }
        }
        Ok(())
    }

    /// The Unix socket path, `<socket_dir>/.s.PGSQL.<port>`, for the given TCP port.
    pub fn socket_path(&self, port: u16) -> Option<PathBuf> {
        self.proxy
            .socket_dir
            .as_ref()
            .map(|dir| dir.join(format!(".s.PGSQL.{port}")))
    }

    pub fn backend(&self, name: &str) -> Option<&BackendConfig> {
        self.backends.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [proxy]
        listen = "127.0.0.1:6432"
        [auth]
        method = "scram-sha-256"
        [[auth.users]]
        name = "app"
        password = "secret"
        [backends.blue]
        host = "127.0.0.1"
        port = 5433
        [cutover]
        active = "blue"
    "#;

    #[test]
    fn minimal_file_gets_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.proxy.max_client_connections, 1000);
        assert_eq!(c.cutover.drain_timeout, Duration::from_millis(500));
        assert_eq!(c.backends["blue"].tls, BackendTlsMode::Prefer);
        assert!(c.cutover.fence_source);
    }

    #[test]
    fn active_must_name_a_backend() {
        let text = MINIMAL.replace("active = \"blue\"", "active = \"red\"");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("red"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let text = MINIMAL.replace("port = 5433", "port = 5433\nprot = 1");
        assert!(Config::parse(&text).is_err());
    }

    #[test]
    fn durations_are_human_readable() {
        let text = MINIMAL.replace("active = \"blue\"", "active = \"blue\"\ndrain_timeout = \"2s\"\nmax_pause = \"1m\"");
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.cutover.drain_timeout, Duration::from_secs(2));
        assert_eq!(c.cutover.max_pause, Duration::from_secs(60));
    }
}

#[cfg(test)]
mod example {
    /// The repository's proxy.toml is the documented, working example: it must load.
    #[test]
    fn the_example_proxy_toml_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
        let c = super::Config::load(&path).unwrap();
        assert_eq!(c.cutover.active, "blue");
        assert_eq!(c.cutover.target.as_deref(), Some("green"));
    }
}
