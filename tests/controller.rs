//! The cutover controller against what broke it in the field: a typo in the
//! source's configuration, SET ROLE and custom settings, enum-typed prepared
//! statements, several subscriptions, descending and never-called sequences,
//! connection churn, a stalled target, a non-UTF-8 client, an operator's RESUME.
//! After each: the source as it was, and clients that saw only a delay.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::cut::{auto_conf, blue_writable, cutover, replicated, serial};
use common::{fixture, Raw};

#[tokio::test]
async fn a_typo_in_the_source_configuration_refuses_the_cutover_and_leaves_the_source_as_it_was() {
    let _serial = serial().await;
    let f = fixture();
    let db = "ctl_typo";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    let proxy = f.proxy(|c| c.cutover.max_pause = std::time::Duration::from_secs(2)).await;
    let c = proxy.connect(db).await;
    c.batch_execute("INSERT INTO t (v) VALUES (1)").await.unwrap();
    let conf = f.blue().data_dir().join("postgresql.conf");
    let good = std::fs::read_to_string(&conf).unwrap();
    let auto_before = auto_conf(f.blue());
    std::fs::write(&conf, format!("{good}\nwrok_mem = '4MB'\n")).unwrap();

    let report = cutover(&proxy, "green").await;
    std::fs::write(&conf, &good).unwrap();
    assert_ne!(report["outcome"], "committed", "{report:#?}");
    assert!(report["reason"].contains("wrok_mem") || report["reason"].contains("configuration"), "the reason names the broken file: {report:#?}");
    assert_eq!(auto_conf(f.blue()), auto_before, "postgresql.auto.conf is as it was");
    // The operator fixes the typo and reloads: the source must not turn read-only.
    f.blue().execute("postgres", "SELECT pg_reload_conf()").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    blue_writable(f, db).await;
    c.batch_execute("INSERT INTO t (v) VALUES (2)").await.expect("the client saw only a delay");
}

#[tokio::test]
async fn set_role_and_custom_settings_move_with_the_session() {
    let _serial = serial().await;
    let f = fixture();
    let db = "ctl_role";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, tenant int)").await;
    for c in [f.blue(), f.green()] {
        c.execute("postgres", "CREATE ROLE probe_reader NOLOGIN; GRANT probe_reader TO app").await.unwrap();
    }
    let proxy = f.proxy(|_| {}).await;
    let c = proxy.connect(db).await;
    c.batch_execute("SET app.tenant = '7'; SET ROLE probe_reader").await.unwrap();
    // Through the extended protocol, by set_config.
    let other = proxy.connect(db).await;
    other.query("SELECT set_config('app.user', 'u1', false)", &[]).await.unwrap();

    let report = cutover(&proxy, "green").await;
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    let row = c.query_one("SELECT current_user::text, current_setting('app.tenant', true), inet_server_port()", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(2) as u16, f.green().port);
    assert_eq!(row.get::<_, String>(0), "probe_reader", "the moved session keeps its role");
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("7"));
    let user: Option<String> = other.query_one("SELECT current_setting('app.user', true)", &[]).await.unwrap().get(0);
    assert_eq!(user.as_deref(), Some("u1"));
}

