//! The cutover's side effects are journaled before they are made: a fault at any
//! step, a step that hangs past max_pause, and a proxy killed mid-fence all leave
//! the source as it was — writable, the roles LOGIN, postgresql.auto.conf as before
//! — and a proxy killed after its repoint comes back on the target.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::cut::{auto_conf, blue_writable, cutover, replicated, serial, ROLES};
use common::{fixture, Fixture, Served};
use pgcutover::cutover::hooks::{Hook, POINTS};

async fn roles_can_log_in(f: &Fixture) {
    let c = f.blue().connect("postgres").await.unwrap();
    let without: Vec<String> = c
        .query("SELECT rolname::text FROM pg_roles WHERE rolname = ANY($1) AND NOT rolcanlogin", &[&ROLES])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(without.is_empty(), "roles left without LOGIN on blue: {without:?}");
}

fn hook(point: &'static str, stall: bool) -> Hook {
    Arc::new(move |at| {
        Box::pin(async move {
            if at != point {
                Ok(())
            } else if stall {
                std::future::pending().await
            } else {
                Err(())
            }
        })
    })
}

#[tokio::test]
async fn a_fault_or_a_hang_at_any_step_rolls_back_and_leaves_the_source_as_it_was() {
    let _serial = serial().await;
    let f = fixture();
    let db = "jr_faults";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("proxy.state");
    let proxy = f
        .proxy(|c| {
            c.cutover.state_file = Some(state.clone());
            c.cutover.max_pause = Duration::from_secs(1);
        })
        .await;
    let c = proxy.connect(db).await;
    let auto_before = auto_conf(f.blue());
    let journal = pgcutover::cutover::journal::path_for(&state);
    let before_repoint = POINTS.iter().take_while(|p| **p != "repointed");
    let hangs = ["fence.read_only", "fence.no_login", "catchup"];
    let cases = before_repoint.map(|p| (*p, false)).chain(hangs.iter().map(|p| (*p, true)));
    for (point, stall) in cases {
        proxy.proxy().cutover.set_hook(Some(hook(point, stall)));
        let report = cutover(&proxy, "green").await;
        assert_ne!(report["outcome"], "committed", "{point}: {report:#?}");
        if stall {
            assert!(report["reason"].contains("max_pause"), "{point}: {report:#?}");
        } else {
            assert!(report["reason"].contains(point), "{point}: {report:#?}");
        }
        assert_eq!(auto_conf(f.blue()), auto_before, "{point}: postgresql.auto.conf changed");
        blue_writable(f, db).await;
        roles_can_log_in(f).await;
        assert!(!journal.exists(), "{point}: the journal is left behind");
        c.batch_execute("INSERT INTO t (v) VALUES (1)").await.unwrap_or_else(|e| panic!("{point}: the client saw {e}"));
        let port: i32 = c.query_one("SELECT inet_server_port()", &[]).await.unwrap().get(0);
        assert_eq!(port as u16, f.blue().port, "{point}: the session left blue");
    }
    proxy.proxy().cutover.set_hook(None);
    let report = cutover(&proxy, "green").await;
    assert_eq!(report["outcome"], "committed", "{report:#?}");
}

async fn cutover_cli(s: &Served) -> (bool, String, String) {
    s.cli(&["cutover", "--json"]).await
}

#[tokio::test]
async fn a_proxy_killed_mid_fence_undoes_the_fence_before_it_serves_again() {
    let _serial = serial().await;
    let f = fixture();
    let db = "jr_killed";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    let auto_before = auto_conf(f.blue());
    let with_db = |t: String| t.replace("target = \"green\"", &format!("target = \"green\"\n            databases = [\"{db}\"]"));
    let s = Served::start_env(with_db, &[("PGCUTOVER_TEST_HOOK", "fence.no_login:abort")]).await;
    let c = s.connect("app", common::PASSWORD, db).await.unwrap();
    c.batch_execute("INSERT INTO t (v) VALUES (1)").await.unwrap();
    let (ok, out, err) = cutover_cli(&s).await;
    assert!(!ok, "the proxy died mid-cutover: {out}{err}");
    let (dir, port) = s.exited().await;
    // As kill -9 left it: fenced.
    assert_ne!(auto_conf(f.blue()), auto_before, "the fence had begun");
    let blue = f.blue().connect("postgres").await.unwrap();
    let login: bool = blue.query_one("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'app'", &[]).await.unwrap().get(0);
    assert!(!login, "the fence had taken LOGIN");

    let s = Served::run(dir, port).await;
    assert_eq!(auto_conf(f.blue()), auto_before, "the restart undid ALTER SYSTEM");
    blue_writable(f, db).await;
    roles_can_log_in(f).await;
    let c = s.connect("app", common::PASSWORD, db).await.expect("the restarted proxy serves");
    c.batch_execute("INSERT INTO t (v) VALUES (2)").await.unwrap();
    let port: i32 = c.query_one("SELECT inet_server_port()", &[]).await.unwrap().get(0);
    assert_eq!(port as u16, f.blue().port, "the restarted proxy serves on blue");
    let (ok, out, err) = cutover_cli(&s).await;
    assert!(ok, "a cutover after the recovery commits: {out}{err}");
}

