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
