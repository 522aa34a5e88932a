//! The admin console through psql, the CLI, and signals, against the real binary.

mod common;

use std::time::Duration;

use common::{fixture, Served, PASSWORD};

#[tokio::test]
async fn every_console_command_answers_through_psql() {
    let s = Served::start(|t| t).await;
    let app = s.connect("app", PASSWORD, "postgres").await.unwrap();
    let (ok, out, err) = s.psql_console(&["SHOW STATUS", "SHOW SESSIONS", "SHOW BACKENDS", "SHOW STATS", "PAUSE 1s", "RESUME", "RELOAD"]).await;
    assert!(ok, "{err}");
    for expected in ["active_backend", "blue", "application_name", "held_since", "green", "target", "pauses", "hold_ms_p99", "paused", "resumed", "reloaded"] {
        assert!(out.contains(expected), "{expected} missing from:\n{out}");
    }
    // An unknown or malformed command is an ERROR, and the console session goes on.
    let (_, out, err) = s.psql_console(&["SHOW NONSENSE", "PAUSE later", "SHOW STATUS"]).await;
    assert!(err.contains("unknown SHOW NONSENSE"), "{err}");
    assert!(err.contains("invalid duration"), "{err}");
    assert!(out.contains("active_backend"), "the console did not go on: {out}");
    app.simple_query("SELECT 1").await.unwrap();

    // The socket directory is private.
    let mode = std::fs::metadata(s.socket_dir()).unwrap().permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o700);
}

#[tokio::test]
async fn over_tcp_the_console_needs_a_configured_admin() {
    let s = Served::start(|t| t).await;
    let e = s.connect("app", PASSWORD, "pgcutover").await.unwrap_err();
    assert_eq!(common::sqlstate(&e), "28000");

    let s = Served::start(|t| t.replace("name = \"app\"\n            password = \"secret\"", "name = \"app\"\n            password = \"secret\"\n            admin = true")).await;
    let c = s.connect("app", PASSWORD, "pgcutover").await.unwrap();
    let rows = c.simple_query("SHOW STATUS").await.unwrap();
    assert!(rows.len() > 5);
    let e = s.connect("app", "wrong", "pgcutover").await.unwrap_err();
    assert_eq!(common::sqlstate(&e), "28P01");
    let e = s.connect("pwuser", "pwpass", "pgcutover").await.unwrap_err();
    assert_eq!(common::sqlstate(&e), "28000");
}

#[tokio::test]
async fn the_cli_pauses_resumes_and_reports_and_fails_with_a_reason() {
    let s = Served::start(|t| t).await;
    let (ok, out, err) = s.cli(&["pause", "--timeout", "2s"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("status=paused"), "{out}");
    let (ok, out, _) = s.cli(&["status", "--json"]).await;
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["paused"], true, "values keep their JSON types: {v}");
    assert_eq!(v["active_backend"], "blue");
    let (ok, out, _) = s.cli(&["status"]).await;
    assert!(ok && out.contains("paused") && out.contains("true"), "{out}");
    let (ok, out, _) = s.cli(&["resume", "--json"]).await;
    assert!(ok);
    assert!(out.contains("\"status\":\"resumed\""), "{out}");
    let (ok, _, err) = s.cli(&["resume"]).await;
    assert!(!ok, "resume when not paused must fail");
    assert!(err.contains("not paused"), "{err}");
}