#[tokio::test]
async fn an_enum_typed_prepared_statement_moves_with_its_type_found_by_name() {
    let _serial = serial().await;
    let f = fixture();
    let db = "ctl_enum";
    // Types get other OIDs on green.
    f.green()
        .execute("postgres", "DO $$ BEGIN FOR i IN 1..40 LOOP EXECUTE format('CREATE TYPE burn%s AS ENUM (''x'')', i); EXECUTE format('DROP TYPE burn%s', i); END LOOP; END $$")
        .await
        .unwrap();
    replicated(f, db, "CREATE TYPE mood AS ENUM ('sad', 'ok'); CREATE TABLE t (id bigserial PRIMARY KEY, m mood)").await;
    let mut oids = Vec::new();
    for c in [f.blue(), f.green()] {
        oids.push(c.connect(db).await.unwrap().query_one("SELECT 'mood'::regtype::oid", &[]).await.unwrap().get::<_, u32>(0));
    }
    assert_ne!(oids[0], oids[1], "the test needs different OIDs on each side");
    let proxy = f.proxy(|_| {}).await;
    let c = proxy.connect(db).await;
    let _stmt = c.prepare("SELECT $1 = 'sad'::mood").await.unwrap();
    let name: String = c.query_one("SELECT name FROM pg_prepared_statements WHERE statement = 'SELECT $1 = ''sad''::mood'", &[]).await.unwrap().get(0);

    let report = cutover(&proxy, "green").await;
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    assert_eq!(report["sessions_closed"], "0", "{report:#?}");
    let rows = c.simple_query(&format!("EXECUTE {name}('sad')")).await.expect("the statement runs on green");
    let value = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(value.as_deref(), Some("t"));
    let types: String = c.query_one("SELECT parameter_types::text FROM pg_prepared_statements WHERE name = $1", &[&name]).await.unwrap().get(0);
    assert_eq!(types, "{mood}");
}

#[tokio::test]
async fn every_subscription_from_the_source_is_waited_for_and_disabled() {
    let _serial = serial().await;
    let f = fixture();
    let db = "ctl_subs";
    for c in [f.blue(), f.green()] {
        c.execute("postgres", &format!("CREATE DATABASE {db} OWNER app")).await.unwrap();
        c.execute(db, "SET ROLE app; CREATE TABLE a (id bigserial PRIMARY KEY, v int); CREATE TABLE b (id bigserial PRIMARY KEY, v int)").await.unwrap();
    }
    f.blue().execute(db, "CREATE PUBLICATION pub_a FOR TABLE a; CREATE PUBLICATION pub_b FOR TABLE b").await.unwrap();
    for t in ["a", "b"] {
        f.green()
            .execute(db, &format!("CREATE SUBSCRIPTION ctl_sub_{t} CONNECTION 'host=127.0.0.1 port={} user=postgres dbname={db}' PUBLICATION pub_{t}", f.blue().port))
            .await
            .unwrap();
    }
    let green = f.green().connect(db).await.unwrap();
    assert!(
        common::eventually(60, || async {
            green.query_one("SELECT count(*) FILTER (WHERE srsubstate <> 'r') = 0 AND count(*) = 2 FROM pg_subscription_rel", &[]).await.unwrap().get::<_, bool>(0)
        })
        .await
    );
    let proxy = f.proxy(|_| {}).await;
    let c = proxy.connect(db).await;
    c.batch_execute("INSERT INTO a (v) VALUES (1)").await.unwrap();
    // b's apply is held back on green while rows arrive on blue.
    let locker = f.green().connect(db).await.unwrap();
    locker.batch_execute("BEGIN; LOCK TABLE b IN ACCESS EXCLUSIVE MODE").await.unwrap();
    for v in 0..3 {
        c.execute("INSERT INTO b (v) VALUES ($1)", &[&v]).await.unwrap();
    }
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        locker.batch_execute("ROLLBACK").await.unwrap();
    });
    let report = cutover(&proxy, "green").await;
    release.await.unwrap();
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    let n: i64 = green.query_one("SELECT count(*) FROM b", &[]).await.unwrap().get(0);
    assert_eq!(n, 3, "every row written before the switch is on green when it commits");
    let enabled: i64 = green.query_one("SELECT count(*) FROM pg_subscription WHERE subenabled AND subname LIKE 'ctl_sub_%'", &[]).await.unwrap().get(0);
    assert_eq!(enabled, 0, "both subscriptions from blue are disabled");
}

