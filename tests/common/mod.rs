//! The shared test bed: one blue/green pair of real PostgreSQL clusters per test
//! binary (blue publishes, green subscribes), users for every backend auth method,
//! test certificates, an in-process proxy per test, and a raw protocol client for
//! the byte-level tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use pgcutover::cluster::{Cluster, ClusterOptions, Pair};
use pgcutover::config::Config;
use pgcutover::server::ProxyHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub mod cut;
mod served;
#[allow(unused_imports)]
pub use served::Served;

pub const PASSWORD: &str = "secret";

pub struct Certs {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub dir: PathBuf,
}

impl Certs {
    pub fn generate() -> Certs {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "pgcutover test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        Certs { ca_pem: ca.pem(), cert_pem: cert.pem(), key_pem: key.serialize_pem(), dir: PathBuf::new() }
    }

    /// Writes the files into `dir` (a cluster's directory, removed with it).
    pub fn write_to(&mut self, dir: &std::path::Path) {
        self.dir = dir.join("test-certs");
        std::fs::create_dir_all(&self.dir).unwrap();
        std::fs::write(self.ca_path(), &self.ca_pem).unwrap();
        std::fs::write(self.cert_path(), &self.cert_pem).unwrap();
        std::fs::write(self.key_path(), &self.key_pem).unwrap();
    }
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("server.key")
    }
}

pub struct Fixture {
    pub pair: Pair,
    pub certs: Certs,
    /// blue's stored SCRAM verifier of `verifier_user`.
    pub verifier: String,
}

/// Roles on both clusters, one per backend authentication method.
const ROLES: &str = "
    CREATE ROLE app LOGIN PASSWORD 'secret' CREATEDB;
    CREATE ROLE verifier_user LOGIN PASSWORD 'secret';
    CREATE ROLE pwuser LOGIN PASSWORD 'pwpass';
    CREATE ROLE trustuser LOGIN;
    CREATE ROLE limited LOGIN PASSWORD 'secret' CONNECTION LIMIT 1;
    SET password_encryption = 'md5';
    CREATE ROLE md5user LOGIN PASSWORD 'md5pass';
";

pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    // Set up on a thread of its own: the tests call this from inside their runtime.
    FIXTURE.get_or_init(|| std::thread::spawn(setup).join().expect("fixture setup"))
}

fn setup() -> Fixture {
    {
        let _ = tracing_subscriber::fmt().with_env_filter(std::env::var("PGCUTOVER_LOG").unwrap_or_else(|_| "warn".into())).with_test_writer().try_init();
        let mut certs = Certs::generate();
        let options = ClusterOptions {
            hba: vec![
                "host all md5user 127.0.0.1/32 md5".into(),
                "host all pwuser 127.0.0.1/32 password".into(),
                "host all trustuser 127.0.0.1/32 trust".into(),
            ],
            tls: Some((certs.cert_pem.clone(), certs.key_pem.clone())),
            // Two-phase transactions on the source must refuse a cutover.
            settings: vec!["max_prepared_transactions = 4".into()],
            ..Default::default()
        };
        let pair = Pair::start(&options).expect("start the blue/green clusters");
        certs.write_to(pair.blue.socket_dir());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let verifier = rt.block_on(async {
            for c in [&pair.blue, &pair.green] {
                c.execute("postgres", ROLES).await.expect("create roles");
            }
            // The same verifier on both sides, as after a dump of roles.
            let blue = pair.blue.connect("postgres").await.unwrap();
            let v: String = blue.query_one("SELECT rolpassword FROM pg_authid WHERE rolname = 'verifier_user'", &[]).await.unwrap().get(0);
            pair.green.execute("postgres", &format!("ALTER ROLE verifier_user PASSWORD '{v}'")).await.unwrap();
            v
        });
        Fixture { pair, certs, verifier }
    }
}

impl Fixture {
    pub fn blue(&self) -> &Cluster {
        &self.pair.blue
    }
    pub fn green(&self) -> &Cluster {
        &self.pair.green
    }

    /// A fresh database on blue, owned by `app`, for one test.
    pub async fn database(&self, name: &str) -> String {
        let blue = self.blue().connect("postgres").await.unwrap();
        blue.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await.unwrap();
        blue.batch_execute(&format!("CREATE DATABASE \"{name}\" OWNER app")).await.unwrap();
        name.to_string()
    }

