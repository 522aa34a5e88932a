//! The cutover on the fixture's blue/green pair: sessions move with their state,
//! nothing errors, nothing is lost, and every failure before the repoint rolls back.
//!
//! A fence is cluster-wide (read-only by default, application roles without LOGIN),
//! so these tests run one at a time and put the clusters back afterwards.

mod common;

use std::time::Duration;

use common::{fixture, Fixture, TestProxy};
use pgcutover::cluster::Cluster;

/// One cutover test at a time; the guard puts both clusters back when dropped.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let guard = LOCK.lock().await;
    for c in [fixture().blue(), fixture().green()] {
        unfence(c).await;
    }
    guard
}

const ROLES: &[&str] = &["app", "verifier_user", "md5user", "pwuser", "trustuser", "limited"];

async fn unfence(c: &Cluster) {
    let admin = c.connect("postgres").await.unwrap();
    admin.batch_execute("ALTER SYSTEM RESET default_transaction_read_only").await.unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    for r in ROLES {
        admin.batch_execute(&format!("ALTER ROLE {r} LOGIN")).await.unwrap();
    }
}

async fn cutover(proxy: &TestProxy, to: &str) -> std::collections::HashMap<String, String> {
    let rows = proxy.admin(&format!("CUTOVER {to}")).await.expect("CUTOVER answers");
    rows.into_iter().map(|r| (r[0].clone().unwrap_or_default(), r[1].clone().unwrap_or_default())).collect()
}

async fn replicated(f: &Fixture, db: &str, schema: &str) {
    f.pair.replicated_database(db, "app", schema).await.unwrap();
}

#[tokio::test]
async fn an_idle_session_moves_with_its_settings_prepared_statements_and_listens() {
    let _serial = serial().await;
    let f = fixture();
    let db = "co_state";
    replicated(f, db, "CREATE TABLE items (id bigserial PRIMARY KEY, v text)").await;
    let proxy = f.proxy(|_| {}).await;
    let c = proxy.connect(db).await;
    c.batch_execute("SET work_mem = '7MB'; SET search_path = audit, public; PREPARE plus_one (int) AS SELECT $1 + 1; LISTEN news").await.unwrap();
    let by_id = c.prepare("SELECT v FROM items WHERE id = $1").await.unwrap();
    for v in ["a", "b", "c"] {
        c.execute("INSERT INTO items (v) VALUES ($1)", &[&v]).await.unwrap();
    }

    let report = cutover(&proxy, "green").await;
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    assert_eq!(report["sessions_moved"], "1", "{report:#?}");
    assert_eq!(report["sessions_closed"], "0");

    let port: i32 = c.query_one("SELECT inet_server_port()", &[]).await.unwrap().get(0);
    assert_eq!(port as u16, f.green().port, "the session runs on green now");
    let wm: String = c.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
    assert_eq!(wm, "7MB");
    let sp: String = c.query_one("SHOW search_path", &[]).await.unwrap().get(0);
    assert_eq!(sp, "audit, public");
    let n: i32 = c.query_one("EXECUTE plus_one(41)", &[]).await.unwrap().get(0);
    assert_eq!(n, 42);
    let v: String = c.query_one(&by_id, &[&2i64]).await.unwrap().get(0);
    assert_eq!(v, "b");
    let channels: Vec<String> = c.query("SELECT pg_listening_channels()::text", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(channels, vec!["news".to_string()]);
    // The sequence continues on green: no duplicate key.
    let id: i64 = c.query_one("INSERT INTO items (v) VALUES ('d') RETURNING id", &[]).await.unwrap().get(0);
    assert_eq!(id, 4);

    // Blue stays fenced; green no longer subscribes.
    let blue = f.blue().connect("postgres").await.unwrap();
    let ro: String = blue.query_one("SHOW default_transaction_read_only", &[]).await.unwrap().get(0);
    assert_eq!(ro, "on");
    let green = f.green().connect(db).await.unwrap();
    let enabled: bool = green.query_one("SELECT subenabled FROM pg_subscription", &[]).await.unwrap().get(0);
    assert!(!enabled);
    let shown = proxy.admin("SHOW CUTOVER").await.unwrap();
    assert!(shown.iter().any(|r| r[0].as_deref() == Some("outcome") && r[1].as_deref() == Some("committed")));
    tokio::time::sleep(Duration::from_millis(10)).await;
}