#[tokio::test]
async fn sighup_applies_a_good_file_and_keeps_the_running_config_on_a_broken_one() {
    let s = Served::start(|t| t).await;
    assert!(s.connect("newcomer", "fresh", "postgres").await.is_err());
    let good = std::fs::read_to_string(s.config_path()).unwrap().replace("[[auth.users]]\n            name = \"app\"", "[[auth.users]]\n            name = \"newcomer\"\n            password = \"fresh\"\n            [[auth.users]]\n            name = \"app\"");
    fixture().blue().execute("postgres", "DO $$ BEGIN CREATE ROLE newcomer LOGIN PASSWORD 'fresh'; EXCEPTION WHEN duplicate_object THEN NULL; END $$").await.unwrap();
    std::fs::write(s.config_path(), &good).unwrap();
    s.signal(libc::SIGHUP);
    assert!(common::eventually(5, || async { s.connect("newcomer", "fresh", "postgres").await.is_ok() }).await, "{}", s.log());

    std::fs::write(s.config_path(), "[proxy]\nlisten = 'not an address'\n").unwrap();
    s.signal(libc::SIGHUP);
    assert!(common::eventually(5, || async { s.log().contains("reload rejected") }).await, "{}", s.log());
    // Still serving, with the last good configuration.
    s.connect("newcomer", "fresh", "postgres").await.unwrap().simple_query("SELECT 1").await.unwrap();
    s.connect("app", PASSWORD, "postgres").await.unwrap().simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn sigterm_lets_an_open_transaction_commit_then_exits_zero() {
    let f = fixture();
    let db = f.database("console_sigterm").await;
    let mut s = Served::start(|t| t.replace("client_login_timeout = \"5s\"", "client_login_timeout = \"5s\"\n            shutdown_grace = \"10s\"")).await;
    let busy = s.connect("app", PASSWORD, &db).await.unwrap();
    let idle = s.connect("app", PASSWORD, &db).await.unwrap();
    busy.batch_execute("CREATE TABLE t (x int); BEGIN; INSERT INTO t VALUES (1)").await.unwrap();
    s.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // New connections are refused; the idle session is gone; the open transaction goes on.
    assert!(s.connect("app", PASSWORD, &db).await.is_err());
    assert!(idle.simple_query("SELECT 1").await.is_err(), "the idle session should have been closed");
    busy.batch_execute("INSERT INTO t VALUES (2); COMMIT").await.expect("the open transaction commits");
    let status = tokio::time::timeout(Duration::from_secs(10), s.child.wait()).await.expect("exits after the transaction").unwrap();
    assert!(status.success(), "{status:?}: {}", s.log());
    let n: i64 = f.blue().connect(&db).await.unwrap().query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
}

/// With clients that open a connection per transaction (`pgbench -C`), the
/// proxy's own backend connections — logging in, serving, logging out — never
/// count as sessions that bypass the proxy.
#[tokio::test]
async fn connection_churn_is_never_taken_for_sessions_bypassing_the_proxy() {
    let f = common::fixture();
    let db = "console_churn";
    f.pair.replicated_database(db, "app", "CREATE TABLE t (id bigserial PRIMARY KEY, n int)").await.unwrap();
    let proxy = f.proxy(|c| c.cutover.databases = vec![db.to_string()]).await;
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), "INSERT INTO t (n) VALUES (1);\n").unwrap();
    let url = format!("host=127.0.0.1 port={} user=app dbname={db}", proxy.port());
    let load = tokio::process::Command::new(common::pg_program("pgbench"))
        .args(["-n", "-C", "-c", "8", "-j", "2", "-t", "60", "-f"])
        .arg(script.path())
        .arg(&url)
        .env("PGPASSWORD", common::PASSWORD)
        .output();
    let checks = async {
        let mut seen = Vec::new();
        for _ in 0..15 {
            let rows = proxy.admin("CHECK").await.expect("CHECK answers");
            seen.extend(rows.into_iter().filter(|r| r[0].as_deref().is_some_and(|c| c.contains("bypassing")) && r[1].as_deref() != Some("ok")));
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        seen
    };
    let (out, bypass) = tokio::join!(load, checks);
    let out = out.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(bypass.is_empty(), "the proxy's own connections were taken for bypassing sessions: {bypass:?}");
}

/// The admin console needs no password on its Unix socket: its directory must be
/// the proxy's own. A socket_dir that someone else created (or a symlink someone
/// planted) is refused at start, not chmod'ed and used.
#[tokio::test]
async fn a_socket_directory_that_is_not_the_proxys_own_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let f = fixture();
    let base = tempfile::tempdir().unwrap();

    let elsewhere = base.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let planted = base.path().join("planted");
    std::os::unix::fs::symlink(&elsewhere, &planted).unwrap();
    let config = f.config(&planted);
    config.validate().unwrap();
    let err = pgcutover::server::start(config).await.err().expect("a symlinked socket_dir is refused");
    assert!(format!("{err:#}").contains("symbolic link"), "{err:#}");

    // Someone else's directory, world-writable as such directories often are.
    let theirs = base.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o777)).unwrap();
    let other_uid = if unsafe { libc::geteuid() } == 0 { 65534 } else { 0 };
    if std::os::unix::fs::chown(&theirs, Some(other_uid), None).is_ok() {
        let config = f.config(&theirs);
        let err = pgcutover::server::start(config).await.err().expect("someone else's socket_dir is refused");
        assert!(format!("{err:#}").contains("belongs to"), "{err:#}");
        assert_eq!(std::fs::metadata(&theirs).unwrap().permissions().mode() & 0o777, 0o777, "someone else's directory was changed");
    } else {
        // Not root: we cannot make a directory someone else's; our own still works.
        assert!(pgcutover::server::start(f.config(&base.path().join("ours"))).await.is_ok());
    }
}