#[tokio::test]
async fn descending_never_called_and_ahead_sequences_continue_on_the_target_without_going_back() {
    let _serial = serial().await;
    let f = fixture();
    let db = "ctl_seq";
    replicated(f, db, "CREATE SEQUENCE down_seq INCREMENT -1 MAXVALUE -1 START -1; CREATE SEQUENCE fresh_seq START 1000; CREATE TABLE t (id bigserial PRIMARY KEY)").await;
    f.blue().execute(db, "SELECT nextval('down_seq') FROM generate_series(1, 5); SELECT setval('fresh_seq', 5000, false); INSERT INTO t DEFAULT VALUES").await.unwrap();
    // Green's own sequence is already ahead of blue's: it must not go back.
    f.green().execute(db, "SELECT setval('t_id_seq', 1000)").await.unwrap();
    let proxy = f.proxy(|c| c.cutover.sequence_margin = 10).await;
    let c = proxy.connect(db).await;
    let report = cutover(&proxy, "green").await;
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    let row = c.query_one("SELECT nextval('down_seq'), nextval('fresh_seq'), nextval('t_id_seq')", &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), -16, "a descending sequence continues downwards, past the margin");
    assert_eq!(row.get::<_, i64>(1), 5010, "a never-called sequence continues where it would have");
    assert_eq!(row.get::<_, i64>(2), 1001, "a sequence already ahead on the target is left alone");
}

#[tokio::test]
async fn a_cutover_under_connection_churn_commits_and_fails_no_transaction() {
    let _serial = serial().await;
    let f = fixture();
    let db = "ctl_churn";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    let proxy = f.proxy(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("churn.sql");
    std::fs::write(&script, "BEGIN;\nINSERT INTO t (v) VALUES (1);\nSELECT pg_sleep(0.02);\nINSERT INTO t (v) VALUES (2);\nCOMMIT;\n").unwrap();
    let port = proxy.port().to_string();
    let bench = tokio::process::Command::new(common::pg_program("pgbench"))
        .args(["-h", "127.0.0.1", "-p", &port, "-U", "app", "-n", "-C", "-c", "16", "-j", "1", "-T", "4", "-f"])
        .arg(&script)
        .arg(db)
        .env("PGPASSWORD", common::PASSWORD)
        .output();
    let bench = tokio::spawn(bench);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let report = cutover(&proxy, "green").await;
    let out = bench.await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    assert!(out.status.success(), "pgbench failed: {stdout}{stderr}");
    assert!(!stderr.contains("aborted") && !stdout.contains("aborted"), "{stdout}{stderr}");
    let done: i64 = stdout.lines().find_map(|l| l.strip_prefix("number of transactions actually processed: ")).and_then(|n| n.split('/').next()?.trim().parse().ok()).expect("pgbench's count");
    let green = f.green().connect(db).await.unwrap();
    let rows: i64 = green.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(rows, 2 * done, "every committed transaction is on green, exactly once");
}

#[tokio::test]
async fn a_target_that_accepts_and_never_answers_refuses_the_cutover_in_bounded_time() {
    let _serial = serial().await;
    let f = fixture();
    let db = "ctl_stall";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let sink = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let proxy = f
        .proxy(|c| {
            let green = c.backends.get_mut("green").unwrap();
            green.port = port;
            green.connect_timeout = Duration::from_secs(1);
        })
        .await;
    let c = proxy.connect(db).await;
    // A hang is the defect: the bound here only turns it into a failure.
    let report = tokio::time::timeout(Duration::from_secs(60), cutover(&proxy, "green")).await.expect("the cutover answers");
    assert_ne!(report["outcome"], "committed");
    let again = tokio::time::timeout(Duration::from_secs(60), cutover(&proxy, "green")).await.expect("the cutover answers again");
    assert!(!again["reason"].contains("already running"), "the first cutover still holds the lock: {again:#?}");
    c.batch_execute("INSERT INTO t (v) VALUES (1)").await.expect("the client saw nothing");
    sink.abort();
    blue_writable(f, db).await;
}

#[tokio::test]
async fn a_latin1_session_keeps_its_statement_text_byte_for_byte() {
    let _serial = serial().await;
    let f = fixture();
    let db = "ctl_latin1";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v text)").await;
    let proxy = f.proxy(|c| c.auth.method = pgcutover::config::AuthMethod::Trust).await;
    let mut raw = Raw::connect(proxy.port()).await;
    raw.startup(&[("user", "app"), ("database", db), ("client_encoding", "LATIN1")]).await;
    assert!(raw.until_ready().await.iter().all(|m| m.tag != b'E'));
    raw.send_message(b'Q', b"PREPARE latin AS SELECT 'caf\xe9'::text, length('caf\xe9')\0").await;
    assert!(raw.until_ready().await.iter().all(|m| m.tag != b'E'));

    let report = cutover(&proxy, "green").await;
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    assert_eq!(report["sessions_closed"], "0", "{report:#?}");
    raw.query("EXECUTE latin").await;
    let answer = raw.until_ready().await;
    let row = answer.iter().find(|m| m.tag == b'D').unwrap_or_else(|| panic!("no row: {:?}", answer.iter().map(|m| (m.tag as char, m.message())).collect::<Vec<_>>()));
    // One DataRow: two columns, 'caf\xe9' (4 bytes) and '4'.
    assert_eq!(&row.body[..], b"\x00\x02\x00\x00\x00\x04caf\xe9\x00\x00\x00\x014");
}

