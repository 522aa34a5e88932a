//! Throwaway local PostgreSQL clusters for the tests, the benchmarks and the demo.
//!
//! Each cluster lives in its own temporary directory on a free port, started with the
//! installed `initdb`/`pg_ctl` (as the `postgres` OS user when running as root). A
//! small watchdog process stops the server and removes the directory when the
//! process that started it exits, however it exits: statics shared between tests are
//! never dropped, and a demo may be interrupted.

use std::ffi::CString;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// Where the PostgreSQL server programs are: the newest `/usr/lib/postgresql/N/bin`,
/// or the directory `pg_config --bindir` names, or `$PATH`.
pub fn bin_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("PGCUTOVER_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p)| p.join("initdb").exists())
        .collect();
    versions.sort();
    if let Some((_, p)) = versions.pop() {
        return Some(p);
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    dir.join("initdb").exists().then_some(dir)
}

/// A port nobody listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn postgres_ids() -> anyhow::Result<(u32, u32)> {
    let name = CString::new("postgres")?;
    // SAFETY: getpwnam reads a static record; we copy the two fields out at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        bail!("running as root needs a `postgres` OS user to run the server as");
    }
    // SAFETY: pw is non-null and points to a valid passwd record.
    Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// Settings for a new cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Extra `postgresql.conf` lines.
    pub settings: Vec<String>,
    /// `pg_hba.conf` lines placed before the defaults (which trust the `postgres`
    /// superuser, including for replication, and ask everyone else for SCRAM).
    pub hba: Vec<String>,
    /// PEM certificate and key: the server then accepts TLS.
    pub tls: Option<(String, String)>,
    /// The server programs to use (default: [`bin_dir`]); see [`major_bin_dir`].
    pub bin: Option<PathBuf>,
    /// As a managed service: TCP connections only over TLS (`hostssl` lines, as
    /// RDS's `rds.force_ssl = 1`), with SCRAM passwords for everyone. The Unix
    /// socket keeps trusting the superuser (the fixture's own, the provider's).
    pub hostssl_only: bool,
}

/// Where scripts/prereqs puts the server builds of each major version.
pub const MAJOR_BIN_ROOT: &str = "/opt/pgcutover/pg";

/// The server programs of PostgreSQL `major` (12..18) that scripts/prereqs
/// installs under [`MAJOR_BIN_ROOT`].
pub fn major_bin_dir(major: u32) -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(MAJOR_BIN_ROOT).join(major.to_string()).join("bin");
    if dir.join("initdb").exists() {
        Ok(dir)
    } else {
        bail!("PostgreSQL {major}'s server programs are not in {}: run scripts/prereqs --for-tests", dir.display())
    }
}

pub struct Cluster {
    pub name: String,
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    watchdog: Option<std::process::Child>,
}