/// A broken or missing configuration file is said once, not once per link of the
/// error chain ("(os error 2): No such file or directory (os error 2)").
#[tokio::test]
async fn a_broken_or_missing_configuration_is_said_once() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "[proxy]\nlisten = 127.0.0.1:6432\n").unwrap();
    let missing = dir.path().join("missing.toml");
    for (file, said) in [(&typo, "TOML parse error"), (&missing, "No such file or directory")] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgcutover")).args(["serve", "--config"]).arg(file).output().await.unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.matches(said).count(), 1, "{stderr}");
    }
}

/// The CLI says what each option does, offers only the options a command has, and
/// names the backends when a target names none.
#[tokio::test]
async fn the_cli_describes_every_option_and_names_the_backends_a_target_may_be() {
    for command in ["serve", "pause", "resume", "status", "cutover", "check", "cleanup", "loadtest", "demo"] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgcutover")).args([command, "--help"]).output().await.unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        let options = help.split("Options:").nth(1).unwrap_or_default();
        for line in options.lines().filter(|l| l.trim_start().starts_with("--") || l.trim_start().starts_with("-c")) {
            let described = line.split_whitespace().count() > 2 || line.contains("  ");
            assert!(described, "{command}: an option without a description: {line:?}\n{help}");
        }
        if command == "check" {
            assert!(!help.contains("--rehearse"), "check has no rehearsal: {help}");
        }
    }
    // One rule for durations: with their unit, or refused (10 was 10 ms here).
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgcutover")).args(["loadtest", "--url", "postgres://app@127.0.0.1:1/x", "--duration", "10"]).output().await.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no unit"), "{}", String::from_utf8_lossy(&out.stderr));
    let f = fixture();
    let proxy = f.proxy(|_| {}).await;
    assert!(proxy.admin("PAUSE 500").await.is_err(), "a bare number is refused on the console too");
    let e = proxy.admin("CHECK nosuch").await.expect_err("no such backend");
    assert!(e.message.contains("the backends are: blue, green"), "{}", e.message);
    let rows = proxy.admin("CUTOVER nosuch").await.unwrap();
    assert!(rows.iter().any(|r| r[1].as_deref().is_some_and(|v| v.contains("the backends are: blue, green"))), "{rows:?}");
}

/// scripts/test ends with its count also when a test fails, and exits non-zero
/// then (it used to stop at the failing `cargo test`, count unsaid). A stand-in
/// `cargo` reports one failed test; no nightly toolchain, so no fuzzing.
#[tokio::test]
async fn scripts_test_says_its_count_and_fails_when_a_test_fails() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let fake = |name: &str, body: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    fake("cargo", "[ \"$1\" = test ] || exit 0\necho 'test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s'\nexit 101");
    fake("rustup", "exit 0");
    let path = format!("{}:{}", dir.path().display(), std::env::var("PATH").unwrap_or_default());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test");
    let out = tokio::process::Command::new("bash").arg(&script).env("PATH", path).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert_eq!(stdout.lines().last(), Some("tests: 3 passed, 1 failed"), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
}

/// A log that goes to a file holds plain text: no colour codes, and values as
/// values, not Rust's debug text (`metrics=Some(127.0.0.1:…)`).
#[tokio::test]
async fn a_log_written_to_a_file_is_plain_text() {
    let f = fixture();
    let served = Served::start_text(|dir, listen| f.config_text(dir, listen).replacen("[proxy]", "[proxy]\nmetrics_listen = \"127.0.0.1:0\"", 1), &[]).await;
    served.cli(&["pause", "--timeout", "1s"]).await;
    served.cli(&["resume"]).await;
    let log = served.log();
    assert!(log.contains("serving /metrics") && log.contains("admin command"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log file: {log:?}");
    assert!(!log.contains("Some("), "debug text in the log: {log}");
}