#[tokio::test]
async fn a_proxy_killed_after_its_repoint_comes_back_on_the_target() {
    let _serial = serial().await;
    let f = fixture();
    let db = "jr_forward";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    let with_db = |t: String| t.replace("target = \"green\"", &format!("target = \"green\"\n            databases = [\"{db}\"]"));
    let s = Served::start_env(with_db, &[("PGCUTOVER_TEST_HOOK", "repointed:abort")]).await;
    let c = s.connect("app", common::PASSWORD, db).await.unwrap();
    c.batch_execute("INSERT INTO t (v) VALUES (1)").await.unwrap();
    let (ok, _, _) = cutover_cli(&s).await;
    assert!(!ok);
    let (dir, port) = s.exited().await;
    let s = Served::run(dir, port).await;
    let c = s.connect("app", common::PASSWORD, db).await.expect("the restarted proxy serves");
    let port: i32 = c.query_one("SELECT inet_server_port()", &[]).await.unwrap().get(0);
    assert_eq!(port as u16, f.green().port, "the restarted proxy serves on green");
    c.batch_execute("INSERT INTO t (v) VALUES (2)").await.unwrap();
    let green = f.green().connect(db).await.unwrap();
    let enabled: bool = green.query_one("SELECT subenabled FROM pg_subscription WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())", &[]).await.unwrap().get(0);
    assert!(!enabled, "the roll forward disabled the subscription");
}

#[tokio::test]
async fn sigterm_in_the_middle_of_a_cutover_rolls_back_before_the_proxy_exits() {
    let _serial = serial().await;
    let f = fixture();
    let db = "jr_sigterm";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    let auto_before = auto_conf(f.blue());
    let edit = |t: String| {
        t.replace("target = \"green\"", &format!("target = \"green\"\n            databases = [\"{db}\"]\n            max_pause = \"60s\"\n            catchup_timeout = \"60s\""))
    };
    // The cutover stops at catch-up, fenced, until the signal comes.
    let s = Served::start_env(edit, &[("PGCUTOVER_TEST_HOOK", "catchup:stall")]).await;
    let c = s.connect("app", common::PASSWORD, db).await.unwrap();
    c.batch_execute("INSERT INTO t (v) VALUES (1)").await.unwrap();
    let cli = {
        let (bin, path) = (env!("CARGO_BIN_EXE_pgcutover"), s.config_path());
        tokio::spawn(async move { tokio::process::Command::new(bin).args(["cutover", "--json", "--config"]).arg(path).output().await.unwrap() })
    };
    assert!(common::eventually(30, || async { auto_conf(f.blue()) != auto_before }).await, "the fence began: {}", s.log());
    let held = {
        let c = s.connect("app", common::PASSWORD, db).await.unwrap();
        tokio::spawn(async move { c.batch_execute("INSERT INTO t (v) VALUES (2)").await })
    };
    s.signal(libc::SIGTERM);
    let out = cli.await.unwrap();
    assert!(!out.status.success(), "the cutover cannot commit after SIGTERM: {}", String::from_utf8_lossy(&out.stdout));
    let (dir, _) = s.exited().await;
    assert_eq!(auto_conf(f.blue()), auto_before, "SIGTERM left ALTER SYSTEM behind");
    blue_writable(f, db).await;
    roles_can_log_in(f).await;
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with(".journal")).collect();
    assert!(leftovers.is_empty(), "the journal is left behind: {leftovers:?}");
    // The held request either ran on blue or its session was ended by the shutdown;
    // it never ran on green.
    let _ = held.await.unwrap();
    let green = f.green().connect(db).await.unwrap();
    let enabled: bool = green.query_one("SELECT bool_and(subenabled) FROM pg_subscription WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())", &[]).await.unwrap().get(0);
    assert!(enabled, "the subscription still runs");
}
