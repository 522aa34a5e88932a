//! What the cutover tests share: one at a time (a fence is cluster-wide), the
//! clusters put back before each, and the checks that a source is as it was.

use pgcutover::cluster::Cluster;

use super::{fixture, Fixture, TestProxy};

/// One cutover test at a time; the clusters are unfenced before each.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let guard = LOCK.lock().await;
    for c in [fixture().blue(), fixture().green()] {
        unfence(c).await;
    }
    guard
}

pub const ROLES: &[&str] = &["app", "verifier_user", "md5user", "pwuser", "trustuser", "limited"];

pub async fn unfence(c: &Cluster) {
    let admin = c.connect("postgres").await.unwrap();
    admin.batch_execute("SET default_transaction_read_only = off").await.unwrap();
    admin.batch_execute("ALTER SYSTEM RESET default_transaction_read_only").await.unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    for r in ROLES {
        admin.batch_execute(&format!("ALTER ROLE {r} LOGIN")).await.unwrap_or_else(|e| panic!("ALTER ROLE {r} LOGIN on {}: {e:?}", c.name));
    }
}

/// `CUTOVER <to>` on the console, as name → value.
pub async fn cutover(proxy: &TestProxy, to: &str) -> std::collections::HashMap<String, String> {
    let rows = proxy.admin(&format!("CUTOVER {to}")).await.expect("CUTOVER answers");
    rows.into_iter().map(|r| (r[0].clone().unwrap_or_default(), r[1].clone().unwrap_or_default())).collect()
}

pub async fn replicated(f: &Fixture, db: &str, schema: &str) {
    f.pair.replicated_database(db, "app", schema).await.unwrap();
}

/// Blue takes writes and logins as before the cutover.
pub async fn blue_writable(f: &Fixture, db: &str) {
    let c = f.blue().connect(db).await.unwrap();
    let ro: String = c.query_one("SHOW default_transaction_read_only", &[]).await.unwrap().get(0);
    assert_eq!(ro, "off", "blue is still fenced");
    let login: bool = c.query_one("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'app'", &[]).await.unwrap().get(0);
    assert!(login, "app lost LOGIN on blue");
}

/// What blue's postgresql.auto.conf holds.
pub fn auto_conf(c: &Cluster) -> String {
    std::fs::read_to_string(c.data_dir().join("postgresql.auto.conf")).unwrap()
}

/// A database with pgbench's tables and `orders` on both sides, green subscribed.
pub async fn bench_database(f: &Fixture, db: &str) {
    f.blue().execute("postgres", &format!("CREATE DATABASE {db} OWNER app")).await.unwrap();
    f.blue()
        .execute(
            db,
            &format!(
                "SET ROLE app; {} {}",
                pgcutover::cluster::PGBENCH_SCHEMA,
                pgcutover::cluster::pgbench_rows(10_000)
            ),
        )
        .await
        .unwrap();
    // The pair's helper creates the database on green and subscribes it.
    f.green().execute("postgres", &format!("CREATE DATABASE {db} OWNER app")).await.unwrap();
    f.green().execute(db, &format!("SET ROLE app; {}", pgcutover::cluster::PGBENCH_SCHEMA)).await.unwrap();
    f.blue().execute(db, "CREATE PUBLICATION pgcutover_pub FOR ALL TABLES").await.unwrap();
    f.green()
        .execute(db, &format!("CREATE SUBSCRIPTION {} CONNECTION 'host=127.0.0.1 port={} user=postgres dbname={db}' PUBLICATION pgcutover_pub", pgcutover::cluster::subscription_name(db), f.blue().port))
        .await
        .unwrap();
    let green = f.green().connect(db).await.unwrap();
    assert!(
        super::eventually(60, || async { green.query_one("SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'", &[]).await.unwrap().get::<_, i64>(0) == 0 }).await,
        "initial sync did not finish"
    );
}

/// pgbench through `port` for `seconds` with the tpcb-like + orders script;
/// returns how many transactions committed and pgbench's output. Asserts that none
/// failed.
pub async fn pgbench(port: u16, db: &str, mode: &str, clients: u32, seconds: u32) -> (i64, String) {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("tx.sql");
    std::fs::write(&script, pgcutover::cluster::pgbench_script(10_000)).unwrap();
    let url = format!("host=127.0.0.1 port={port} user=app dbname={db}");
    let out = tokio::process::Command::new(super::pg_program("pgbench"))
        .args(["-n", "-M", mode, "-c", &clients.to_string(), "-j", "2", "-T", &seconds.to_string(), "-f"])
        .arg(&script)
        .arg(&url)
        .env("PGPASSWORD", super::PASSWORD)
        .output()
        .await
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("number of failed transactions: 0 "), "{text}");
    let processed = text
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    (processed, text)
}