#[tokio::test]
async fn an_operators_resume_cannot_end_a_cutovers_pause() {
    let _serial = serial().await;
    let f = fixture();
    let db = "ctl_resume";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    let proxy = f.proxy(|c| c.cutover.catchup_timeout = Duration::from_secs(8)).await;
    let c = proxy.connect(db).await;
    let green = f.green().connect(db).await.unwrap();
    green.batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE").await.unwrap();
    c.batch_execute("INSERT INTO t (v) VALUES (1)").await.unwrap();
    let running = {
        let proxy = proxy.proxy().clone();
        tokio::spawn(async move { pgcutover::admin::execute(&proxy, "CUTOVER green").await })
    };
    assert!(common::eventually(10, || async { proxy.proxy().gate().paused_for().is_some() }).await);
    let resumed = proxy.admin("RESUME").await;
    assert!(resumed.is_err(), "RESUME opened the gate in the middle of a cutover");
    green.batch_execute("ROLLBACK").await.unwrap();
    let report = running.await.unwrap().expect("CUTOVER answers");
    assert!(report.rows().iter().any(|r| r[0].as_deref() == Some("outcome") && r[1].as_deref() == Some("committed")), "{:?}", report.rows());
    c.batch_execute("INSERT INTO t (v) VALUES (2)").await.unwrap();
}