    /// A proxy config in front of blue (active) and green, users for every method.
    pub fn config(&self, socket_dir: &std::path::Path) -> Config {
        Config::parse(&self.config_text(socket_dir, "127.0.0.1:0")).unwrap()
    }

    /// The same configuration as a proxy.toml text.
    pub fn config_text(&self, socket_dir: &std::path::Path, listen: &str) -> String {
        format!(
            r#"
            [proxy]
            listen = "{listen}"
            socket_dir = "{socket_dir}"
            client_login_timeout = "5s"
            [auth]
            method = "scram-sha-256"
            [[auth.users]]
            name = "app"
            password = "secret"
            [[auth.users]]
            name = "verifier_user"
            password = "{verifier}"
            [[auth.users]]
            name = "md5user"
            password = "md5pass"
            [[auth.users]]
            name = "pwuser"
            password = "pwpass"
            [[auth.users]]
            name = "trustuser"
            password = "anything"
            [[auth.users]]
            name = "limited"
            password = "secret"
            [backends.blue]
            host = "127.0.0.1"
            port = {blue}
            tls = "disable"
            [backends.green]
            host = "127.0.0.1"
            port = {green}
            tls = "disable"
            [cutover]
            active = "blue"
            target = "green"
            # Room for a transaction on a busy machine: tests of the drain's
            # deadline set their own.
            drain_timeout = "10s"
            "#,
            socket_dir = socket_dir.display(),
            verifier = self.verifier,
            blue = self.blue().port,
            green = self.green().port,
        )
    }

    /// Starts a proxy with the base config, after `edit`.
    pub async fn proxy(&self, edit: impl FnOnce(&mut Config)) -> TestProxy {
        let dir = tempfile::Builder::new().prefix("pgcutover-proxy-").tempdir().unwrap();
        let mut config = self.config(&dir.path().join("sock"));
        edit(&mut config);
        config.validate().unwrap();
        let handle = pgcutover::server::start(config).await.unwrap();
        TestProxy { handle, _dir: dir }
    }
}

/// Starts a proxy from a configuration text written for its socket directory.
pub async fn proxy_from(text: impl FnOnce(&std::path::Path) -> String) -> TestProxy {
    let dir = tempfile::Builder::new().prefix("pgcutover-proxy-").tempdir().unwrap();
    let config = Config::parse(&text(&dir.path().join("sock"))).unwrap();
    config.validate().unwrap();
    let handle = pgcutover::server::start(config).await.unwrap();
    TestProxy { handle, _dir: dir }
}

pub struct TestProxy {
    pub handle: ProxyHandle,
    _dir: tempfile::TempDir,
}

impl TestProxy {
    pub fn proxy(&self) -> &std::sync::Arc<pgcutover::server::Proxy> {
        &self.handle.proxy
    }

    /// Runs an admin console command in process.
    pub async fn admin(&self, command: &str) -> Result<Vec<Vec<Option<String>>>, pgcutover::protocol::PgError> {
        pgcutover::admin::execute(self.proxy(), command).await.map(|rs| rs.rows())
    }

    pub fn port(&self) -> u16 {
        self.handle.tcp_addr.port()
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.handle.socket_path.as_ref().unwrap().parent().unwrap().to_path_buf()
    }

    pub fn conninfo(&self, user: &str, password: &str, db: &str) -> String {
        format!("host=127.0.0.1 port={} user={user} password='{password}' dbname={db} sslmode=disable", self.port())
    }

