//! `pgcutover demo`: two throwaway clusters with logical replication (blue publishes,
//! green subscribes), the proxy in front of blue, and a pgbench load through it,
//! next to the same load straight at blue. Nothing outlives the command: the
//! clusters live in temporary directories and are removed on exit or Ctrl-C.

use std::time::Duration;

use anyhow::Context;

use crate::cluster::{bin_dir, ClusterOptions, Pair};
use crate::config::Config;

const PASSWORD: &str = "demo-secret";

pub async fn run(duration: Duration) -> anyhow::Result<()> {
    println!("starting two throwaway PostgreSQL clusters (blue publishes, green subscribes)...");
    let pair = Pair::start(&ClusterOptions::default())?;
    for c in [&pair.blue, &pair.green] {
        c.execute("postgres", &format!("CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'")).await?;
    }
    let schema = "CREATE TABLE orders (id bigserial PRIMARY KEY, item text NOT NULL, at timestamptz NOT NULL DEFAULT now())";
    pair.replicated_database("shop", "app", schema).await?;
    println!("  blue  127.0.0.1:{}  green 127.0.0.1:{}  database \"shop\" replicated", pair.blue.port, pair.green.port);

    let sock = tempfile::Builder::new().prefix("pgcutover-demo-").tempdir()?;
    let config = Config::parse(&format!(
        r#"
        [proxy]
        listen = "127.0.0.1:0"
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
        "#,
        sock = sock.path().display(),
        blue = pair.blue.port,
        green = pair.green.port,
    ))?;
    let mut proxy = crate::server::start(config).await?;
    let port = proxy.tcp_addr.port();
    println!("  pgcutover listening on 127.0.0.1:{port} and {}", proxy.socket_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default());

    let script = sock.path().join("order.sql");
    std::fs::write(&script, "INSERT INTO orders (item) VALUES ('demo');\nSELECT count(*) FROM orders WHERE id > 0;\n")?;
    let seconds = duration.as_secs().max(1).to_string();
    for (label, target_port) in [("straight to blue", pair.blue.port), ("through pgcutover", port)] {
        println!("\npgbench, 8 clients, {seconds}s, prepared statements, {label}:");
        let url = format!("host=127.0.0.1 port={target_port} user=app dbname=shop");
        let pgbench = bin_dir().map(|d| d.join("pgbench")).filter(|p| p.exists()).unwrap_or_else(|| "pgbench".into());
        let out = tokio::process::Command::new(pgbench)
            .args(["-n", "-M", "prepared", "-c", "8", "-j", "2", "-T", &seconds, "-f"])
            .arg(&script)
            .arg(&url)
            .env("PGPASSWORD", PASSWORD)
            .output()
            .await
            .context("cannot run pgbench")?;
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines().filter(|l| l.contains("tps") || l.contains("latency average") || l.contains("failed") || l.contains("processed")) {
            println!("  {line}");
        }
        if !out.status.success() {
            anyhow::bail!("pgbench failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let green = pair.green.connect("shop").await?;
    let replicated: i64 = green.query_one("SELECT count(*) FROM orders", &[]).await?.get(0);
    println!("\n{replicated} orders have replicated to green so far.");
    proxy.stop_accepting().await;
    Ok(())
}