/// The rule: a copy of a session's state is current until the session starts its
/// next request (any statement may change session state, a function calling
/// set_config included); a session that ran anything since its copy reads its
/// state again when it moves, and copies it again when it changed (also inside a
/// function, where no statement text shows it).
#[tokio::test]
async fn a_session_that_changes_its_state_after_its_copy_moves_with_the_change() {
    let _serial = serial().await;
    let f = fixture();
    let db = "ctl_recopy";
    replicated(
        f,
        db,
        "CREATE TABLE t (id bigserial PRIMARY KEY, v int); \
         CREATE FUNCTION quietly() RETURNS void LANGUAGE plpgsql AS $$ BEGIN PERFORM set_config('statement_timeout', '77s', false); END $$",
    )
    .await;
    let proxy = f.proxy(|_| {}).await;
    let c = proxy.connect(db).await;
    c.batch_execute("SET work_mem = '7MB'").await.unwrap();
    // A session whose requests after the copy change nothing: it moves with it.
    let d = proxy.connect(db).await;
    d.batch_execute("SET work_mem = '5MB'").await.unwrap();
    // The cutover stops after prewarm (the state is copied) until the test says.
    let reached = std::sync::Arc::new(tokio::sync::Notify::new());
    let go = std::sync::Arc::new(tokio::sync::Notify::new());
    let (r, g) = (reached.clone(), go.clone());
    let hook: pgcutover::cutover::hooks::Hook = std::sync::Arc::new(move |at| {
        let (r, g) = (r.clone(), g.clone());
        Box::pin(async move {
            if at == "prewarm" {
                r.notify_one();
                g.notified().await;
            }
            Ok(())
        })
    });
    proxy.proxy().cutover.set_hook(Some(hook));
    let running = {
        let proxy = proxy.proxy().clone();
        tokio::spawn(async move { pgcutover::admin::execute(&proxy, "CUTOVER green").await })
    };
    reached.notified().await;
    c.batch_execute("SET work_mem = '9MB'; PREPARE later AS SELECT 2; SELECT set_config('app.step', 'after', false)").await.unwrap();
    // A change no statement text shows: a function sets it.
    c.batch_execute("SELECT quietly()").await.unwrap();
    d.batch_execute("BEGIN; INSERT INTO t (v) VALUES (1); COMMIT; SELECT 1").await.unwrap();
    go.notify_one();
    let rows = running.await.unwrap().expect("CUTOVER answers").rows();
    let get = |k: &str| rows.iter().find(|r| r[0].as_deref() == Some(k)).and_then(|r| r[1].clone()).unwrap_or_default();
    assert_eq!(get("outcome"), "committed", "{rows:?}");
    assert_eq!(get("sessions_prepared"), "2", "the states were copied before the pause");
    let row = c.query_one("SELECT current_setting('work_mem'), current_setting('app.step', true), inet_server_port()", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(2) as u16, f.green().port);
    assert_eq!(row.get::<_, String>(0), "9MB", "the change after the copy moved too");
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("after"));
    c.batch_execute("EXECUTE later").await.expect("the statement prepared after the copy exists on green");
    let timeout: String = c.query_one("SELECT current_setting('statement_timeout')", &[]).await.unwrap().get(0);
    assert_eq!(timeout, "77s", "a setting changed inside a function moved too");
    let row = d.query_one("SELECT current_setting('work_mem'), inet_server_port()", &[]).await.unwrap();
    assert_eq!((row.get::<_, String>(0).as_str(), row.get::<_, i32>(1) as u16), ("5MB", f.green().port), "the unchanged session moved with its copy");
}

#[tokio::test]
async fn session_authorization_moves_with_the_session() {
    let _serial = serial().await;
    let f = fixture();
    let db = "ctl_auth";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    for c in [f.blue(), f.green()] {
        c.execute("postgres", "CREATE ROLE ctl_su SUPERUSER LOGIN PASSWORD 'su-secret'").await.unwrap();
    }
    let proxy = f
        .proxy(|c| {
            c.auth.users.push(pgcutover::config::UserConfig { name: "ctl_su".into(), password: Some("su-secret".into()), admin: false });
        })
        .await;
    let c = proxy.connect_as("ctl_su", "su-secret", db).await.unwrap();
    c.batch_execute("SET SESSION AUTHORIZATION app; SET app.tenant = '3'").await.unwrap();

    let report = cutover(&proxy, "green").await;
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    assert_eq!(report["sessions_closed"], "0", "{report:#?}");
    let row = c.query_one("SELECT session_user::text, current_user::text, current_setting('app.tenant', true), inet_server_port()", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(3) as u16, f.green().port);
    assert_eq!((row.get::<_, String>(0).as_str(), row.get::<_, String>(1).as_str()), ("app", "app"), "the session authorization moved");
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("3"));
    // It is still the superuser's session underneath: RESET goes back to it.
    c.batch_execute("RESET SESSION AUTHORIZATION").await.unwrap();
    let user: String = c.query_one("SELECT session_user::text", &[]).await.unwrap().get(0);
    assert_eq!(user, "ctl_su");
}

