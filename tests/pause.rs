//! Pause, drain and resume: nothing errors while the gate holds traffic, and nothing
//! is lost when it lets go.

mod common;

use std::time::{Duration, Instant};

use common::{fixture, sqlstate, Raw, TestProxy};
use pgcutover::config::{AuthMethod, OnDrainTimeout};

fn status(rows: &[Vec<Option<String>>], name: &str) -> String {
    rows.iter().find(|r| r[0].as_deref() == Some(name)).and_then(|r| r[1].clone()).unwrap_or_default()
}

async fn count(f: &common::Fixture, db: &str, sql: &str) -> i64 {
    f.blue().connect(db).await.unwrap().query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_pause_resume_under_pgbench_load_fails_no_transaction() {
    let f = fixture();
    let db = f.database("pause_pgbench").await;
    let proxy = f.proxy(|c| c.cutover.drain_timeout = Duration::from_secs(5)).await;
    let url = format!("host=127.0.0.1 port={} user=app dbname={db}", proxy.port());
    let pgbench = common::pg_program("pgbench");
    let init = tokio::process::Command::new(&pgbench).args(["-i", "-q", "-s", "1", &url]).env("PGPASSWORD", common::PASSWORD).output().await.unwrap();
    assert!(init.status.success());
    let load = tokio::process::Command::new(&pgbench)
        .args(["-n", "-M", "prepared", "-c", "16", "-j", "2", "-T", "8", &url])
        .env("PGPASSWORD", common::PASSWORD)
        .output();
    let cycles = async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let mut n = 0;
        while n < 10 {
            let rows = proxy.admin("PAUSE 5s").await.expect("PAUSE");
            assert_eq!(rows[0][0].as_deref(), Some("paused"));
            tokio::time::sleep(Duration::from_millis(150)).await;
            proxy.admin("RESUME").await.expect("RESUME");
            tokio::time::sleep(Duration::from_millis(300)).await;
            n += 1;
        }
        n
    };
    let (out, cycles) = tokio::join!(load, cycles);
    let out = out.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("number of failed transactions: 0 "), "{text}");
    assert!(!text.contains("aborted"), "{text}");
    let stats = proxy.admin("SHOW STATS").await.unwrap();
    assert_eq!(status(&stats, "pauses"), cycles.to_string());
    assert!(status(&stats, "held_requests").parse::<u64>().unwrap() > 0, "no request was ever held: {stats:?}");
    assert!(!status(&stats, "hold_ms_p99").is_empty());
}

/// Sessions relaying on the proxy's express lanes now (SHOW STATS).
async fn express(proxy: &TestProxy) -> String {
    status(&proxy.admin("SHOW STATS").await.unwrap(), "express_sessions")
}

