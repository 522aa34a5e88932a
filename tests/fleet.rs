//! A fleet: three `pgcutover serve` processes in front of the shared blue/green
//! pair, coordinated through a throwaway etcd, cut over together.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::cut::{bench_database, blue_writable, pgbench, serial};
use common::{fixture, Raw, Served};
use pgcutover::etcd_server::Etcd;

/// One etcd for the binary; each test has a prefix of its own.
fn etcd() -> &'static Etcd {
    static ETCD: OnceLock<Etcd> = OnceLock::new();
    ETCD.get_or_init(|| std::thread::spawn(|| Etcd::start().expect("start etcd")).join().unwrap())
}

fn fleet_section(endpoint: &str, prefix: &str, name: &str) -> String {
    format!("\n[fleet]\netcd = [\"{endpoint}\"]\nname = \"{name}\"\nprefix = \"{prefix}\"\nlease_ttl = \"2s\"\n")
}

async fn member(endpoint: &str, prefix: &str, name: &str, env: &[(&str, &str)]) -> Served {
    let (endpoint, prefix, name) = (endpoint.to_string(), prefix.to_string(), name.to_string());
    Served::start_env(move |text| text + &fleet_section(&endpoint, &prefix, &name), env).await
}

async fn members(prefix: &str, names: &[&str]) -> Vec<Served> {
    let mut v = Vec::new();
    for n in names {
        v.push(member(&etcd().endpoint, prefix, n, &[]).await);
    }
    v
}

/// Members a, b and c, assembled; a (the leader) with a test hook.
async fn trio(prefix: &str, leader_hook: &str) -> [Served; 3] {
    let endpoint = etcd().endpoint.clone();
    let a = member(&endpoint, prefix, "a", &[("PGCUTOVER_TEST_HOOK", leader_hook)]).await;
    let b = member(&endpoint, prefix, "b", &[]).await;
    let c = member(&endpoint, prefix, "c", &[]).await;
    let ms = [a, b, c];
    assembled(&ms, 3).await;
    ms
}

/// Members a and b, assembled, and database `db` (table t) replicated blue to green.
async fn two_on(db: &str, prefix: &str) -> Vec<Served> {
    common::cut::replicated(fixture(), db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    let ms = members(prefix, &["a", "b"]).await;
    assembled(&ms, 2).await;
    ms
}

/// CHECK on a member's console, once every other member has answered its census in
/// time (a busy machine may make an answer late: the check is asked again).
async fn census_check(m: &Served) -> String {
    let mut out = String::new();
    for _ in 0..20 {
        let (ok, text, err) = m.psql_console(&["CHECK"]).await;
        assert!(ok, "{text}{err}");
        out = text;
        let census = out.lines().find(|l| l.contains("every fleet member said"));
        if census.is_none_or(|l| l.contains(" ok ")) {
            return out;
        }
    }
    panic!("the other members never answered a census in time:\n{out}\n{}", m.log());
}

/// SHOW STATUS on a member's console, as name → value.
async fn status(m: &Served) -> std::collections::HashMap<String, String> {
    let (ok, out, err) = m.cli(&["status", "--json"]).await;
    assert!(ok, "{out}{err}");
    let v: std::collections::HashMap<String, serde_json::Value> = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v.into_iter().map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_owned))).collect()
}

async fn active(m: &Served) -> String {
    status(m).await.get("active_backend").cloned().unwrap_or_default()
}

/// Waits until every member sees `n` members (their leases registered).
async fn assembled(ms: &[Served], n: usize) {
    for m in ms {
        let ok = common::eventually(10, || async {
            let s = status(m).await;
            s.get("fleet_members").and_then(|v| serde_json::from_str::<Vec<serde_json::Value>>(v).ok()).map(|v| v.len()) == Some(n)
        })
        .await;
        assert!(ok, "the fleet did not assemble: {:?}\n{}", status(m).await, m.log());
    }
}