impl Cluster {
    pub fn start(name: &str, options: &ClusterOptions) -> anyhow::Result<Cluster> {
        let bin = match &options.bin {
            Some(b) => b.clone(),
            None => bin_dir().context("PostgreSQL server programs (initdb, pg_ctl) not found; install postgresql")?,
        };
        let dir = tempfile::Builder::new().prefix(&format!("pgcutover-{name}-")).tempdir()?.keep();
        let ids = if is_root() { Some(postgres_ids()?) } else { None };
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        }
        let port = free_port()?;
        let mut cluster = Cluster { name: name.to_owned(), port, dir, bin, watchdog: None };
        cluster.spawn_watchdog()?;
        cluster.run("initdb", &["-D", &cluster.data().to_string_lossy(), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])?;

        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("port = {port}"),
            format!("unix_socket_directories = '{}'", cluster.dir.display()),
            "wal_level = logical".into(),
            "max_wal_senders = 20".into(),
            "max_replication_slots = 20".into(),
            "max_logical_replication_workers = 16".into(),
            "max_worker_processes = 24".into(),
            "max_connections = 300".into(),
            "fsync = off".into(),
            "full_page_writes = off".into(),
            "password_encryption = 'scram-sha-256'".into(),
        ];
        if let Some((cert, key)) = &options.tls {
            let (cert_path, key_path) = (cluster.dir.join("server.crt"), cluster.dir.join("server.key"));
            std::fs::write(&cert_path, cert)?;
            std::fs::write(&key_path, key)?;
            std::fs::set_permissions(&key_path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            if let Some((uid, gid)) = ids {
                std::os::unix::fs::chown(&cert_path, Some(uid), Some(gid))?;
                std::os::unix::fs::chown(&key_path, Some(uid), Some(gid))?;
            }
            conf.push("ssl = on".into());
            conf.push(format!("ssl_cert_file = '{}'", cert_path.display()));
            conf.push(format!("ssl_key_file = '{}'", key_path.display()));
        }
        conf.extend(options.settings.iter().cloned());
        let conf_path = cluster.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path)?;
        text.push_str("\n# pgcutover test cluster\n");
        text.push_str(&conf.join("\n"));
        text.push('\n');
        std::fs::write(&conf_path, text)?;

        let mut hba: Vec<String> = if options.hostssl_only {
            vec!["local all all trust".into(), "local replication all trust".into()]
        } else {
            vec!["local all all trust".into(), "host all postgres 127.0.0.1/32 trust".into(), "host replication postgres 127.0.0.1/32 trust".into()]
        };
        hba.extend(options.hba.iter().cloned());
        if options.hostssl_only {
            hba.push("hostssl all all 127.0.0.1/32 scram-sha-256".into());
            hba.push("hostssl replication all 127.0.0.1/32 scram-sha-256".into());
        } else {
            hba.push("host all all 127.0.0.1/32 scram-sha-256".into());
            hba.push("hostssl all all 127.0.0.1/32 scram-sha-256".into());
        }
        std::fs::write(cluster.data().join("pg_hba.conf"), hba.join("\n") + "\n")?;

        let log = cluster.dir.join("server.log");
        cluster.run("pg_ctl", &["-D", &cluster.data().to_string_lossy(), "-l", &log.to_string_lossy(), "-w", "-t", "60", "start"])?;
        Ok(cluster)
    }

    /// A streaming standby of `primary` in a directory of its own, on a free port:
    /// `pg_basebackup -R -c fast` (a spread checkpoint would take minutes).
    pub fn start_standby(name: &str, primary: &Cluster) -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new().prefix(&format!("pgcutover-{name}-")).tempdir()?.keep();
        let ids = if is_root() { Some(postgres_ids()?) } else { None };
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        }
        let port = free_port()?;
        let mut cluster = Cluster { name: name.to_owned(), port, dir, bin: primary.bin.clone(), watchdog: None };
        cluster.spawn_watchdog()?;
        let data = cluster.data().to_string_lossy().into_owned();
        let primary_port = primary.port.to_string();
        cluster.run("pg_basebackup", &["-D", &data, "-R", "-c", "fast", "-h", "127.0.0.1", "-p", &primary_port, "-U", "postgres"])?;
        cluster.own_address()?;
        cluster.restart()?;
        Ok(cluster)
    }

    /// Makes this stopped former primary a standby of `primary` (`pg_rewind -R`),
    /// keeping its own port, and starts it.
    pub fn rewind_from(&self, primary: &Cluster) -> anyhow::Result<()> {
        self.stop();
        let source = format!("host=127.0.0.1 port={} user=postgres dbname=postgres", primary.port);
        self.run("pg_rewind", &["-D", &self.data().to_string_lossy(), "--source-server", &source, "-R"])?;
        self.own_address()?;
        self.restart()
    }

    /// This cluster's port and socket directory, after configuration files copied
    /// from another cluster (the last setting in postgresql.conf wins).
    fn own_address(&self) -> anyhow::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(self.data().join("postgresql.conf"))?;
        writeln!(f, "\nport = {}\nunix_socket_directories = '{}'", self.port, self.dir.display())?;
        Ok(())
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The data directory (postgresql.conf, postgresql.auto.conf).
    pub fn data_dir(&self) -> PathBuf {
        self.data()
    }

    /// The Unix socket directory, for superuser connections.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let out = self.command(program).args(args).stdin(Stdio::null()).output().with_context(|| format!("cannot run {program}"))?;
        if !out.status.success() {
            bail!("{program} failed for cluster {}: {}{}", self.name, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Stops the server and removes the directory once this process is gone.
    fn spawn_watchdog(&mut self) -> anyhow::Result<()> {
        let pg_ctl = self.bin.join("pg_ctl");
        let as_pg = if is_root() { "runuser -u postgres -- " } else { "" };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
             [ -f '{dir}/data/postmaster.pid' ] && {as_pg}'{pg_ctl}' -D '{dir}/data' -m immediate stop >/dev/null 2>&1; \
             rm -rf '{dir}'",
            pid = std::process::id(),
            dir = self.dir.display(),
            pg_ctl = pg_ctl.display(),
        );
        let child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("cannot start the cluster watchdog")?;
        self.watchdog = Some(child);
        Ok(())
    }

    pub fn stop(&self) {
        let _ = self.run("pg_ctl", &["-D", &self.data().to_string_lossy(), "-m", "fast", "-w", "stop"]);
    }

    /// Starts a stopped cluster again.
    pub fn restart(&self) -> anyhow::Result<()> {
        let log = self.log_path();
        self.run("pg_ctl", &["-D", &self.data().to_string_lossy(), "-l", &log.to_string_lossy(), "-w", "-t", "60", "start"])
    }

    /// A libpq-style connection string to this cluster over TCP.
    pub fn url(&self, user: &str, password: Option<&str>, db: &str) -> String {
        match password {
            Some(p) => format!("postgres://{user}:{p}@127.0.0.1:{}/{db}", self.port),
            None => format!("postgres://{user}@127.0.0.1:{}/{db}", self.port),
        }
    }

    /// A superuser connection over the Unix socket.
    pub async fn connect(&self, db: &str) -> anyhow::Result<tokio_postgres::Client> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(&self.dir).port(self.port).user("postgres").dbname(db);
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.with_context(|| format!("connect to {} db {db}", self.name))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Runs SQL as the superuser (several statements allowed).
    pub async fn execute(&self, db: &str, sql: &str) -> anyhow::Result<()> {
        self.connect(db).await?.batch_execute(sql).await.with_context(|| format!("on {}: {sql}", self.name))?;
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.run("pg_ctl", &["-D", &self.data().to_string_lossy(), "-m", "immediate", "-w", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// A publisher (`blue`) and its subscriber (`green`), the shape a cutover needs.
pub struct Pair {
    pub blue: Cluster,
    pub green: Cluster,
}

impl Pair {
    pub fn start(options: &ClusterOptions) -> anyhow::Result<Pair> {
        Ok(Pair { blue: Cluster::start("blue", options)?, green: Cluster::start("green", options)? })
    }

    /// Creates database `db` on both sides with `schema`, owned by `owner`, publishes
    /// all its tables on blue and subscribes green to them; returns once the initial
    /// copy is done.
    pub async fn replicated_database(&self, db: &str, owner: &str, schema: &str) -> anyhow::Result<()> {
        for c in [&self.blue, &self.green] {
            c.execute("postgres", &format!("CREATE DATABASE \"{db}\" OWNER \"{owner}\"")).await?;
            c.execute(db, &format!("SET ROLE \"{owner}\"; {schema}")).await?;
        }
        self.blue.execute(db, "CREATE PUBLICATION pgcutover_pub FOR ALL TABLES").await?;
        let sub = subscription_name(db);
        self.green
            .execute(
                db,
                &format!(
                    "CREATE SUBSCRIPTION {sub} CONNECTION 'host=127.0.0.1 port={} user=postgres dbname={db}' PUBLICATION pgcutover_pub",
                    self.blue.port
                ),
            )
            .await?;
        let green = self.green.connect(db).await?;
        for _ in 0..600 {
            let row = green
                .query_one("SELECT count(*) FILTER (WHERE srsubstate <> 'r') FROM pg_subscription_rel", &[])
                .await?;
            let pending: i64 = row.get(0);
            if pending == 0 {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        bail!("subscription {sub} did not finish its initial copy in 60 s")
    }
}

/// The subscription the pair creates for a database.
pub fn subscription_name(db: &str) -> String {
    format!("pgcutover_sub_{}", db.replace(|c: char| !c.is_ascii_alphanumeric(), "_"))
}

/// pgbench's tables, with a key on history (logical replication needs a replica
/// identity) and an `orders` table whose bigserial key shows that no write is lost
/// or duplicated across a cutover.
pub const PGBENCH_SCHEMA: &str = "
    CREATE TABLE pgbench_branches (bid int PRIMARY KEY, bbalance int, filler char(88));
    CREATE TABLE pgbench_tellers (tid int PRIMARY KEY, bid int, tbalance int, filler char(84));
    CREATE TABLE pgbench_accounts (aid int PRIMARY KEY, bid int, abalance int, filler char(84));
    CREATE TABLE pgbench_history (id bigserial PRIMARY KEY, tid int, bid int, aid int, delta int, mtime timestamp, filler char(22));
    CREATE TABLE orders (id bigserial PRIMARY KEY, client int NOT NULL, at timestamptz NOT NULL DEFAULT now());
";

/// Rows for [`PGBENCH_SCHEMA`]: one branch, ten tellers, `accounts` accounts.
pub fn pgbench_rows(accounts: u32) -> String {
    format!(
        "INSERT INTO pgbench_branches VALUES (1, 0, ''); \
         INSERT INTO pgbench_tellers SELECT t, 1, 0, '' FROM generate_series(1, 10) t; \
         INSERT INTO pgbench_accounts SELECT a, 1, 0, '' FROM generate_series(1, {accounts}) a;"
    )
}

/// A pgbench script: tpcb-like, plus an insert into `orders`.
pub fn pgbench_script(accounts: u32) -> String {
    format!(
        "\\set aid random(1, {accounts})
\\set bid 1
\\set tid random(1, 10)
\\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
INSERT INTO orders (client) VALUES (:client_id);
END;
"
    )
}