/// Between requests a session relays on its shard's express lane, off tokio; a
/// request held at a pause brings it home, and once the pause is over it rides
/// again — every request answered once, in order.
#[tokio::test]
async fn a_session_leaves_the_express_lane_to_hold_and_rides_it_again_after_resume() {
    let f = fixture();
    let db = f.database("pause_express").await;
    let proxy = f.proxy(|_| {}).await;
    let c = proxy.connect(&db).await;
    c.batch_execute("CREATE TABLE marks (n int)").await.unwrap();
    assert!(common::eventually(10, || async { express(&proxy).await == "1" }).await, "an idle session is not on its lane: {}", express(&proxy).await);

    proxy.admin("PAUSE").await.unwrap();
    let insert = tokio::spawn(async move {
        c.execute("INSERT INTO marks VALUES (1)", &[]).await.unwrap();
        c
    });
    assert!(common::eventually(10, || async { express(&proxy).await == "0" }).await, "a held session is still on its lane");
    let sessions = proxy.admin("SHOW SESSIONS").await.unwrap();
    assert!(sessions.iter().any(|r| r[5].as_deref() == Some("held")), "{sessions:?}");
    assert_eq!(count(f, &db, "SELECT count(*) FROM marks").await, 0, "the held insert ran during the pause");

    proxy.admin("RESUME").await.unwrap();
    let c = insert.await.unwrap();
    assert!(common::eventually(10, || async { express(&proxy).await == "1" }).await, "the session did not ride again after the pause");
    for n in 2..=50 {
        c.execute("INSERT INTO marks VALUES ($1)", &[&n]).await.unwrap();
    }
    let rows = c.query("SELECT n FROM marks ORDER BY n", &[]).await.unwrap();
    assert_eq!(rows.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>(), (1..=50).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_held_query_waits_for_resume_and_runs_exactly_once() {
    let f = fixture();
    let db = f.database("pause_held").await;
    let proxy = f.proxy(|_| {}).await;
    let c = proxy.connect(&db).await;
    c.batch_execute("CREATE TABLE marks (at timestamptz DEFAULT now())").await.unwrap();
    proxy.admin("PAUSE").await.unwrap();
    let started = Instant::now();
    let insert = tokio::spawn(async move {
        c.execute("INSERT INTO marks DEFAULT VALUES", &[]).await.unwrap();
        (c, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(f, &db, "SELECT count(*) FROM marks").await, 0, "the held query ran during the pause");
    let sessions = proxy.admin("SHOW SESSIONS").await.unwrap();
    assert!(sessions.iter().any(|r| r[5].as_deref() == Some("held") && r[8].is_some()), "{sessions:?}");
    proxy.admin("RESUME").await.unwrap();
    let (c, latency) = insert.await.unwrap();
    assert!(latency >= Duration::from_millis(500), "the query did not wait: {latency:?}");
    assert_eq!(count(f, &db, "SELECT count(*) FROM marks").await, 1);
    c.execute("INSERT INTO marks DEFAULT VALUES", &[]).await.unwrap();
    assert_eq!(count(f, &db, "SELECT count(*) FROM marks").await, 2);
}

#[tokio::test]
async fn a_transaction_in_flight_finishes_before_the_pause_completes() {
    let f = fixture();
    let db = f.database("pause_in_flight").await;
    let proxy = f.proxy(|_| {}).await;
    let c = proxy.connect(&db).await;
    c.batch_execute("CREATE TABLE t (x int)").await.unwrap();
    c.batch_execute("BEGIN; INSERT INTO t VALUES (1)").await.unwrap();
    let p = proxy.proxy().clone();
    let pause = tokio::spawn(async move { pgcutover::admin::execute(&p, "PAUSE 10s").await.map(|rs| rs.rows()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pause.is_finished(), "PAUSE returned while a transaction was open");
    // Inside its transaction the session is not held.
    c.batch_execute("INSERT INTO t VALUES (2); COMMIT").await.unwrap();
    let rows = pause.await.unwrap().unwrap();
    assert_eq!(rows[0][0].as_deref(), Some("paused"));
    assert_eq!(rows[0][2].as_deref(), Some("1"), "waited for one transaction");
    assert!(rows[0][1].as_deref().unwrap().parse::<f64>().unwrap() >= 250.0);
    proxy.admin("RESUME").await.unwrap();
    assert_eq!(count(f, &db, "SELECT count(*) FROM t").await, 2);
}

#[tokio::test]
async fn at_the_deadline_cancel_gives_one_40001_and_the_session_goes_on() {
    let f = fixture();
    let db = f.database("pause_cancel").await;
    let proxy = f.proxy(|c| c.cutover.on_drain_timeout = OnDrainTimeout::Cancel).await;
    let running = proxy.connect(&db).await;
    let idle = proxy.connect(&db).await;
    running.batch_execute("CREATE TABLE t (x int)").await.unwrap();
    // One session runs a long query inside a transaction, one sits idle in one.
    running.batch_execute("BEGIN; INSERT INTO t VALUES (1)").await.unwrap();
    idle.batch_execute("BEGIN; INSERT INTO t VALUES (2)").await.unwrap();
    let sleeper = tokio::spawn(async move {
        let r = running.simple_query("SELECT pg_sleep(30)").await;
        (running, r)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rows = proxy.admin("PAUSE 300ms").await.expect("PAUSE with cancel completes");
    assert_eq!(rows[0][3].as_deref(), Some("2"), "two sessions cancelled: {rows:?}");

    let (running, r) = sleeper.await.unwrap();
    let e = r.unwrap_err();
    assert_eq!(sqlstate(&e), "40001");
    assert!(e.as_db_error().unwrap().message().contains("pause or cutover"), "{e}");
    // Exactly one 40001: the ROLLBACK succeeds (answered while paused), later work runs.
    running.batch_execute("ROLLBACK").await.unwrap();

    let e = idle.batch_execute("INSERT INTO t VALUES (3)").await.unwrap_err();
    assert_eq!(sqlstate(&e), "40001");
    let e = idle.batch_execute("INSERT INTO t VALUES (4)").await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P02", "inside the failed transaction");
    idle.batch_execute("ROLLBACK").await.unwrap();

    // Nothing of the cancelled transactions reached the database.
    assert_eq!(count(f, &db, "SELECT count(*) FROM t").await, 0);
    assert_eq!(count(f, &db, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%'").await, 0);
    proxy.admin("RESUME").await.unwrap();
    for c in [&running, &idle] {
        c.batch_execute("BEGIN; INSERT INTO t VALUES (5); COMMIT").await.unwrap();
    }
    assert_eq!(count(f, &db, "SELECT count(*) FROM t").await, 2);
    let stats = proxy.admin("SHOW STATS").await.unwrap();
    assert_eq!(status(&stats, "cancelled_for_pause"), "2");
}

#[tokio::test]
async fn at_the_deadline_abort_reopens_the_gate_and_errors_nothing() {
    let f = fixture();
    let db = f.database("pause_abort").await;
    let proxy = f.proxy(|c| c.cutover.on_drain_timeout = OnDrainTimeout::Abort).await;
    let c = proxy.connect(&db).await;
    c.batch_execute("BEGIN").await.unwrap();
    let q = tokio::spawn(async move {
        let r = c.simple_query("SELECT pg_sleep(1)").await.map(|_| ());
        (c, r)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let e = proxy.admin("PAUSE 200ms").await.unwrap_err();
    assert_eq!(e.code, "55000");
    assert!(e.message.contains("1 session(s)"), "{}", e.message);
    assert!(e.message.contains("app@pause_abort"), "the report names who was in the way: {}", e.message);
    let st = proxy.admin("SHOW STATUS").await.unwrap();
    assert_eq!(status(&st, "paused"), "false");
    let (c, r) = q.await.unwrap();
    r.expect("the long query must not be touched by an aborted pause");
    c.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn max_pause_reopens_the_gate_by_itself() {
    let f = fixture();
    let db = f.database("pause_max").await;
    let proxy = f.proxy(|c| c.cutover.max_pause = Duration::from_millis(600)).await;
    let c = proxy.connect(&db).await;
    // Taken before the gate closes: the wait is at least max_pause however slow
    // the machine (a lower bound on causality, not on speed).
    let started = Instant::now();
    proxy.admin("PAUSE").await.unwrap();
    c.simple_query("SELECT 1").await.expect("released by max_pause");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(600), "{waited:?}");
    let st = proxy.admin("SHOW STATUS").await.unwrap();
    assert_eq!(status(&st, "paused"), "false");
    let stats = proxy.admin("SHOW STATS").await.unwrap();
    assert_eq!(status(&stats, "max_pause_expired"), "1");
    let rows = proxy.admin("RESUME").await.expect("a RESUME after it is a no-op that says so");
    assert_eq!(rows[0][0].as_deref(), Some("already open"), "nothing left to resume: {rows:?}");
}

#[tokio::test]
async fn notifications_reach_a_held_client_and_its_request_runs_after_resume() {
    let f = fixture();
    let db = f.database("pause_notify").await;
    let proxy = f.proxy(|c| c.auth.method = AuthMethod::Trust).await;
    let mut raw = Raw::connect(proxy.port()).await;
    raw.startup(&[("user", "app"), ("database", &db)]).await;
    raw.until_ready().await;
    raw.query("LISTEN jobs").await;
    raw.until_ready().await;
    proxy.admin("PAUSE").await.unwrap();
    raw.query("SELECT 'after resume'").await;
    // Straight to blue: through the proxy this NOTIFY would be held too.
    f.blue().execute(&db, "NOTIFY jobs, 'while held'").await.unwrap();
    let m = raw.recv().await.expect("a notification while held");
    assert_eq!(m.tag, b'A');
    assert!(m.body.ends_with(b"jobs\0while held\0"));
    proxy.admin("RESUME").await.unwrap();
    let reply = raw.until_ready().await;
    assert!(reply.iter().any(|m| m.tag == b'D' && m.body.ends_with(b"after resume")));
}

#[tokio::test]
async fn a_client_connecting_during_a_pause_logs_in_and_holds_its_first_request() {
    let f = fixture();
    let db = f.database("pause_newcomer").await;
    let proxy: TestProxy = f.proxy(|_| {}).await;
    proxy.admin("PAUSE").await.unwrap();
    let c = tokio::time::timeout(Duration::from_secs(5), proxy.connect(&db)).await.expect("login is not held");
    let q = tokio::spawn(async move { c.query_one("SELECT 42", &[]).await.map(|r| r.get::<_, i32>(0)) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!q.is_finished());
    proxy.admin("RESUME").await.unwrap();
    assert_eq!(q.await.unwrap().unwrap(), 42);
}

#[tokio::test]
async fn extended_batches_and_copy_are_held_whole_and_run_in_order() {
    let f = fixture();
    let db = f.database("pause_batches").await;
    let proxy = f.proxy(|_| {}).await;
    let c = std::sync::Arc::new(proxy.connect(&db).await);
    c.batch_execute("CREATE TABLE log (n int, at timestamptz DEFAULT clock_timestamp())").await.unwrap();
    let insert = c.prepare("INSERT INTO log (n) VALUES ($1)").await.unwrap();
    proxy.admin("PAUSE").await.unwrap();
    let c2 = c.clone();
    let work = tokio::spawn(async move {
        // Pipelined: all of these are sent before any answer comes.
        let (a, b, d) = tokio::join!(c2.execute(&insert, &[&1i32]), c2.execute(&insert, &[&2i32]), c2.execute(&insert, &[&3i32]));
        a.unwrap();
        b.unwrap();
        d.unwrap();
        use futures::SinkExt;
        let sink = c2.copy_in("COPY log (n) FROM STDIN").await.unwrap();
        futures::pin_mut!(sink);
        sink.send(bytes::Bytes::from_static(b"4\n5\n")).await.unwrap();
        sink.finish().await.unwrap();
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(f, &db, "SELECT count(*) FROM log").await, 0);
    proxy.admin("RESUME").await.unwrap();
    work.await.unwrap();
    let ns: Vec<i32> = f.blue().connect(&db).await.unwrap().query("SELECT n FROM log ORDER BY at", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(ns, vec![1, 2, 3, 4, 5]);
}

/// The reproduction: a transaction ended at the drain deadline, then a
/// reused prepared statement, a simple statement and COMMIT. Nothing may succeed
/// that did not happen, and nothing may be committed.
#[tokio::test]
async fn a_reused_prepared_statement_after_the_deadline_gets_the_40001_and_nothing_commits() {
    let f = fixture();
    let db = f.database("pause_prepared_reuse").await;
    let proxy = f.proxy(|c| c.cutover.on_drain_timeout = OnDrainTimeout::Cancel).await;
    let c = proxy.connect(&db).await;
    c.batch_execute("CREATE TABLE t (n int)").await.unwrap();
    let insert = c.prepare("INSERT INTO t VALUES ($1)").await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    c.execute(&insert, &[&1i32]).await.unwrap();
    let rows = proxy.admin("PAUSE 200ms").await.expect("the deadline ends the idle transaction");
    assert_eq!(rows[0][3].as_deref(), Some("1"), "{rows:?}");
    proxy.admin("RESUME").await.unwrap();

    let e = c.execute(&insert, &[&2i32]).await.expect_err("the reused prepared statement must not succeed");
    assert_eq!(sqlstate(&e), "40001", "{e}");
    let e = c.batch_execute("INSERT INTO t VALUES (3)").await.expect_err("inside the failed transaction");
    assert_eq!(sqlstate(&e), "25P02");
    let e = c.execute(&insert, &[&4i32]).await.expect_err("inside the failed transaction");
    assert_eq!(sqlstate(&e), "25P02");
    let done = c.simple_query("COMMIT").await.unwrap();
    assert!(done.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::CommandComplete(_))));
    assert_eq!(count(f, &db, "SELECT count(*) FROM t").await, 0, "a row of the ended transaction was committed");
    // The session goes on normally.
    c.execute(&insert, &[&5i32]).await.unwrap();
    assert_eq!(count(f, &db, "SELECT count(*) FROM t").await, 1);
}

/// tokio-postgres's copy_in sends two Syncs and gets one ReadyForQuery: afterwards
/// the session is idle, a pause waits for nobody and holds its next query.
#[tokio::test]
async fn after_copy_in_through_the_extended_protocol_a_pause_drains_at_once_and_holds() {
    let f = fixture();
    let db = f.database("pause_copy_in").await;
    let proxy = f.proxy(|_| {}).await;
    let c = std::sync::Arc::new(proxy.connect(&db).await);
    c.batch_execute("CREATE TABLE t (n int)").await.unwrap();
    {
        use futures::SinkExt;
        let sink = c.copy_in("COPY t FROM STDIN").await.unwrap();
        futures::pin_mut!(sink);
        sink.send(bytes::Bytes::from_static(b"1\n2\n")).await.unwrap();
        assert_eq!(sink.finish().await.unwrap(), 2);
    }
    // `finish` returns at CommandComplete; the ReadyForQuery after it may still be
    // on its way (a busy server sends it late).
    let idle = || async { proxy.admin("SHOW SESSIONS").await.unwrap().iter().all(|r| r[5].as_deref() == Some("idle")) };
    assert!(common::eventually(10, idle).await, "the COPY never ended: {:?}", proxy.admin("SHOW SESSIONS").await);
    let rows = proxy.admin("PAUSE 300ms").await.expect("no session in flight");
    assert_eq!(rows[0][2].as_deref(), Some("0"), "{rows:?}");
    let c2 = c.clone();
    let q = tokio::spawn(async move { c2.execute("INSERT INTO t VALUES (3)", &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!q.is_finished(), "the query went through the closed gate");
    assert_eq!(count(f, &db, "SELECT count(*) FROM t").await, 2);
    proxy.admin("RESUME").await.unwrap();
    q.await.unwrap().unwrap();
    assert_eq!(count(f, &db, "SELECT count(*) FROM t").await, 3);
}

/// psql killed while its INSERT is held: after RESUME the INSERT must not run (an
/// application that retried elsewhere would write twice).
#[tokio::test]
async fn a_held_insert_of_a_killed_psql_never_runs() {
    let f = fixture();
    let db = f.database("pause_psql_killed").await;
    let proxy = f.proxy(|_| {}).await;
    proxy.connect(&db).await.batch_execute("CREATE TABLE t (n int)").await.unwrap();
    proxy.admin("PAUSE").await.unwrap();
    let conninfo = format!("host=127.0.0.1 port={} user=app password={} dbname={db}", proxy.port(), common::PASSWORD);
    let mut psql = tokio::process::Command::new(common::pg_program("psql"))
        .args(["-X", &conninfo, "-c", "INSERT INTO t VALUES (1)"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let p = proxy.proxy().clone();
    assert!(common::eventually(10, || async { p.gate().held_now() == 1 }).await, "psql's INSERT is held");
    psql.kill().await.unwrap();
    assert!(common::eventually(10, || async { p.sessions.is_empty() }).await, "the held session ended with its client");
    proxy.admin("RESUME").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(f, &db, "SELECT count(*) FROM t").await, 0, "the INSERT of a client that had left ran");
}

/// PAUSE without a duration waits for the drain up to drain_timeout (not
/// max_pause), and says when the gate reopens by itself; a RESUME after the gate
/// reopened by itself changes nothing and says so (it used to fail "not paused").
#[tokio::test]
async fn pause_bounds_its_drain_by_drain_timeout_and_says_when_the_gate_reopens_by_itself() {
    let f = fixture();
    let db = f.database("pause_bounds").await;
    let proxy = f
        .proxy(|c| {
            c.cutover.drain_timeout = Duration::from_millis(200);
            c.cutover.max_pause = Duration::from_millis(800);
            c.cutover.on_drain_timeout = pgcutover::config::OnDrainTimeout::Abort;
        })
        .await;
    let c = proxy.connect(&db).await;
    c.batch_execute("BEGIN").await.unwrap();
    // Bounded by max_pause instead, it would fail as "max_pause (800ms) reached".
    let e = proxy.admin("PAUSE").await.expect_err("the open transaction is in the way");
    assert!(e.message.contains("drain did not finish within 200ms"), "bounded by drain_timeout: {}", e.message);
    c.batch_execute("COMMIT").await.unwrap();

    let rows = proxy.admin("PAUSE").await.unwrap();
    assert!(rows[0][4].as_deref().is_some_and(|t| t.contains('T')), "says when the gate reopens by itself: {rows:?}");
    assert!(common::eventually(10, || async { !proxy.proxy().gate().is_closed() }).await, "max_pause reopened the gate");
    let rows = proxy.admin("RESUME").await.expect("RESUME after the gate reopened by itself is no error");
    assert_eq!(rows[0][0].as_deref(), Some("already open"), "{rows:?}");
    assert!(rows[0][2].as_deref().is_some_and(|n| n.contains("max_pause")), "{rows:?}");
    assert!(proxy.admin("RESUME").await.unwrap()[0][0].as_deref() == Some("already open"));
    proxy.admin("PAUSE 1s").await.unwrap();
    proxy.admin("RESUME").await.unwrap();
    assert!(proxy.admin("RESUME").await.is_err(), "after an operator's RESUME a second one is refused, as before");
}