/// `pgcutover cutover --json` on `m`: the report.
async fn cutover(m: &Served, extra: &[&str]) -> (bool, serde_json::Value, String) {
    let mut args = vec!["cutover", "--json"];
    args.extend_from_slice(extra);
    let (ok, out, err) = m.cli(&args).await;
    let report = serde_json::from_str(out.trim()).unwrap_or(serde_json::Value::Null);
    (ok, report, format!("{out}{err}"))
}

/// Which server a connection through `m` lands on.
async fn lands_on(m: &Served, db: &str) -> i32 {
    let c = m.connect("app", common::PASSWORD, db).await.unwrap();
    c.query_one("SELECT current_setting('port')::int", &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn a_fleet_of_three_cuts_over_together_under_pgbench_and_a_late_instance_serves_on_the_target() {
    let _serial = serial().await;
    let f = fixture();
    let db = "fl_bench";
    bench_database(f, db).await;
    let ms = members("/t-bench", &["a", "b", "c"]).await;
    assembled(&ms, 3).await;
    let (ok, out, _) = ms[1].psql_console(&["SHOW FLEET"]).await;
    assert!(ok && out.contains(" a ") && out.contains(" b ") && out.contains(" c "), "{out}");

    // A pgbench on each member; the cutover is asked of one of them.
    let loads = futures::future::join_all(ms.iter().map(|m| pgbench(m.port, db, "prepared", 4, 6)));
    let switch = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        cutover(&ms[0], &[]).await
    };
    let (loads, (ok, report, text)) = tokio::join!(loads, switch);
    assert!(ok, "{text}\n{}", ms[0].log());
    assert_eq!(report["outcome"], "committed", "{report:#}");
    let fleet = &report["fleet"];
    assert_eq!(fleet["leader"], "a");
    assert!(fleet["decision"].as_str().unwrap().starts_with("commit to green"), "{fleet:#}");
    let outcomes: Vec<(&str, &str)> = fleet["members"].as_array().unwrap().iter().map(|m| (m["name"].as_str().unwrap(), m["outcome"].as_str().unwrap())).collect();
    assert_eq!(outcomes, vec![("a", "committed"), ("b", "committed"), ("c", "committed")], "{fleet:#}");
    // The fleet's pause spans every member's (first gate closed to last gate open).
    let pause = fleet["pause_ms"].as_f64().unwrap();
    let longest = fleet["members"].as_array().unwrap().iter().map(|m| m["pause_ms"].as_f64().unwrap()).fold(0.0, f64::max);
    assert!(pause > 0.0 && pause >= longest, "{fleet:#}");

    // Zero failed (pgbench asserts it), zero lost: every committed order on green once.
    let processed: i64 = loads.iter().map(|(n, _)| n).sum();
    let green = f.green().connect(db).await.unwrap();
    let (n, distinct): (i64, i64) = {
        let r = green.query_one("SELECT count(*), count(DISTINCT id) FROM orders", &[]).await.unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((n, distinct), (processed, processed), "orders on green vs transactions committed through the fleet");
    for m in &ms {
        assert_eq!(active(m).await, "green", "{}", m.log());
        assert_eq!(lands_on(m, db).await, i32::from(f.green().port));
    }

    // An instance started now, configured with blue, serves on green.
    let late = member(&etcd().endpoint, "/t-bench", "d", &[]).await;
    assert_eq!(active(&late).await, "green", "{}", late.log());
    assert_eq!(lands_on(&late, db).await, i32::from(f.green().port));
}

#[tokio::test]
async fn a_member_killed_during_the_drain_aborts_everywhere_and_the_survivors_clients_see_no_error() {
    let _serial = serial().await;
    let f = fixture();
    let db = "fl_kill";
    common::cut::replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    let mut ms = members("/t-kill", &["a", "b", "c"]).await;
    assembled(&ms, 3).await;
    // c holds a transaction open: its drain waits for it (drain_timeout 10 s).
    let held = ms[2].connect("app", common::PASSWORD, db).await.unwrap();
    held.batch_execute("BEGIN; INSERT INTO t (v) VALUES (0)").await.unwrap();
    let clients = [ms[0].connect("app", common::PASSWORD, db).await.unwrap(), ms[1].connect("app", common::PASSWORD, db).await.unwrap()];

    let leader = &ms[0];
    let switch = cutover(leader, &[]);
    let writes = async {
        // Writes through the survivors while the pause runs: held, then run on blue.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut results = Vec::new();
        for (i, c) in clients.iter().enumerate() {
            results.push(c.execute("INSERT INTO t (v) VALUES ($1)", &[&(i as i32 + 1)]).await);
        }
        results
    };
    let kill = async {
        // c has closed its gate and waits for its open transaction.
        assert!(common::eventually(15, || async { status(&ms[2]).await.get("paused").map(String::as_str) == Some("true") }).await, "{}", ms[2].log());
        ms[2].signal(libc::SIGKILL);
    };
    let ((ok, report, text), results, ()) = tokio::join!(switch, writes, kill);
    assert!(!ok, "{text}");
    assert_eq!(report["outcome"], "rolled_back", "{report:#}");
    let reason = report["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("member c"), "{reason}");
    for r in results {
        r.expect("a survivor's client saw no error");
    }
    for m in &ms[..2] {
        assert_eq!(active(m).await, "blue", "{}", m.log());
        assert_eq!(lands_on(m, db).await, i32::from(f.blue().port));
    }
    blue_writable(f, db).await;
    for c in &clients {
        c.execute("INSERT INTO t (v) VALUES (9)", &[]).await.expect("writes go on on blue");
    }
    let blue = f.blue().connect(db).await.unwrap();
    let n: i64 = blue.query_one("SELECT count(*) FROM t WHERE v IN (1, 2, 9)", &[]).await.unwrap().get(0);
    assert_eq!(n, 4);
    let _ = ms.pop();
}

#[tokio::test]
async fn the_leader_killed_after_the_decision_the_survivors_converge_and_its_restart_too() {
    let _serial = serial().await;
    let f = fixture();
    let db = "fl_leader";
    common::cut::replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    // The leader ends as kill -9 would right after its decision is in etcd.
    let ms = trio("/t-leader", "repointed:abort").await;
    let client = ms[1].connect("app", common::PASSWORD, db).await.unwrap();
    client.execute("INSERT INTO t (v) VALUES (1)", &[]).await.unwrap();
    let [a, b, c] = ms;
    let (ok, _, text) = cutover(&a, &[]).await;
    assert!(!ok, "the leader died mid-command: {text}");
    let (dir, port) = a.exited().await;
    for m in [&b, &c] {
        assert!(common::eventually(10, || async { active(m).await == "green" }).await, "{}", m.log());
    }
    // b's session moved with the fleet and writes on green.
    client.execute("INSERT INTO t (v) VALUES (2)", &[]).await.expect("b's client goes on");
    let green = f.green().connect(db).await.unwrap();
    assert!(common::eventually(10, || async { green.query_one("SELECT count(*) FROM t WHERE v = 2", &[]).await.unwrap().get::<_, i64>(0) == 1 }).await);
    // The leader's next start reads the decision and finishes forward.
    let a = Served::run(dir, port).await;
    assert_eq!(active(&a).await, "green", "{}", a.log());
    assert_eq!(lands_on(&a, db).await, i32::from(f.green().port));
    let blue = f.blue().connect(db).await.unwrap();
    let ro: String = blue.query_one("SHOW default_transaction_read_only", &[]).await.unwrap().get(0);
    assert_eq!(ro, "on", "the source stays fenced after a committed fleet cutover");
}

#[tokio::test]
async fn with_etcd_stopped_a_cutover_is_refused_with_a_clear_reason() {
    let _serial = serial().await;
    let f = fixture();
    let db = "fl_noetcd";
    common::cut::replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    let mut own = tokio::task::spawn_blocking(|| Etcd::start().unwrap()).await.unwrap();
    let a = member(&own.endpoint, "/t-noetcd", "a", &[]).await;
    let client = a.connect("app", common::PASSWORD, db).await.unwrap();
    own.stop();
    let (ok, report, text) = cutover(&a, &[]).await;
    assert!(!ok, "{text}");
    assert_eq!(report["outcome"], "refused", "{report:#}");
    let reason = report["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("etcd") && reason.contains(&own.endpoint), "{reason}");
    client.execute("INSERT INTO t (v) VALUES (1)", &[]).await.expect("still served on blue");
    assert_eq!(active(&a).await, "blue");
    blue_writable(f, db).await;
}

/// Reads a session's BackendKeyData through a raw login.
async fn login(port: u16, db: &str) -> (Raw, i32, i32) {
    let mut raw = Raw::connect(port).await;
    raw.startup(&[("user", "trustuser"), ("database", db)]).await;
    let mut key = None;
    loop {
        let m = raw.recv().await.expect("login answers");
        match m.tag {
            b'K' => key = Some((i32::from_be_bytes(m.body[..4].try_into().unwrap()), i32::from_be_bytes(m.body[4..8].try_into().unwrap()))),
            b'Z' => break,
            b'E' => panic!("login failed: {:?}", m.message()),
            _ => {}
        }
    }
    let (pid, secret) = key.expect("BackendKeyData");
    (raw, pid, secret)
}

async fn send_cancel(port: u16, pid: i32, secret: i32) {
    let mut raw = Raw::connect(port).await;
    raw.send(&pgcutover::protocol::startup::encode_cancel(pgcutover::protocol::startup::CancelKey { pid, secret })).await;
    let _ = raw.closed().await;
}

#[tokio::test]
async fn a_cancel_sent_to_another_member_cancels_the_query_and_a_forged_key_cancels_nothing() {
    let f = fixture();
    let db = "postgres";
    let endpoint = etcd().endpoint.clone();
    let trust = |text: String| text.replace("method = \"scram-sha-256\"", "method = \"trust\"");
    let (e1, e2) = (endpoint.clone(), endpoint.clone());
    let a = Served::start(move |t| trust(t) + &fleet_section(&e1, "/t-cancel", "a")).await;
    let b = Served::start(move |t| trust(t) + &fleet_section(&e2, "/t-cancel", "b")).await;
    let ms = vec![a, b];
    assembled(&ms, 2).await;
    let (mut raw, pid, secret) = login(ms[0].port, db).await;

    // A forged key sent to b: passed on to a, which finds no such session.
    raw.query("SELECT pg_sleep(1.5)").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    send_cancel(ms[1].port, pid, secret ^ 0x5a5a).await;
    let answer = raw.until_ready().await;
    assert!(answer.iter().all(|m| m.tag != b'E'), "a forged key cancelled: {:?}", answer.iter().map(|m| m.message()).collect::<Vec<_>>());

    // The genuine key sent to b cancels the query running through a.
    // Sent again each second until it lands: a cancel that arrives before the
    // query has reached the server cancels nothing, however busy the machine is.
    raw.query("SELECT pg_sleep(60)").await;
    let error = loop {
        send_cancel(ms[1].port, pid, secret).await;
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(1), raw.recv()).await {
            if m.tag == b'E' {
                break m;
            }
        }
    };
    assert_eq!(error.sqlstate().as_deref(), Some("57014"), "{:?}", error.message());
    assert!(ms[1].log().contains("passed on"), "{}", ms[1].log());
    let _ = f;
}

#[tokio::test]
async fn the_leader_killed_after_its_fence_a_survivor_aborts_and_undoes_the_fence() {
    let _serial = serial().await;
    let f = fixture();
    let db = "fl_leaderdies";
    common::cut::replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    // The leader ends as kill -9 would once its fence is made, before any decision.
    let ms = trio("/t-leaderdies", "drain:abort").await;
    let clients = [ms[1].connect("app", common::PASSWORD, db).await.unwrap(), ms[2].connect("app", common::PASSWORD, db).await.unwrap()];
    let [a, b, c] = ms;
    let switch = cutover(&a, &[]);
    let writes = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        futures::future::join_all(clients.iter().map(|c| c.execute("INSERT INTO t (v) VALUES (1)", &[]))).await
    };
    let ((ok, _, text), results) = tokio::join!(switch, writes);
    assert!(!ok, "{text}");
    for r in results {
        r.expect("the survivors' clients saw no error: held, then run on blue");
    }
    let _ = a.exited().await;
    for m in [&b, &c] {
        assert_eq!(active(m).await, "blue", "{}", m.log());
    }
    blue_writable(f, db).await;
    assert!(common::cut::auto_conf(f.blue()).lines().all(|l| !l.contains("default_transaction_read_only")), "{}", common::cut::auto_conf(f.blue()));
    let log = format!("{}{}", b.log(), c.log());
    assert!(log.contains("undoing its fence from the journal"), "{log}");
}

#[tokio::test]
async fn a_fleet_rehearsal_says_rehearsed_for_every_member_and_leaves_everyone_on_blue() {
    let _serial = serial().await;
    let f = fixture();
    let db = "fl_rehearse";
    let ms = two_on(db, "/t-rehearse").await;
    let clients = [ms[0].connect("app", common::PASSWORD, db).await.unwrap(), ms[1].connect("app", common::PASSWORD, db).await.unwrap()];
    for c in &clients {
        c.execute("INSERT INTO t (v) VALUES (1)", &[]).await.unwrap();
    }

    let (ok, report, text) = cutover(&ms[0], &["--rehearse"]).await;
    assert!(ok, "{text}\n{}\n{}", ms[0].log(), ms[1].log());
    assert_eq!(report["outcome"], "rehearsed", "{report:#}");
    let fleet = &report["fleet"];
    let outcomes: Vec<(&str, &str)> = fleet["members"].as_array().unwrap().iter().map(|m| (m["name"].as_str().unwrap(), m["outcome"].as_str().unwrap())).collect();
    assert_eq!(outcomes, vec![("a", "rehearsed"), ("b", "rehearsed")], "a rehearsal is no rollback on any member: {fleet:#}");
    assert!(fleet["decision"].as_str().unwrap().starts_with("rehearsed"), "{fleet:#}");

    for m in &ms {
        assert_eq!(active(m).await, "blue", "{}", m.log());
    }
    blue_writable(f, db).await;
    for c in &clients {
        c.execute("INSERT INTO t (v) VALUES (2)", &[]).await.expect("the same sessions write on blue after the rehearsal");
    }
}

#[tokio::test]
async fn a_check_on_one_member_takes_the_other_members_sessions_for_theirs_and_a_direct_one_for_bypass() {
    let _serial = serial().await;
    let f = fixture();
    let db = "fl_check";
    let ms = two_on(db, "/t-check").await;
    // Sessions through both members, busy and idle in a transaction: none bypasses.
    let on_a = ms[0].connect("app", common::PASSWORD, db).await.unwrap();
    let on_b = ms[1].connect("app", common::PASSWORD, db).await.unwrap();
    let on_b_too = ms[1].connect("app", common::PASSWORD, db).await.unwrap();
    on_a.execute("INSERT INTO t (v) VALUES (1)", &[]).await.unwrap();
    on_b.execute("INSERT INTO t (v) VALUES (1)", &[]).await.unwrap();
    on_b_too.batch_execute("BEGIN; INSERT INTO t (v) VALUES (2)").await.unwrap();
    let bypass_line = |out: &str| out.lines().find(|l| l.contains("bypassing")).map(str::to_owned).unwrap_or_default();

    let out = census_check(&ms[0]).await;
    let line = bypass_line(&out);
    assert!(line.contains(" ok"), "member b's sessions were taken for sessions bypassing the fleet:\n{out}\n{}", ms[1].log());

    // A session straight to blue is named, from either member.
    let (direct, conn) = tokio_postgres::connect(&f.blue().url("app", Some(common::PASSWORD), db), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let pid: i32 = direct.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    for m in &ms {
        let out = census_check(m).await;
        let line = bypass_line(&out);
        assert!(line.contains(&format!("(pid {pid})")), "the direct session is not named:\n{out}");
        assert_eq!(line.matches("(pid ").count(), 1, "only the direct session bypasses:\n{out}");
    }
    on_b_too.batch_execute("COMMIT").await.unwrap();
}