#[tokio::test]
async fn a_subscription_from_another_publisher_refuses_the_cutover_unless_listed() {
    let _serial = serial().await;
    let f = fixture();
    let db = "ctl_elsewhere";
    let other = "ctl_elsewhere_other";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    // A second subscription in the same target database, fed by another database.
    f.blue().execute("postgres", &format!("CREATE DATABASE {other}")).await.unwrap();
    f.blue().execute(other, "CREATE TABLE side (id int PRIMARY KEY); CREATE PUBLICATION side_pub FOR TABLE side").await.unwrap();
    for c in [f.blue(), f.green()] {
        c.execute(db, "CREATE TABLE side (id int PRIMARY KEY)").await.unwrap();
    }
    f.green()
        .execute(db, &format!("CREATE SUBSCRIPTION side_feed CONNECTION 'host=127.0.0.1 port={} user=postgres dbname={other}' PUBLICATION side_pub", f.blue().port))
        .await
        .unwrap();

    let proxy = f.proxy(|c| c.cutover.databases = vec![db.into()]).await;
    let c = proxy.connect(db).await;
    let report = cutover(&proxy, "green").await;
    assert_ne!(report["outcome"], "committed", "{report:#?}");
    assert!(report["reason"].contains("side_feed"), "the refusal names the subscription: {report:#?}");
    blue_writable(f, db).await;
    c.batch_execute("INSERT INTO t (v) VALUES (1)").await.unwrap();
    drop(proxy);

    let proxy = f
        .proxy(|c| {
            c.cutover.databases = vec![db.into()];
            c.cutover.other_subscriptions = vec!["side_feed".into()];
        })
        .await;
    let report = cutover(&proxy, "green").await;
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    let green = f.green().connect(db).await.unwrap();
    let subs: Vec<(String, bool)> = green
        .query("SELECT subname::text, subenabled FROM pg_subscription WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database()) ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(subs.contains(&("side_feed".into(), true)), "a listed subscription from elsewhere is left running: {subs:?}");
    assert!(subs.iter().filter(|(n, _)| n != "side_feed").all(|(_, on)| !on), "the subscription from the source is disabled: {subs:?}");
    green.batch_execute("ALTER SUBSCRIPTION side_feed DISABLE; ALTER SUBSCRIPTION side_feed SET (slot_name = NONE); DROP SUBSCRIPTION side_feed").await.unwrap();
    f.blue().execute("postgres", "SELECT pg_drop_replication_slot('side_feed')").await.unwrap();
}

#[tokio::test]
async fn a_prepared_transaction_on_the_source_refuses_the_cutover_until_it_is_finished() {
    let _serial = serial().await;
    let f = fixture();
    let db = "ctl_2pc";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    let blue = f.blue().connect(db).await.unwrap();
    blue.batch_execute("BEGIN; INSERT INTO t (v) VALUES (1); PREPARE TRANSACTION 'ctl_2pc_pending'").await.unwrap();
    let proxy = f.proxy(|c| c.cutover.databases = vec![db.into()]).await;
    let c = proxy.connect(db).await;

    let report = cutover(&proxy, "green").await;
    assert_ne!(report["outcome"], "committed", "{report:#?}");
    assert!(report["reason"].contains("ctl_2pc_pending"), "the refusal names the transaction: {report:#?}");
    blue_writable(f, db).await;
    c.batch_execute("INSERT INTO t (v) VALUES (2)").await.unwrap();

    blue.batch_execute("COMMIT PREPARED 'ctl_2pc_pending'").await.unwrap();
    let report = cutover(&proxy, "green").await;
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    let rows: i64 = c.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(rows, 2, "the prepared transaction's row and the client's are on green");
}

/// A RELOAD that began before the repoint and ends after it must not put the old
/// backend back: the active backend is the cutover's, whatever the file says.
#[tokio::test]
async fn a_reload_during_a_cutover_keeps_the_repoint() {
    let _serial = serial().await;
    let f = fixture();
    let db = "ctl_reload";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy.toml");
    // Many users make a reload slow (each password is stretched into a verifier).
    let mut text = f.config_text(&dir.path().join("sock"), "127.0.0.1:0");
    let users: String = (0..50).map(|i| format!("[[auth.users]]\nname = \"bulk{i}\"\npassword = \"p{i}\"\n")).collect();
    text = text.replace("[backends.blue]", &format!("{users}[backends.blue]"));
    std::fs::write(&file, text).unwrap();
    let proxy = f.proxy(|c| c.cutover.databases = vec![db.into()]).await;
    proxy.proxy().set_config_path(&file);
    let reloads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (p, r) = (proxy.proxy().clone(), reloads.clone());
    let hook: pgcutover::cutover::hooks::Hook = Arc::new(move |at| {
        let (p, r) = (p.clone(), r.clone());
        Box::pin(async move {
            if at == "sequences" || at == "repointed" {
                let p = p.clone();
                r.lock().unwrap().push(tokio::spawn(async move { p.reload().await.map(|_| ()) }));
                // Let the reload read the active backend before the repoint.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(())
        })
    });
    proxy.proxy().cutover.set_hook(Some(hook));
    let report = cutover(&proxy, "green").await;
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    let handles: Vec<_> = std::mem::take(&mut *reloads.lock().unwrap());
    assert_eq!(handles.len(), 2);
    for h in handles {
        h.await.unwrap().expect("the reloads succeed");
    }
    assert_eq!(proxy.proxy().active_backend().name, "green", "a reload put the old backend back");
    let c = proxy.connect(db).await;
    let port: i32 = c.query_one("SELECT inet_server_port()", &[]).await.unwrap().get(0);
    assert_eq!(port as u16, f.green().port);
}

#[tokio::test]
async fn a_cutover_behind_an_operators_pause_is_refused_before_it_touches_the_source() {
    let _serial = serial().await;
    let f = fixture();
    let db = "ctl_paused";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    let proxy = f.proxy(|c| c.cutover.databases = vec![db.into()]).await;
    let c = proxy.connect(db).await;
    let reached = Arc::new(std::sync::Mutex::new(Vec::new()));
    let r = reached.clone();
    let hook: pgcutover::cutover::hooks::Hook = Arc::new(move |at| {
        r.lock().unwrap().push(at);
        Box::pin(async { Ok(()) })
    });
    proxy.proxy().cutover.set_hook(Some(hook));
    proxy.admin("PAUSE").await.unwrap();
    let report = cutover(&proxy, "green").await;
    assert_ne!(report["outcome"], "committed", "{report:#?}");
    assert!(report["reason"].contains("paused"), "{report:#?}");
    let reached = reached.lock().unwrap().clone();
    assert!(!reached.iter().any(|p| p.starts_with("fence")), "the fence began behind the operator's pause: {reached:?}");
    assert!(proxy.proxy().gate().paused_for().is_some(), "the operator's pause stays");
    proxy.admin("RESUME").await.unwrap();
    c.batch_execute("INSERT INTO t (v) VALUES (1)").await.unwrap();
    let port: i32 = c.query_one("SELECT inet_server_port()", &[]).await.unwrap().get(0);
    assert_eq!(port as u16, f.blue().port);
}

/// The fence ends a session that logs in as the application but bypasses the
/// proxy, and spares a walsender that logs in as the same role (a subscription
/// set up with the application's credentials): the scan finds both, only the
/// client backend is terminated.
#[tokio::test]
async fn the_fence_terminates_a_bypassing_session_and_spares_a_walsender_of_the_same_role() {
    let _serial = serial().await;
    let f = fixture();
    let db = "ctl_bypass";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int); CREATE TABLE r (id bigserial PRIMARY KEY)").await;
    for c in [f.blue(), f.green()] {
        c.execute("postgres", "CREATE ROLE fence_app LOGIN REPLICATION PASSWORD 'secret'").await.unwrap();
        c.execute(db, "GRANT ALL ON ALL TABLES IN SCHEMA public TO fence_app; GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO fence_app").await.unwrap();
    }
    f.blue().execute(db, "CREATE PUBLICATION pub_by_app FOR TABLE r").await.unwrap();
    f.green()
        .execute(db, &format!("CREATE SUBSCRIPTION ctl_by_app CONNECTION 'host=127.0.0.1 port={} user=fence_app password=secret dbname={db}' PUBLICATION pub_by_app WITH (copy_data = false)", f.blue().port))
        .await
        .unwrap();
    let blue = f.blue().connect(db).await.unwrap();
    let walsender = || async {
        blue.query_opt("SELECT pid FROM pg_stat_replication WHERE application_name = 'ctl_by_app' AND usename = 'fence_app'", &[]).await.unwrap().map(|r| r.get::<_, i32>(0))
    };
    assert!(common::eventually(30, || async { walsender().await.is_some() }).await, "the subscription streams as fence_app");
    let before = walsender().await;

    let proxy = f.proxy(|c| c.auth.users.push(pgcutover::config::UserConfig { name: "fence_app".into(), password: Some("secret".into()), admin: false })).await;
    let c = proxy.connect_as("fence_app", "secret", db).await.unwrap();
    c.batch_execute("INSERT INTO t (v) VALUES (1)").await.unwrap();
    let (bypass, conn) = tokio_postgres::connect(&f.blue().url("fence_app", Some("secret"), db), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    bypass.batch_execute("SELECT 1").await.unwrap();

    let report = cutover(&proxy, "green FORCE REHEARSE").await;
    assert_eq!(report["outcome"], "rehearsed", "{report:#?}");
    assert_eq!(report["terminated"], "1", "the bypassing session, and nothing else: {report:#?}");
    let err = bypass.batch_execute("SELECT 1").await.expect_err("the bypassing session was terminated");
    assert!(err.as_db_error().is_none_or(|e| e.code().code() == "57P01"), "{err:?}");
    assert_eq!(walsender().await, before, "the walsender of the same role was spared");
    c.batch_execute("INSERT INTO t (v) VALUES (2)").await.expect("the proxy's session saw only a delay");
    blue_writable(f, db).await;
    let login: bool = blue.query_one("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'fence_app'", &[]).await.unwrap().get(0);
    assert!(login, "fence_app has LOGIN again after the rehearsal");
}

/// A request that passed the gate before it closed runs read-write, however late
/// its backend reads it: here it waits behind a statement still running when the
/// pause begins. The source turns read-only (the fence's reload) only once the
/// drain is done; a backend applies a reload before the next message it reads, so
/// a reload during the drain made this transaction read-only (25006).
#[tokio::test]
async fn a_request_queued_behind_a_running_one_at_the_pause_runs_read_write() {
    let _serial = serial().await;
    let f = fixture();
    let db = "ctl_queued";
    replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    // The pause begins while the first statement runs (the prewarm waits 5 s for a
    // busy session, then goes on), and the drain waits for it: a pause of several
    // seconds, well within bounds set wide so that a busy machine cannot fail it.
    let proxy = f
        .proxy(|c| {
            c.cutover.drain_timeout = Duration::from_secs(30);
            c.cutover.max_pause = Duration::from_secs(60);
        })
        .await;
    let c = proxy.connect(db).await;
    // Sent together: the second waits in the backend's socket while the first runs.
    let running = c.simple_query("SELECT pg_sleep(7)");
    let queued = c.batch_execute("BEGIN; INSERT INTO t (v) VALUES (1); COMMIT");
    let cut = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        cutover(&proxy, "green").await
    };
    let (ran, wrote, report) = tokio::join!(running, queued, cut);
    ran.expect("the running statement finished");
    wrote.expect("the queued transaction ran read-write on the source");
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    let n: i64 = f.green().connect(db).await.unwrap().query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 1, "the row reached the target");
    c.batch_execute("INSERT INTO t (v) VALUES (2)").await.expect("the session goes on on the target");
}
