//! Bad input and faults: each ends only its own session, with a clear error and a
//! SQLSTATE where one applies; the proxy never panics and other sessions go on.

mod common;

use std::time::Duration;

use common::{fixture, sqlstate, Raw, TestProxy};
use pgcutover::config::AuthMethod;

/// A healthy session next to the faulty one must not notice anything.
async fn assert_healthy(proxy: &TestProxy, client: &tokio_postgres::Client) {
    let v: i32 = client.query_one("SELECT 7", &[]).await.expect("the bystander session broke").get(0);
    assert_eq!(v, 7);
    proxy.connect("postgres").await.simple_query("SELECT 1").await.expect("new sessions are refused");
}

async fn logged_in(proxy: &TestProxy, db: &str, app: &str) -> Raw {
    let mut raw = Raw::connect(proxy.port()).await;
    raw.startup(&[("user", "app"), ("database", db), ("application_name", app)]).await;
    let hello = raw.until_ready().await;
    assert_eq!(hello.last().map(|m| m.tag), Some(b'Z'));
    raw
}

fn trust(c: &mut pgcutover::config::Config) {
    c.auth.method = AuthMethod::Trust;
}

async fn expect_fatal(raw: &mut Raw, code: &str) -> String {
    let m = raw.recv().await.expect("an ErrorResponse");
    assert_eq!(m.tag, b'E', "expected an ErrorResponse");
    assert_eq!(m.sqlstate().as_deref(), Some(code), "{:?}", m.message());
    assert!(raw.closed().await, "the connection stays open after a FATAL");
    m.message().unwrap_or_default()
}

#[tokio::test]
async fn a_length_below_four_ends_only_that_session() {
    let f = fixture();
    let db = f.database("fault_short").await;
    let proxy = f.proxy(trust).await;
    let bystander = proxy.connect(&db).await;
    let mut raw = logged_in(&proxy, &db, "short").await;
    raw.send(&[b'Q', 0, 0, 0, 3]).await;
    let msg = expect_fatal(&mut raw, "08P01").await;
    assert!(msg.contains("invalid message length 3"), "{msg}");
    assert_healthy(&proxy, &bystander).await;
}

#[tokio::test]
async fn a_length_above_the_limit_ends_only_that_session() {
    let f = fixture();
    let db = f.database("fault_long").await;
    let proxy = f.proxy(|c| {
        trust(c);
        c.proxy.max_message_size = 1 << 20;
    })
    .await;
    let bystander = proxy.connect(&db).await;
    let mut raw = logged_in(&proxy, &db, "long").await;
    raw.send(&[b'Q', 0, 0x20, 0, 0]).await;
    let msg = expect_fatal(&mut raw, "08P01").await;
    assert!(msg.contains("exceeds the limit"), "{msg}");
    assert_healthy(&proxy, &bystander).await;
}

