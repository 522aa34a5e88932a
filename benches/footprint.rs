//! Memory per idle client session: N clients log in, run one query, and sit idle;
//! the proxy's resident memory (VmRSS) before and after, divided by N. pgcutover
//! (the release binary, as a process of its own) and PgBouncer (session pooling)
//! in the same run.
//!
//!   cargo bench --bench footprint
//!   BENCH_IDLE=1000 cargo bench --bench footprint

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{env_or, PgBouncer, PASSWORD};
use pgcutover::cluster::{Cluster, ClusterOptions};

fn rss_kb(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or_else(|| anyhow::anyhow!("no VmRSS"))?;
    Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
}

/// Opens `n` sessions through `port`, each runs one query; returns them (idle).
async fn idle_sessions(port: u16, n: usize) -> anyhow::Result<Vec<tokio_postgres::Client>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let (c, conn) = tokio_postgres::connect(&format!("host=127.0.0.1 port={port} user=app password={PASSWORD} dbname=bench"), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        c.simple_query("SELECT 1").await?;
        clients.push(c);
    }
    Ok(clients)
}

/// KB per idle session of the process `pid` serving `port`.
async fn per_session(pid: u32, port: u16, n: usize) -> anyhow::Result<f64> {
    let warm = idle_sessions(port, 16).await?;
    drop(warm);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kb(pid)?;
    let clients = idle_sessions(port, n).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kb(pid)?;
    drop(clients);
    Ok((after.saturating_sub(before)) as f64 / n as f64)
}

fn main() -> anyhow::Result<()> {
    let n: usize = env_or("BENCH_IDLE", 1000);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let options = ClusterOptions { settings: vec![format!("max_connections = {}", n + 100)], ..Default::default() };
    let cluster = Cluster::start("footprint", &options)?;
    rt.block_on(async {
        cluster.execute("postgres", &format!("CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'")).await?;
        cluster.execute("postgres", "CREATE DATABASE bench OWNER app").await
    })?;

    let dir = tempfile::Builder::new().prefix("pgcutover-footprint-").tempdir()?;
    let port = pgcutover::cluster::free_port()?;
    std::fs::write(
        dir.path().join("proxy.toml"),
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{port}\"\nsocket_dir = \"{}\"\nmax_client_connections = {}\n[auth]\nmethod = \"scram-sha-256\"\n[[auth.users]]\nname = \"app\"\npassword = \"{PASSWORD}\"\n[backends.db]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"disable\"\n[cutover]\nactive = \"db\"\n",
            dir.path().join("sock").display(),
            n + 100,
            cluster.port
        ),
    )?;
    let mut proxy = Command::new(env!("CARGO_BIN_EXE_pgcutover")).arg("serve").arg("--config").arg(dir.path().join("proxy.toml")).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let ours = rt.block_on(per_session(proxy.id(), port, n));
    let _ = proxy.kill();
    let _ = proxy.wait();
    let ours = ours?;
    println!("memory per idle session ({n} sessions, VmRSS):");
    println!("  pgcutover {ours:>8.2} KB");

    let bouncer = PgBouncer::start(cluster.port, "session")?;
    let theirs = match &bouncer {
        Some(b) => Some(rt.block_on(per_session(b.pid()?, b.port, n))?),
        None => None,
    };
    match theirs {
        Some(t) => {
            println!("  pgbouncer {t:>8.2} KB");
            println!("  pgcutover/pgbouncer = {:.2}", ours / t.max(0.01));
        }
        None => println!("  pgbouncer: not installed (apt-get install pgbouncer)"),
    }
    Ok(())
}
