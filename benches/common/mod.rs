//! What the benchmarks share: a cluster with a pgbench database, pgcutover and
//! PgBouncer in front of it, and pgbench runs parsed into numbers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pgcutover::cluster::{bin_dir, free_port, Cluster};

pub const PASSWORD: &str = "bench-secret";

pub fn pgbench() -> PathBuf {
    bin_dir().map(|d| d.join("pgbench")).filter(|p| p.exists()).unwrap_or_else(|| "pgbench".into())
}

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One pgbench run's result.
#[derive(Debug, Clone, Copy, Default)]
pub struct Run {
    pub tps: f64,
    pub latency_ms: f64,
    pub failed: u64,
    /// The proxy's CPU per transaction (user, system), in microseconds.
    pub cpu_us: Option<(f64, f64)>,
    /// The proxy's context switches per transaction (voluntary, involuntary).
    pub switches: Option<(f64, f64)>,
}

/// Runs pgbench against `port` and parses its summary.
pub fn run_pgbench(port: u16, db: &str, args: &[&str]) -> anyhow::Result<Run> {
    let url = format!("host=127.0.0.1 port={port} user=app dbname={db}");
    let out = Command::new(pgbench()).args(args).arg(&url).env("PGPASSWORD", PASSWORD).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        anyhow::bail!("pgbench failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let field = |prefix: &str| -> Option<f64> {
        text.lines().find_map(|l| l.trim().strip_prefix(prefix)).and_then(|rest| rest.split_whitespace().next()).and_then(|v| v.parse().ok())
    };
    Ok(Run {
        tps: field("tps = ").unwrap_or(0.0),
        latency_ms: field("latency average = ").unwrap_or(0.0),
        failed: field("number of failed transactions: ").unwrap_or(0.0) as u64,
        cpu_us: None,
        switches: None,
    })
}

/// A database for pgbench on a fresh cluster, with the `app` role.
pub async fn bench_cluster(scale: u32) -> anyhow::Result<Cluster> {
    let cluster = Cluster::start("bench", &Default::default())?;
    cluster.execute("postgres", &format!("CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'; ")).await?;
    cluster.execute("postgres", "CREATE DATABASE bench OWNER app").await?;
    let url = format!("host=127.0.0.1 port={} user=app dbname=bench", cluster.port);
    let out = Command::new(pgbench()).args(["-i", "-q", "-s", &scale.to_string(), &url]).env("PGPASSWORD", PASSWORD).output()?;
    if !out.status.success() {
        anyhow::bail!("pgbench -i: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(cluster)
}

/// PgBouncer in session pooling in front of `backend_port`, if it is installed.
pub struct PgBouncer {
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

impl PgBouncer {
    pub fn find() -> Option<PathBuf> {
        ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer"].iter().map(PathBuf::from).find(|p| p.exists())
    }

    pub fn start(backend_port: u16, pool_mode: &str) -> anyhow::Result<Option<PgBouncer>> {
        Self::start_with(&format!("* = host=127.0.0.1 port={backend_port}"), pool_mode)
    }

    /// PgBouncer with `databases` as the [databases] section.
    pub fn start_with(databases: &str, pool_mode: &str) -> anyhow::Result<Option<PgBouncer>> {
        let Some(bin) = Self::find() else { return Ok(None) };
        let dir = tempfile::Builder::new().prefix("pgcutover-pgbouncer-").tempdir()?.keep();
        let port = free_port()?;
        let ini = format!(
            "[databases]\n{databases}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir = {dir}\nauth_type = scram-sha-256\nauth_file = {dir}/userlist.txt\npool_mode = {pool_mode}\nmax_client_conn = 2000\ndefault_pool_size = 1200\nlogfile = {dir}/pgbouncer.log\npidfile = {dir}/pgbouncer.pid\nadmin_users = app\nignore_startup_parameters = extra_float_digits,options\n",
            dir = dir.display()
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini)?;
        std::fs::write(dir.join("userlist.txt"), format!("\"app\" \"{PASSWORD}\"\n"))?;
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            Command::new("chown").args(["-R", "postgres"]).arg(&dir).status()?;
        }
        let mut cmd = if root {
            // runuser may apply PAM's default limits: raise the file limit again, so
            // that a thousand clients (and their server connections) fit.
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "sh", "-c", "ulimit -n 16384 2>/dev/null; exec \"$0\" \"$@\""]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        let child = cmd.arg(dir.join("pgbouncer.ini")).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(Some(PgBouncer { port, child, dir }));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        anyhow::bail!("pgbouncer did not start; see {}", dir.join("pgbouncer.log").display())
    }

    /// The PgBouncer process (it runs under runuser: its own pid file says which).
    pub fn pid(&self) -> anyhow::Result<u32> {
        Ok(std::fs::read_to_string(self.dir.join("pgbouncer.pid"))?.trim().parse()?)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// "Edit the host": rewrites the [databases] section (RELOAD applies it).
    pub fn set_databases(&self, databases: &str) -> anyhow::Result<()> {
        let path = self.dir.join("pgbouncer.ini");
        let ini = std::fs::read_to_string(&path)?;
        let rest = ini.split_once("\n\n[pgbouncer]").map(|(_, r)| r).unwrap_or("");
        std::fs::write(&path, format!("[databases]\n{databases}\n\n[pgbouncer]{rest}"))?;
        Ok(())
    }

    /// Runs a command on PgBouncer's admin console.
    pub async fn admin(&self, command: &str) -> anyhow::Result<()> {
        let url = format!("host=127.0.0.1 port={} user=app password={PASSWORD} dbname=pgbouncer", self.port);
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        client.simple_query(command).await?;
        Ok(())
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // pgbouncer runs under runuser as another user: signal it through its pid file.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pgbouncer.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// pgcutover in front of `backend_port`, in this process, on its own runtime.
pub fn start_pgcutover(backend_port: u16) -> anyhow::Result<(tokio::runtime::Runtime, u16, tempfile::TempDir)> {
    let dir = tempfile::Builder::new().prefix("pgcutover-bench-").tempdir()?;
    let config = pgcutover::config::Config::parse(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nsocket_dir = \"{}\"\nthreads = {}\n[auth]\nmethod = \"scram-sha-256\"\n[[auth.users]]\nname = \"app\"\npassword = \"{PASSWORD}\"\n[backends.db]\nhost = \"127.0.0.1\"\nport = {backend_port}\ntls = \"disable\"\n[cutover]\nactive = \"db\"\n",
        dir.path().display(),
        std::env::var("BENCH_THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or_else(pgcutover::shards::default_count),
    ))?;
    // Sessions run on the proxy's own event loops (`[proxy] threads`, one per
    // core unless BENCH_THREADS says); this runtime's one thread only accepts.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let handle = rt.block_on(pgcutover::server::start(config))?;
    let port = handle.tcp_addr.port();
    std::mem::forget(handle); // serves until the runtime is dropped
    Ok((rt, port, dir))
}