#[tokio::test]
async fn garbage_unknown_protocols_and_missing_users_are_refused_at_startup() {
    let f = fixture();
    let proxy = f.proxy(trust).await;
    let bystander = proxy.connect("postgres").await;

    // A bad length is closed without a word, as PostgreSQL does.
    let mut raw = Raw::connect(proxy.port()).await;
    raw.send(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n").await;
    assert_eq!(raw.bytes_until_closed(10).await, Some(Vec::new()));

    let mut raw = Raw::connect(proxy.port()).await;
    raw.send(&[0, 0, 0, 4]).await;
    assert_eq!(raw.bytes_until_closed(10).await, Some(Vec::new()));

    // Protocol 2.0 is told in its own format.
    let mut raw = Raw::connect(proxy.port()).await;
    raw.send(&[0, 0, 0, 17, 0, 2, 0, 0, b'u', b's', b'e', b'r', 0, b'x', 0, 0, 0]).await;
    let told = raw.bytes_until_closed(10).await.expect("closed");
    assert!(told.starts_with(b"EFATAL:  unsupported frontend protocol 2.0"), "{}", String::from_utf8_lossy(&told));

    let mut raw = Raw::connect(proxy.port()).await;
    raw.startup(&[("database", "postgres")]).await;
    assert!(expect_fatal(&mut raw, "28000").await.contains("no PostgreSQL user name"));

    // Malformed SCRAM: a SASLInitialResponse whose data length lies.
    let scram = f.proxy(|_| {}).await;
    let mut raw = Raw::connect(scram.port()).await;
    raw.startup(&[("user", "app"), ("database", "postgres")]).await;
    assert_eq!(raw.recv().await.unwrap().tag, b'R');
    raw.send_message(b'p', b"SCRAM-SHA-256\0\x7f\xff\xff\xffn,,n=,r=abc").await;
    expect_fatal(&mut raw, "08P01").await;

    assert_healthy(&proxy, &bystander).await;
}

#[tokio::test]
async fn a_client_that_stalls_in_the_handshake_is_timed_out() {
    let f = fixture();
    let proxy = f.proxy(|c| c.proxy.client_login_timeout = Duration::from_millis(300)).await;
    let bystander = proxy.connect("postgres").await;
    // Silent from the first byte.
    let mut raw = Raw::connect(proxy.port()).await;
    assert!(expect_fatal(&mut raw, "08P01").await.contains("timeout"));
    // Silent in the middle of SCRAM.
    let mut raw = Raw::connect(proxy.port()).await;
    raw.startup(&[("user", "app"), ("database", "postgres")]).await;
    assert_eq!(raw.recv().await.unwrap().tag, b'R');
    assert!(expect_fatal(&mut raw, "08P01").await.contains("timeout"));
    assert_healthy(&proxy, &bystander).await;
}

#[tokio::test]
async fn clients_past_max_client_connections_get_53300() {
    let f = fixture();
    let proxy = f.proxy(|c| c.proxy.max_client_connections = 2).await;
    let first = proxy.connect("postgres").await;
    let second = proxy.connect("postgres").await;
    let e = proxy.connect_as("app", common::PASSWORD, "postgres").await.unwrap_err();
    assert_eq!(sqlstate(&e), "53300");
    assert_eq!(e.as_db_error().unwrap().message(), "sorry, too many clients already");
    drop(second);
    assert!(common::eventually(5, || async { proxy.connect_as("app", common::PASSWORD, "postgres").await.is_ok() }).await);
    first.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn a_client_that_disconnects_mid_query_leaves_no_backend_behind() {
    let f = fixture();
    let db = f.database("fault_vanish").await;
    let proxy = f.proxy(trust).await;
    let bystander = proxy.connect(&db).await;
    let mut raw = logged_in(&proxy, &db, "vanishing").await;
    raw.query("SELECT pg_sleep(60)").await;
    let admin = f.blue().connect("postgres").await.unwrap();
    let running = || async {
        admin.query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'vanishing'", &[]).await.unwrap().get::<_, i64>(0)
    };
    assert!(common::eventually(5, || async { running().await == 1 }).await);
    drop(raw);
    assert!(common::eventually(10, || async { running().await == 0 }).await, "the backend query outlived its client");
    assert_healthy(&proxy, &bystander).await;
}

#[tokio::test]
async fn a_backend_terminated_mid_session_errors_the_client_at_once() {
    let f = fixture();
    let db = f.database("fault_terminated").await;
    let proxy = f.proxy(|_| {}).await;
    let bystander = proxy.connect(&db).await;
    let victim = proxy.connect(&db).await;
    let pid: i32 = victim.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let query = tokio::spawn(async move { victim.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    f.blue().execute("postgres", &format!("SELECT pg_terminate_backend({pid})")).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), query).await.expect("the client hangs").unwrap().unwrap_err();
    assert_eq!(sqlstate(&e), "57P01");
    assert_healthy(&proxy, &bystander).await;
}

#[tokio::test]
async fn a_backend_process_that_dies_without_a_word_errors_the_client_at_once() {
    // SIGKILL of a backend makes the postmaster restart: use a cluster of our own.
    let cluster = pgcutover::cluster::Cluster::start("crash", &Default::default()).unwrap();
    cluster.execute("postgres", "CREATE ROLE app LOGIN PASSWORD 'secret'").await.unwrap();
    let f = fixture();
    let proxy = f.proxy(|c| c.backends.get_mut("blue").unwrap().port = cluster.port).await;
    let victim = proxy.connect("postgres").await;
    let pid: i32 = victim.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let query = tokio::spawn(async move { victim.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SAFETY: kill(2) on a pid we just read; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let e = tokio::time::timeout(Duration::from_secs(5), query).await.expect("the client hangs").unwrap().unwrap_err();
    assert_eq!(sqlstate(&e), "08006", "{e}");
    assert!(e.as_db_error().unwrap().message().contains("closed the connection unexpectedly"));
}
