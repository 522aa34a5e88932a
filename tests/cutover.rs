//! The cutover on the fixture's blue/green pair: sessions move with their state,
//! nothing errors, nothing is lost, and every failure before the repoint rolls back.
//!
//! A fence is cluster-wide (read-only by default, application roles without LOGIN),
//! so these tests run one at a time and put the clusters back afterwards.

mod common;

use std::time::Duration;

use common::cut::{blue_writable, cutover, replicated, serial, unfence};
use common::fixture;

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
    // The cancel key the client got at login now cancels on green.
    let token = c.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(tokio_postgres::NoTls).await
    });
    let e = c.simple_query("SELECT pg_sleep(20)").await.unwrap_err();
    assert_eq!(common::sqlstate(&e), "57014");
    canceller.await.unwrap().unwrap();

    // Blue stays fenced; green no longer subscribes.
    let blue = f.blue().connect("postgres").await.unwrap();
    let ro: String = blue.query_one("SHOW default_transaction_read_only", &[]).await.unwrap().get(0);
    assert_eq!(ro, "on");
    // The subscription is gone, and its slot on blue with it (it would pin blue's
    // WAL, and stand in the way of a cutover back and forth).
    let green = f.green().connect(db).await.unwrap();
    let subs: i64 = green
        .query_one("SELECT count(*) FROM pg_subscription WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(subs, 0, "the forward subscription was dropped");
    let slots: i64 = f.blue().connect(db).await.unwrap().query_one("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()", &[]).await.unwrap().get(0);
    assert_eq!(slots, 0, "its slot on blue was dropped");
    let shown = proxy.admin("SHOW CUTOVER").await.unwrap();
    assert!(shown.iter().any(|r| r[0].as_deref() == Some("outcome") && r[1].as_deref() == Some("committed")));
    tokio::time::sleep(Duration::from_millis(10)).await;
}