    pub async fn connect_as(&self, user: &str, password: &str, db: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(&self.conninfo(user, password, db), tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    pub async fn connect(&self, db: &str) -> tokio_postgres::Client {
        self.connect_as("app", PASSWORD, db).await.unwrap()
    }

    /// Runs `psql` against the proxy; returns (success, stdout, stderr).
    pub async fn psql(&self, conninfo_extra: &str, args: &[&str]) -> (bool, String, String) {
        let conninfo = format!("host=127.0.0.1 port={} {conninfo_extra}", self.port());
        psql(&conninfo, args).await
    }
}

/// Runs psql without blocking the test's runtime (the proxy under test runs on it).
pub async fn psql(conninfo: &str, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(pg_program("psql")).arg("-X").arg("-v").arg("ON_ERROR_STOP=1").arg(conninfo).args(args).env("PGCONNECT_TIMEOUT", "10").output().await.expect("run psql");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A PostgreSQL client program (psql, pgbench) from the installed server's bin dir.
pub fn pg_program(name: &str) -> PathBuf {
    pgcutover::cluster::bin_dir().map(|d| d.join(name)).filter(|p| p.exists()).unwrap_or_else(|| name.into())
}

/// The SQLSTATE of a tokio-postgres error.
pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map(|d| d.code().code().to_string()).unwrap_or_else(|| format!("not a db error: {e}"))
}

/// A bare protocol client: for the byte-level tests no driver would let us write.
pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
}

pub struct RawMessage {
    pub tag: u8,
    pub body: BytesMut,
}

impl RawMessage {
    /// The SQLSTATE of an ErrorResponse.
    pub fn sqlstate(&self) -> Option<String> {
        pgcutover::protocol::read::parse_fields(&self.body).into_iter().find(|(c, _)| *c == b'C').map(|(_, v)| v)
    }
    pub fn message(&self) -> Option<String> {
        pgcutover::protocol::read::parse_fields(&self.body).into_iter().find(|(c, _)| *c == b'M').map(|(_, v)| v)
    }
}

impl Raw {
    pub async fn connect(port: u16) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        Raw { stream, buf: BytesMut::new() }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    pub async fn send_message(&mut self, tag: u8, body: &[u8]) {
        let mut b = BytesMut::new();
        b.put_u8(tag);
        b.put_u32(body.len() as u32 + 4);
        b.put_slice(body);
        self.send(&b).await;
    }

    pub async fn query(&mut self, sql: &str) {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        self.send_message(b'Q', &body).await;
    }

    /// A whole message from what was read, if one is there.
    fn take_message(&mut self) -> Option<RawMessage> {
        if self.buf.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if self.buf.len() <= len {
            return None;
        }
        let tag = self.buf[0];
        self.buf.advance(5);
        let body = self.buf.split_to(len - 4);
        Some(RawMessage { tag, body })
    }

    /// Reads one typed message; `None` when the connection is closed (or 10 s pass).
    pub async fn recv(&mut self) -> Option<RawMessage> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(m) = self.take_message() {
                    return Some(m);
                }
                if self.stream.read_buf(&mut self.buf).await.ok()? == 0 {
                    return None;
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// Reads every message up to the peer's close; `None` if it has not closed
    /// within `secs` seconds.
    pub async fn until_closed(&mut self, secs: u64) -> Option<Vec<RawMessage>> {
        tokio::time::timeout(Duration::from_secs(secs), async {
            let mut out = Vec::new();
            loop {
                if let Some(m) = self.take_message() {
                    out.push(m);
                    continue;
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return out,
                    Ok(_) => {}
                }
            }
        })
        .await
        .ok()
    }

    /// Reads whatever bytes come up to the peer's close (`None`: not closed
    /// within `secs` seconds).
    pub async fn bytes_until_closed(&mut self, secs: u64) -> Option<Vec<u8>> {
        tokio::time::timeout(Duration::from_secs(secs), async {
            let mut out = self.buf.split().to_vec();
            let mut chunk = [0u8; 4096];
            loop {
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return out,
                    Ok(n) => out.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .ok()
    }

    /// Reads one raw byte (the answer to SSLRequest / GSSENCRequest).
    pub async fn recv_byte(&mut self) -> u8 {
        self.stream.read_u8().await.unwrap()
    }

    /// Reads messages up to and including the next ReadyForQuery.
    pub async fn until_ready(&mut self) -> Vec<RawMessage> {
        let mut out = Vec::new();
        while let Some(m) = self.recv().await {
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                break;
            }
        }
        out
    }

    /// True once the peer has closed the connection.
    pub async fn closed(&mut self) -> bool {
        loop {
            match self.recv().await {
                None => return true,
                Some(_) => continue,
            }
        }
    }

    pub async fn startup(&mut self, params: &[(&str, &str)]) {
        let params: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let packet = pgcutover::protocol::startup::encode_startup(&params);
        self.send(&packet).await;
    }
}

/// Polls `f` until it returns true, for at most `secs` seconds.
pub async fn eventually<F, Fut>(secs: u64, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
