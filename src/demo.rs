//! `pgcutover demo`: the main job on throwaway databases. Two local clusters with
//! logical replication (blue publishes, green subscribes), pgcutover in front of
//! blue, a load test through it with a cutover to green halfway, the report, and a
//! plot. Nothing outlives the command: the clusters live in temporary directories
//! and are removed on exit or Ctrl-C.
//!
//! `--fleet N` puts N instances in front instead, coordinated through a throwaway
//! etcd; the load's clients are spread over them, and one cutover moves them all.

use std::path::Path;
use std::time::Duration;

use crate::cluster::{ClusterOptions, Pair};
use crate::loadtest::{self, Mode, Workload};

const PASSWORD: &str = "demo-secret";

pub async fn run(duration: Duration, plot: &Path, log: &Path, rehearse: bool, fleet: usize) -> anyhow::Result<()> {
    // Ctrl-C ends the demo through the normal path, so that the clusters are
    // stopped and every temporary directory removed (the clusters' watchdogs would
    // clean up after a harder kill too).
    tokio::select! {
        r = demo(duration, plot, log, rehearse, fleet.max(1)) => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted: cleaning up");
            Ok(())
        }
    }
}

async fn demo(duration: Duration, plot: &Path, log: &Path, rehearse: bool, instances: usize) -> anyhow::Result<()> {
    println!("starting two throwaway PostgreSQL clusters (blue publishes, green subscribes)...");
    let pair = Pair::start(&ClusterOptions::default())?;
    for c in [&pair.blue, &pair.green] {
        c.execute("postgres", &format!("CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'")).await?;
    }
    pair.replicated_database("shop", "app", loadtest::workload::SCHEMA).await?;
    pair.blue.execute("shop", &loadtest::workload::fill_accounts()).await?;
    println!("  blue 127.0.0.1:{}, green 127.0.0.1:{}, database \"shop\" replicated", pair.blue.port, pair.green.port);
    let etcd = if instances > 1 {
        let etcd = crate::etcd_server::Etcd::start()?;
        println!("  etcd {} for a fleet of {instances} instances", etcd.endpoint);
        Some(etcd)
    } else {
        None
    };

    let dir = tempfile::Builder::new().prefix("pgcutover-demo-").tempdir()?;
    let mut proxies = Vec::new();
    let mut urls = Vec::new();
    let mut configs = Vec::new();
    for i in 1..=instances {
        let here = dir.path().join(format!("proxy-{i}"));
        std::fs::create_dir_all(&here)?;
        let config_path = here.join("proxy.toml");
        let port = crate::cluster::free_port()?;
        let fleet = match &etcd {
            Some(e) => format!("[fleet]\netcd = [\"{}\"]\nname = \"proxy-{i}\"\nlease_ttl = \"2s\"\n", e.endpoint),
            None => String::new(),
        };
        std::fs::write(
            &config_path,
            format!(
                r#"[proxy]
listen = "127.0.0.1:{port}"
socket_dir = "{sock}"
[auth]
method = "scram-sha-256"
[[auth.users]]
name = "app"
password = "{PASSWORD}"
[backends.blue]
host = "127.0.0.1"
port = {blue}
[backends.green]
host = "127.0.0.1"
port = {green}
[cutover]
active = "blue"
target = "green"
drain_timeout = "1s"
{fleet}"#,
                sock = here.join("sock").display(),
                blue = pair.blue.port,
                green = pair.green.port,
            ),
        )?;
        let config = crate::config::Config::load(&config_path)?;
        let fleet = match &config.fleet {
            Some(f) => Some(crate::fleet::Fleet::connect(f).await?),
            None => None,
        };
        if let Some(f) = &fleet {
            f.init_active("blue").await?;
        }
        let proxy = crate::server::start(config).await?;
        proxy.proxy.set_config_path(&config_path);
        if let Some(f) = fleet {
            f.join(&proxy.proxy).await?;
        }
        println!("  pgcutover{} on 127.0.0.1:{port}, admin console on {}", if instances > 1 { format!(" proxy-{i}") } else { String::new() }, proxy.socket_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default());
        urls.push(format!("postgres://app:{PASSWORD}@127.0.0.1:{port}/shop"));
        configs.push(config_path);
        proxies.push(proxy);
    }
    println!("  the proxy's log: {}", log.display());

    let at = duration / 2;
    let what = match (rehearse, instances) {
        (true, _) => "a rehearsed cutover (rolled back on purpose)".to_string(),
        (false, 1) => "cutover to green".to_string(),
        (false, n) => format!("one fleet cutover of all {n} instances to green, asked of proxy-1"),
    };
    let spread = if instances > 1 { format!(", spread over {instances} instances") } else { String::new() };
    println!("\nload test: 16 clients{spread}, {} s, tpcb-like with an order row per transaction, {what} at {} s\n", duration.as_secs(), at.as_secs_f64());
    let report = loadtest::run(loadtest::Options {
        url: urls[0].clone(),
        spread: urls[1..].to_vec(),
        clients: 16,
        duration,
        mode: Mode::Prepared,
        workload: Workload::Tpcb,
        cutover_at: Some(at),
        config: Some(configs[0].clone()),
        rehearse,
        plot: Some(plot.to_path_buf()),
        init: false,
        progress: true,
    })
    .await?;
    report.print();
    println!("\nplot written to {}", plot.display());
    for mut proxy in proxies {
        proxy.stop_accepting().await;
        proxy.proxy.shutdown(Duration::from_secs(2)).await;
    }
    drop(etcd);
    if !report.cutover_succeeded() || report.lost_writes.as_ref().is_some_and(|l| !l.ok) || !report.errors.is_empty() {
        anyhow::bail!("the demo did not go cleanly (see the report above)");
    }
    Ok(())
}