async fn cutover_under_pgbench(mode: &str) {
    let _serial = serial().await;
    let f = fixture();
    let db = format!("co_bench_{mode}");
    common::cut::bench_database(f, &db).await;
    let proxy = f.proxy(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("tx.sql");
    std::fs::write(&script, pgcutover::cluster::pgbench_script(10_000)).unwrap();
    let url = format!("host=127.0.0.1 port={} user=app dbname={db}", proxy.port());
    let load = tokio::process::Command::new(common::pg_program("pgbench"))
        .args(["-n", "-M", mode, "-c", "16", "-j", "2", "-T", "6", "-f"])
        .arg(&script)
        .arg(&url)
        .env("PGPASSWORD", common::PASSWORD)
        .output();
    let switch = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        cutover(&proxy, "green").await
    };
    let (out, report) = tokio::join!(load, switch);
    let out = out.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    assert_eq!(report["sessions_moved"], "16", "{report:#?}");
    assert_eq!(report["sessions_closed"], "0", "{report:#?}");
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("number of failed transactions: 0 "), "{text}");
    let processed: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{text}"));

    // Every committed transaction's order is on green exactly once (the key
    // guarantees "once"); blue got nothing after the switch.
    let green = f.green().connect(&db).await.unwrap();
    let blue = f.blue().connect(&db).await.unwrap();
    let on_green: i64 = green.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0);
    assert_eq!(on_green, processed, "orders on green vs committed transactions");
    let blue_ids: Vec<i64> = blue.query("SELECT id FROM orders ORDER BY id", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    let blue_max = blue_ids.last().copied().unwrap_or(0);
    let green_upto: i64 = green.query_one("SELECT count(*) FROM orders WHERE id <= $1", &[&blue_max]).await.unwrap().get(0);
    assert_eq!(green_upto as usize, blue_ids.len(), "green holds exactly blue's rows up to the switch");
    assert!(on_green > blue_ids.len() as i64, "nothing was written on green after the switch");
    let (sum_history, sum_branches): (i64, i64) = {
        let r = green.query_one("SELECT (SELECT coalesce(sum(delta), 0) FROM pgbench_history)::int8, (SELECT sum(bbalance) FROM pgbench_branches)::int8", &[]).await.unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(sum_history, sum_branches, "balances and history agree on green");
    eprintln!("cutover under pgbench -M {mode}: pause {} ms, catch-up {}, phases: {}", report["pause_ms"], report[&format!("catchup_{db}")], report["json"]);
}

#[tokio::test]
async fn cutover_under_pgbench_prepared_loses_and_fails_nothing() {
    cutover_under_pgbench("prepared").await;
}

#[tokio::test]
async fn cutover_under_pgbench_extended_loses_and_fails_nothing() {
    cutover_under_pgbench("extended").await;
}

#[tokio::test]
async fn cutover_under_pgbench_simple_loses_and_fails_nothing() {
    cutover_under_pgbench("simple").await;
}

#[tokio::test]
async fn a_long_transaction_past_drain_timeout_gets_one_40001_with_cancel_and_goes_on_on_green() {
    let _serial = serial().await;
    let f = fixture();
    let db = "co_cancel";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    let proxy = f.proxy(|c| c.cutover.drain_timeout = Duration::from_millis(300)).await;
    let long = proxy.connect(db).await;
    long.batch_execute("BEGIN; INSERT INTO t (v) VALUES (1)").await.unwrap();
    let sleeper = tokio::spawn(async move {
        let r = long.simple_query("SELECT pg_sleep(20)").await;
        (long, r)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // FORCE: preflight warns of the long transaction (how long depends on the
    // machine's speed); the cancel at the deadline is what is tested.
    let report = cutover(&proxy, "green FORCE").await;
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    assert_eq!(report["sessions_cancelled"], "1");
    let (long, r) = sleeper.await.unwrap();
    assert_eq!(common::sqlstate(&r.unwrap_err()), "40001");
    long.batch_execute("ROLLBACK").await.unwrap();
    let port: i32 = long.query_one("SELECT inet_server_port()", &[]).await.unwrap().get(0);
    assert_eq!(port as u16, f.green().port);
    long.batch_execute("INSERT INTO t (v) VALUES (2)").await.unwrap();
    let vs: Vec<i32> = f.green().connect(db).await.unwrap().query("SELECT v FROM t", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(vs, vec![2], "the cancelled transaction's row must not exist");
}

#[tokio::test]
async fn a_long_transaction_past_drain_timeout_rolls_the_cutover_back_with_abort() {
    let _serial = serial().await;
    let f = fixture();
    let db = "co_abort";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    let proxy = f
        .proxy(|c| {
            c.cutover.drain_timeout = Duration::from_millis(300);
            c.cutover.on_drain_timeout = pgcutover::config::OnDrainTimeout::Abort;
        })
        .await;
    let long = proxy.connect(db).await;
    let other = proxy.connect(db).await;
    long.batch_execute("BEGIN; INSERT INTO t (v) VALUES (1)").await.unwrap();
    let sleeper = tokio::spawn(async move {
        let r = long.simple_query("SELECT pg_sleep(1)").await.map(|_| ());
        (long, r)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = cutover(&proxy, "green").await;
    assert_eq!(report["outcome"], "rolled back", "{report:#?}");
    assert_eq!(report["failed_phase"], "drain");
    let (long, r) = sleeper.await.unwrap();
    r.expect("nothing errors when the cutover aborts");
    long.batch_execute("COMMIT").await.unwrap();
    other.batch_execute("INSERT INTO t (v) VALUES (2)").await.unwrap();
    let port: i32 = other.query_one("SELECT inet_server_port()", &[]).await.unwrap().get(0);
    assert_eq!(port as u16, f.blue().port, "still on blue");
    blue_writable(f, db).await;
}

#[tokio::test]
async fn a_catch_up_timeout_rolls_back_and_unfences_blue() {
    let _serial = serial().await;
    let f = fixture();
    let db = "co_catchup";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    let proxy = f.proxy(|c| c.cutover.catchup_timeout = Duration::from_millis(500)).await;
    let c = proxy.connect(db).await;
    // Green's apply worker blocks on a lock: what blue commits cannot be applied.
    let green = f.green().connect(db).await.unwrap();
    green.batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE").await.unwrap();
    c.batch_execute("INSERT INTO t (v) VALUES (1)").await.unwrap();
    let report = cutover(&proxy, "green").await;
    assert_eq!(report["outcome"], "rolled back", "{report:#?}");
    assert_eq!(report["failed_phase"], "catchup", "{report:#?}");
    green.batch_execute("ROLLBACK").await.unwrap();
    // Clients saw only the delay: the session goes on, on blue, writable.
    c.batch_execute("INSERT INTO t (v) VALUES (2)").await.unwrap();
    let port: i32 = c.query_one("SELECT inet_server_port()", &[]).await.unwrap().get(0);
    assert_eq!(port as u16, f.blue().port);
    blue_writable(f, db).await;
    let st = proxy.admin("SHOW STATUS").await.unwrap();
    assert!(st.iter().any(|r| r[0].as_deref() == Some("active_backend") && r[1].as_deref() == Some("blue")));
}

#[tokio::test]
async fn a_disabled_subscription_a_table_without_replica_identity_or_a_dead_target_refuse_the_cutover() {
    let _serial = serial().await;
    let f = fixture();
    let db = "co_refuse";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int); CREATE TABLE loose (v int)").await;
    let proxy = f.proxy(|_| {}).await;
    let c = proxy.connect(db).await;
    // Refused while an operator holds a PAUSE: the operator's pause stays.
    proxy.admin("PAUSE").await.unwrap();
    let report = cutover(&proxy, "green").await;
    assert_eq!(report["outcome"], "refused");
    assert!(report["reason"].contains("replica identity") && report["reason"].contains("loose"), "{report:#?}");
    let st = proxy.admin("SHOW STATUS").await.unwrap();
    assert!(st.iter().any(|r| r[0].as_deref() == Some("paused") && r[1].as_deref() == Some("true")), "the cutover reopened an operator's pause");
    proxy.admin("RESUME").await.unwrap();
    f.blue().execute(db, "ALTER TABLE loose REPLICA IDENTITY FULL").await.unwrap();

    let sub = pgcutover::cluster::subscription_name(db);
    f.green().execute(db, &format!("ALTER SUBSCRIPTION {sub} DISABLE")).await.unwrap();
    let report = cutover(&proxy, "green").await;
    assert_eq!(report["outcome"], "refused");
    assert!(report["reason"].contains("disabled"), "{report:#?}");
    f.green().execute(db, &format!("ALTER SUBSCRIPTION {sub} ENABLE")).await.unwrap();

    let dead = pgcutover::cluster::free_port().unwrap();
    let proxy_dead = f.proxy(|c| c.backends.get_mut("green").unwrap().port = dead).await;
    let c2 = proxy_dead.connect(db).await;
    let report = cutover(&proxy_dead, "green").await;
    assert_ne!(report["outcome"], "committed");
    assert!(report["reason"].contains("cannot connect"), "{report:#?}");
    for client in [&c, &c2] {
        client.batch_execute("INSERT INTO t (v) VALUES (1)").await.expect("nothing errors after a refused cutover");
    }
    blue_writable(f, db).await;
}

#[tokio::test]
async fn a_session_with_a_temporary_table_is_closed_with_a_clear_error_and_counted() {
    let _serial = serial().await;
    let f = fixture();
    let db = "co_temp";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY)").await;
    let proxy = f.proxy(|_| {}).await;
    // Keep the connection's own outcome: a FATAL from the server ends it.
    let (temp, conn) = tokio_postgres::connect(&proxy.conninfo("app", common::PASSWORD, db), tokio_postgres::NoTls).await.unwrap();
    let ended = tokio::spawn(conn);
    let plain = proxy.connect(db).await;
    temp.batch_execute("CREATE TEMP TABLE scratch (x int)").await.unwrap();
    let report = cutover(&proxy, "green").await;
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    assert_eq!(report["sessions_moved"], "1");
    assert_eq!(report["sessions_closed"], "1");
    let e = tokio::time::timeout(Duration::from_secs(5), ended).await.expect("the session is closed").unwrap().unwrap_err();
    let db_error = e.as_db_error().expect("a FATAL from the proxy");
    assert!(db_error.message().contains("temporary tables"), "{}", db_error.message());
    assert!(temp.simple_query("SELECT 1").await.is_err());
    plain.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn cutover_back_from_green_to_blue_after_reversing_replication() {
    let _serial = serial().await;
    let f = fixture();
    let db = "co_back";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    let proxy = f.proxy(|_| {}).await;
    let c = proxy.connect(db).await;
    c.batch_execute("INSERT INTO t (v) VALUES (1)").await.unwrap();
    assert_eq!(cutover(&proxy, "green").await["outcome"], "committed");
    c.batch_execute("INSERT INTO t (v) VALUES (2)").await.unwrap();

    // Reverse: blue drops its stale copy's changes and subscribes to green.
    unfence(f.blue()).await;
    f.blue().execute(db, "TRUNCATE t").await.unwrap();
    f.green().execute(db, "CREATE PUBLICATION pgcutover_back FOR ALL TABLES").await.unwrap();
    f.blue()
        .execute(db, &format!("CREATE SUBSCRIPTION back_{db} CONNECTION 'host=127.0.0.1 port={} user=postgres dbname={db}' PUBLICATION pgcutover_back", f.green().port))
        .await
        .unwrap();
    let blue = f.blue().connect(db).await.unwrap();
    assert!(common::eventually(30, || async { blue.query_one("SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'", &[]).await.unwrap().get::<_, i64>(0) == 0 }).await);
    let report = cutover(&proxy, "blue").await;
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    let id: i64 = c.query_one("INSERT INTO t (v) VALUES (3) RETURNING id", &[]).await.unwrap().get(0);
    assert_eq!(id, 3, "the sequence came back along");
    let port: i32 = c.query_one("SELECT inet_server_port()", &[]).await.unwrap().get(0);
    assert_eq!(port as u16, f.blue().port);
    let vs: Vec<i32> = blue.query("SELECT v FROM t ORDER BY id", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(vs, vec![1, 2, 3]);
}

/// The running binary's active backend, through `pgcutover status --json`.
async fn active(s: &common::Served) -> String {
    let (ok, out, _) = s.cli(&["status", "--json"]).await;
    if !ok {
        return String::new();
    }
    serde_json::from_str::<serde_json::Value>(out.trim()).ok().and_then(|v| v["active_backend"].as_str().map(str::to_owned)).unwrap_or_default()
}

#[tokio::test]
async fn sigusr1_cuts_over_and_the_new_active_backend_survives_sighup_and_a_restart() {
    let _serial = serial().await;
    let f = fixture();
    let db = "co_signal";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    let s = common::Served::start(|t| t.replace("target = \"green\"", &format!("target = \"green\"\n            databases = [\"{db}\"]"))).await;
    let (ok, out, err) = s.cli(&["check"]).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("replica identity"), "{out}");

    let c = s.connect("app", common::PASSWORD, db).await.unwrap();
    c.batch_execute("INSERT INTO t (v) VALUES (1)").await.unwrap();
    s.signal(libc::SIGUSR1);
    assert!(common::eventually(15, || async { active(&s).await == "green" }).await, "{}", s.log());
    c.batch_execute("INSERT INTO t (v) VALUES (2)").await.expect("the session works after the switch");
    let port: i32 = c.query_one("SELECT inet_server_port()", &[]).await.unwrap().get(0);
    assert_eq!(port as u16, f.green().port);
    let (_, out, _) = s.psql_console(&["SHOW CUTOVER"]).await;
    assert!(out.contains("committed"), "{out}");

    s.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(active(&s).await, "green", "a reload keeps the new active backend");

    // No reverse subscription: a cutover back is refused, and the CLI says why.
    let (ok, out, err) = s.cli(&["cutover", "--to", "blue", "--json"]).await;
    assert!(!ok);
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(report["outcome"], "refused");
    assert!(err.contains("cutover refused"), "{err}");

    drop(c);
    let (dir, port) = s.stop().await;
    assert!(std::fs::read_to_string(dir.path().join("proxy.toml.state")).unwrap().contains("green"));
    let s = common::Served::run(dir, port).await;
    assert_eq!(active(&s).await, "green", "a restart comes up on the new active backend");
    let c = s.connect("app", common::PASSWORD, db).await.unwrap();
    let port: i32 = c.query_one("SELECT inet_server_port()", &[]).await.unwrap().get(0);
    assert_eq!(port as u16, f.green().port);
}

#[tokio::test]
async fn a_cutover_that_would_outlive_max_pause_rolls_back() {
    let _serial = serial().await;
    let f = fixture();
    let db = "co_max_pause";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    let proxy = f
        .proxy(|c| {
            c.cutover.max_pause = Duration::from_millis(400);
            c.cutover.catchup_timeout = Duration::from_secs(10);
        })
        .await;
    let c = proxy.connect(db).await;
    let green = f.green().connect(db).await.unwrap();
    green.batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE").await.unwrap();
    c.batch_execute("INSERT INTO t (v) VALUES (1)").await.unwrap();
    let report = cutover(&proxy, "green").await;
    assert_eq!(report["outcome"], "rolled back", "{report:#?}");
    assert_eq!(report["failed_phase"], "catchup", "{report:#?}");
    assert!(report["reason"].contains("max_pause"), "{report:#?}");
    green.batch_execute("ROLLBACK").await.unwrap();
    c.batch_execute("INSERT INTO t (v) VALUES (2)").await.expect("clients saw only the delay");
    blue_writable(f, db).await;
}

#[tokio::test]
async fn a_second_cutover_request_while_one_runs_is_refused() {
    let _serial = serial().await;
    let f = fixture();
    let db = "co_twice";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY)").await;
    let proxy = f.proxy(|_| {}).await;
    let _c = proxy.connect(db).await;
    let (a, b) = tokio::join!(cutover(&proxy, "green"), async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        cutover(&proxy, "green").await
    });
    let outcomes = [a["outcome"].as_str(), b["outcome"].as_str()];
    assert!(outcomes.contains(&"committed"), "{a:#?} {b:#?}");
    let refused = if a["outcome"] == "refused" { &a } else { &b };
    assert!(refused["reason"].contains("already running") || refused["reason"].contains("already the active"), "{refused:#?}");
}

/// A client that reads slowly while notifications pile up moves without losing or
/// repeating a byte, and learns the new server's differing ParameterStatus.
#[tokio::test]
async fn a_slow_reader_flooded_with_notifications_moves_without_losing_a_byte() {
    let _serial = serial().await;
    let f = fixture();
    let db = "co_slow_reader";
    replicated(f, db, "CREATE TABLE items (id bigserial PRIMARY KEY)").await;
    // New sessions on green see another IntervalStyle: the client must be told.
    f.green().execute("postgres", &format!("ALTER DATABASE {db} SET IntervalStyle = 'iso_8601'")).await.unwrap();
    let proxy = f.proxy(|c| c.auth.method = pgcutover::config::AuthMethod::Trust).await;
    let mut raw = common::Raw::connect(proxy.port()).await;
    raw.startup(&[("user", "app"), ("database", db)]).await;
    let hello = raw.until_ready().await;
    let pid = i32::from_be_bytes(hello.iter().find(|m| m.tag == b'K').unwrap().body[..4].try_into().unwrap());
    raw.query("LISTEN flood").await;
    raw.until_ready().await;

    let payload = "p".repeat(7000);
    let blue = f.blue().connect(db).await.unwrap();
    for i in 0..300 {
        blue.batch_execute(&format!("NOTIFY flood, '{i:04}{payload}'")).await.unwrap();
    }
    // The client reads nothing while the cutover runs.
    let report = cutover(&proxy, "green").await;
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    assert_eq!(report["sessions_moved"], "1", "{report:#?}");

    for i in 0..300 {
        let m = raw.recv().await.unwrap_or_else(|| panic!("notification {i} lost"));
        assert_eq!(m.tag, b'A', "notification {i}: stream out of step");
        assert_ne!(i32::from_be_bytes(m.body[..4].try_into().unwrap()), pid, "another session's notification");
        let expected = format!("flood\0{i:04}{payload}\0");
        assert!(m.body[4..] == *expected.as_bytes(), "notification {i} corrupted");
    }
    let m = raw.recv().await.expect("ParameterStatus after the move");
    assert_eq!(m.tag, b'S');
    assert_eq!(&m.body[..], b"IntervalStyle\0iso_8601\0");
    raw.query("SELECT inet_server_port()").await;
    let reply = raw.until_ready().await;
    let port = reply.iter().find(|m| m.tag == b'D').expect("a row");
    assert!(port.body.ends_with(f.green().port.to_string().as_bytes()), "runs on green");
    f.green().execute("postgres", &format!("ALTER DATABASE {db} RESET IntervalStyle")).await.unwrap();
}
