//! Switchover to a physical standby: a primary ("blue") and its streaming standby
//! ("green", `pg_basebackup -R -c fast`), a pair per test (a switchover uses one
//! up), the proxy in front with `standby_of`.

mod common;

use std::time::Duration;

use common::cut::pgbench;
use pgcutover::cluster::{Cluster, ClusterOptions};

struct Physical {
    blue: Cluster,
    green: Cluster,
}

/// A primary with the bench tables in `db` (owned by `app`) and its standby,
/// caught up.
async fn physical_pair(db: &str) -> Physical {
    let options = ClusterOptions {
        // The way back is pg_rewind.
        // (and the WAL back to the last checkpoint before the switch).
        settings: vec!["wal_log_hints = on".into(), "full_page_writes = on".into(), "wal_keep_size = '256MB'".into()],
        ..Default::default()
    };
    let blue = tokio::task::spawn_blocking(move || Cluster::start("blue", &options)).await.unwrap().unwrap();
    blue.execute("postgres", &format!("CREATE ROLE app LOGIN PASSWORD '{}'", common::PASSWORD)).await.unwrap();
    blue.execute("postgres", &format!("CREATE DATABASE {db} OWNER app")).await.unwrap();
    blue.execute(db, &format!("SET ROLE app; {} {}", pgcutover::cluster::PGBENCH_SCHEMA, pgcutover::cluster::pgbench_rows(10_000))).await.unwrap();
    let blue = std::sync::Arc::new(blue);
    let b = blue.clone();
    let green = tokio::task::spawn_blocking(move || Cluster::start_standby("green", &b)).await.unwrap().unwrap();
    let blue = std::sync::Arc::into_inner(blue).unwrap();
    let pair = Physical { blue, green };
    pair.caught_up().await;
    pair
}

impl Physical {
    async fn caught_up(&self) {
        let blue = self.blue.connect("postgres").await.unwrap();
        let green = self.green.connect("postgres").await.unwrap();
        let lsn: String = blue.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
        assert!(
            common::eventually(30, || async { green.query_one("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", &[&lsn]).await.unwrap().get::<_, bool>(0) }).await,
            "the standby did not catch up"
        );
    }

    /// `extra`: more `[cutover]` lines. The deadlines that are not under test are
    /// generous: a busy machine must not fail a test by slowing a transaction down.
    fn config(&self, socket_dir: &std::path::Path, db: &str, extra: &str) -> String {
        self.config_on(socket_dir, "127.0.0.1:0", db, extra)
    }

    fn config_on(&self, socket_dir: &std::path::Path, listen: &str, db: &str, extra: &str) -> String {
        format!(
            r#"
            [proxy]
            listen = "{listen}"
            socket_dir = "{socket_dir}"
            [auth]
            method = "scram-sha-256"
            [[auth.users]]
            name = "app"
            password = "{password}"
            [backends.blue]
            host = "127.0.0.1"
            port = {blue}
            tls = "disable"
            [backends.green]
            host = "127.0.0.1"
            port = {green}
            tls = "disable"
            standby_of = "blue"
            [cutover]
            active = "blue"
            target = "green"
            databases = ["{db}"]
            drain_timeout = "30s"
            {extra}
            "#,
            socket_dir = socket_dir.display(),
            password = common::PASSWORD,
            blue = self.blue.port,
            green = self.green.port,
        )
    }
}

/// A session that holds state: a custom setting, a SQL and a protocol-level
/// prepared statement, a LISTEN.
async fn stateful_session(proxy: &common::TestProxy, db: &str) -> (tokio_postgres::Client, tokio_postgres::Statement, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let url = proxy.conninfo("app", common::PASSWORD, db);
    let (client, mut conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = futures::StreamExt::next(&mut messages).await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    client.batch_execute("SET app.tenant = '7'; PREPARE next_order AS INSERT INTO orders (client) VALUES (-1) RETURNING id; LISTEN news").await.unwrap();
    let stmt = client.prepare("SELECT abalance FROM pgbench_accounts WHERE aid = $1").await.unwrap();
    (client, stmt, rx)
}

#[tokio::test]
async fn a_switchover_under_load_loses_nothing_and_the_way_back_is_the_same_command() {
    let db = "phys";
    let pair = physical_pair(db).await;
    let proxy = common::proxy_from(|dir| pair.config(dir, db, "max_pause = \"60s\"")).await;
    let (session, stmt, mut notes) = stateful_session(&proxy, db).await;

    let load = pgbench(proxy.port(), db, "prepared", 8, 4);
    let switch = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        common::cut::cutover(&proxy, "green").await
    };
    let ((processed, _), report) = tokio::join!(load, switch);
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    assert_eq!(report["kind"], "physical", "{report:#?}");
    for phase in ["preflight", "prewarm", "drain", "fence", "catchup", "promote", "repoint"] {
        assert!(report.contains_key(&format!("phase_{phase}_ms")), "the report has no {phase}: {report:#?}");
    }
    assert!(!report.contains_key("phase_sequences_ms"), "{report:#?}");
    let notes_text: Vec<&String> = report.iter().filter(|(k, _)| k.starts_with("note_")).map(|(_, v)| v).collect();
    assert!(notes_text.iter().any(|n| n.contains("physical replication carries them")), "{report:#?}");
    assert!(notes_text.iter().any(|n| n.contains("pg_rewind")), "{report:#?}");
    assert_eq!(proxy.proxy().active_backend().name, "green");

    // Every committed transaction is on the promoted server, once; its sequence
    // goes on without a duplicate key.
    let green = pair.green.connect(db).await.unwrap();
    let recovering: bool = green.query_one("SELECT pg_is_in_recovery()", &[]).await.unwrap().get(0);
    assert!(!recovering, "green was not promoted");
    let (count, distinct): (i64, i64) = {
        let r = green.query_one("SELECT count(*), count(DISTINCT id) FROM orders", &[]).await.unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(count, processed, "every committed order is on green");
    assert_eq!(distinct, count);
    let balances: bool = green
        .query_one("SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT coalesce(sum(delta), 0) FROM pgbench_history)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(balances, "balances do not match the history");
    let login: bool = green.query_one("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'app'", &[]).await.unwrap().get(0);
    assert!(login, "app cannot log in on the promoted server");

    // The held session kept everything, runs read-write there and still listens.
    let tenant: String = session.query_one("SELECT current_setting('app.tenant')", &[]).await.unwrap().get(0);
    assert_eq!(tenant, "7");
    let id: i64 = session.query_one("EXECUTE next_order", &[]).await.unwrap().get(0);
    assert!(id > 0);
    session.query_one(&stmt, &[&1i32]).await.unwrap();
    let (server, ro): (bool, String) = {
        let r = session.query_one("SELECT pg_is_in_recovery(), current_setting('transaction_read_only')", &[]).await.unwrap();
        (r.get(0), r.get(1))
    };
    assert!(!server, "the session is not on the promoted server");
    assert_eq!(ro, "off");
    let other = proxy.connect(db).await;
    other.batch_execute("NOTIFY news, 'after'").await.unwrap();
    let heard = tokio::time::timeout(Duration::from_secs(10), notes.recv()).await;
    assert_eq!(heard.ok().flatten().as_deref(), Some("after"), "the LISTEN did not move");

    // The old primary stays fenced.
    let blue = pair.blue.connect(db).await.unwrap();
    let fenced: String = blue.query_one("SHOW default_transaction_read_only", &[]).await.unwrap().get(0);
    assert_eq!(fenced, "on");
    let blue_login: bool = blue.query_one("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'app'", &[]).await.unwrap().get(0);
    assert!(!blue_login, "app can still log in on the old primary");
    drop(blue);

    // The way back: the old primary rewound into a standby of green, checked, and
    // the same command under load.
    // pg_rewind reads the new primary's timeline from its control file, written by
    // the checkpoint that follows a promotion (a spread one, unless asked for).
    pair.green.execute("postgres", "CHECKPOINT").await.unwrap();
    let (b, g) = (std::sync::Arc::new(pair.blue), std::sync::Arc::new(pair.green));
    let (b2, g2) = (b.clone(), g.clone());
    tokio::task::spawn_blocking(move || b2.rewind_from(&g2)).await.unwrap().unwrap();
    let pair = Physical { blue: std::sync::Arc::into_inner(b).unwrap(), green: std::sync::Arc::into_inner(g).unwrap() };
    let green_admin = pair.green.connect("postgres").await.unwrap();
    let lsn: String = green_admin.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    let blue_admin = pair.blue.connect("postgres").await.unwrap();
    assert!(
        common::eventually(30, || async { blue_admin.query_one("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", &[&lsn]).await.unwrap().get::<_, bool>(0) }).await,
        "the rewound blue does not follow green: {}",
        std::fs::read_to_string(pair.blue.log_path()).unwrap_or_default().lines().rev().take(15).collect::<Vec<_>>().join("\n")
    );
    let checks = pgcutover::cutover::check(proxy.proxy(), Some("blue")).await.unwrap();
    let failed: Vec<String> = checks.iter().filter(|c| !c.ok && c.guards_data).map(|c| c.to_string()).collect();
    assert!(failed.is_empty(), "{failed:?}");
    assert!(checks.iter().any(|c| c.name.contains("streams from the source") && c.ok), "{checks:?}");

    let load = pgbench(proxy.port(), db, "prepared", 4, 3);
    let back = async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        common::cut::cutover(&proxy, "blue").await
    };
    let ((more, _), report) = tokio::join!(load, back);
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    assert_eq!(report["kind"], "physical");
    let blue = pair.blue.connect(db).await.unwrap();
    let on_blue: i64 = blue.query_one("SELECT count(*) FROM orders WHERE client >= 0", &[]).await.unwrap().get(0);
    assert_eq!(on_blue, processed + more, "every order of both runs is on blue");
    let ro: String = blue.query_one("SELECT current_setting('transaction_read_only')", &[]).await.unwrap().get(0);
    assert_eq!(ro, "off", "blue is writable again");
    let id2: i64 = session.query_one("EXECUTE next_order", &[]).await.unwrap().get(0);
    assert!(id2 > id, "the sequence went back: {id2} after {id}");
}

#[tokio::test]
async fn a_stopped_standby_refuses_the_switchover() {
    let db = "phys_stopped";
    let pair = physical_pair(db).await;
    let proxy = common::proxy_from(|dir| pair.config(dir, db, "")).await;
    let client = proxy.connect(db).await;
    pair.green.stop();
    let report = common::cut::cutover(&proxy, "green").await;
    assert_eq!(report["outcome"], "refused", "{report:#?}");
    assert!(report["reason"].contains("cannot connect"), "{report:#?}");
    assert_eq!(proxy.proxy().active_backend().name, "blue");
    client.batch_execute("INSERT INTO orders (client) VALUES (1)").await.unwrap();
}

#[tokio::test]
async fn a_standby_stuck_in_replay_rolls_back_with_no_error() {
    let db = "phys_stuck";
    let pair = physical_pair(db).await;
    let proxy = common::proxy_from(|dir| pair.config(dir, db, "catchup_timeout = \"1s\"\nmax_pause = \"60s\"")).await;
    // Replay waits for ever on a lock conflict with a query on the standby.
    let green_admin = pair.green.connect("postgres").await.unwrap();
    green_admin.batch_execute("ALTER SYSTEM SET max_standby_streaming_delay = -1").await.unwrap();
    green_admin.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    let reader = pair.green.connect(db).await.unwrap();
    reader.batch_execute("BEGIN; SELECT count(*) FROM pgbench_branches").await.unwrap();
    pair.blue.execute(db, "BEGIN; LOCK TABLE pgbench_branches IN ACCESS EXCLUSIVE MODE; COMMIT").await.unwrap();

    let load = pgbench(proxy.port(), db, "prepared", 8, 4);
    let switch = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        common::cut::cutover(&proxy, "green").await
    };
    let ((processed, _), report) = tokio::join!(load, switch);
    assert_eq!(report["outcome"], "rolled back", "{report:#?}");
    assert_eq!(report["failed_phase"], "catchup", "{report:#?}");
    assert_eq!(proxy.proxy().active_backend().name, "blue");
    let blue = pair.blue.connect(db).await.unwrap();
    let on_blue: i64 = blue.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0);
    assert_eq!(on_blue, processed, "every committed order is on blue");
    let ro: String = blue.query_one("SHOW default_transaction_read_only", &[]).await.unwrap().get(0);
    assert_eq!(ro, "off", "blue is still fenced");
    let login: bool = blue.query_one("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'app'", &[]).await.unwrap().get(0);
    assert!(login);
    // Green was never promoted, and follows again once the reader lets go.
    let recovering: bool = green_admin.query_one("SELECT pg_is_in_recovery()", &[]).await.unwrap().get(0);
    assert!(recovering, "green was promoted by a rolled-back switchover");
    reader.batch_execute("ROLLBACK").await.unwrap();
    pair.caught_up().await;
}

#[tokio::test]
async fn a_promotion_that_fails_after_the_point_of_no_return_says_what_to_do_and_never_unfences_the_source() {
    let db = "phys_lost";
    let pair = physical_pair(db).await;
    let proxy = common::proxy_from(|dir| pair.config(dir, db, "max_pause = \"5s\"")).await;
    let client = proxy.connect(db).await;
    client.batch_execute("INSERT INTO orders (client) VALUES (1)").await.unwrap();
    // The standby goes away between the journaled point of no return and pg_promote().
    let green = std::sync::Arc::new(pair.green);
    let g = green.clone();
    proxy.proxy().cutover.set_hook(Some(std::sync::Arc::new(move |at| {
        let g = g.clone();
        Box::pin(async move {
            if at == "repointed" {
                tokio::task::spawn_blocking(move || g.stop()).await.unwrap();
            }
            Ok(())
        })
    })));
    let report = common::cut::cutover(&proxy, "green").await;
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    assert!(report["reason"].contains("was not confirmed") && report["reason"].contains("pg_promote"), "{report:#?}");
    assert!(report["reason"].contains("blue stays fenced"), "{report:#?}");
    assert_eq!(proxy.proxy().active_backend().name, "green", "the proxy never goes back to a source a standby may have replaced");
    let blue = pair.blue.connect(db).await.unwrap();
    let fenced: String = blue.query_one("SHOW default_transaction_read_only", &[]).await.unwrap().get(0);
    assert_eq!(fenced, "on", "the source was unfenced");
    drop(green);
}

#[tokio::test]
async fn a_proxy_killed_after_the_switchovers_point_of_no_return_promotes_the_standby_at_its_next_start() {
    let db = "phys_crash";
    let pair = physical_pair(db).await;
    let s = common::Served::start_text(|dir, listen| pair.config_on(dir, listen, db, ""), &[("PGCUTOVER_TEST_HOOK", "repointed:abort")]).await;
    let c = s.connect("app", common::PASSWORD, db).await.unwrap();
    c.batch_execute("INSERT INTO orders (client) VALUES (1)").await.unwrap();
    let (ok, _, _) = s.cli(&["cutover", "--json"]).await;
    assert!(!ok, "the proxy died in the middle");
    let (dir, port) = s.exited().await;
    // Killed before pg_promote(): green is still a standby, blue fenced.
    let green = pair.green.connect(db).await.unwrap();
    let recovering: bool = green.query_one("SELECT pg_is_in_recovery()", &[]).await.unwrap().get(0);
    assert!(recovering);
    let s = common::Served::run(dir, port).await;
    let c = s.connect("app", common::PASSWORD, db).await.expect("the restarted proxy serves");
    let port: i32 = c.query_one("SELECT inet_server_port()", &[]).await.unwrap().get(0);
    assert_eq!(port as u16, pair.green.port, "the restarted proxy serves on the promoted standby");
    c.batch_execute("INSERT INTO orders (client) VALUES (2)").await.unwrap();
    let n: i64 = green.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
    let blue = pair.blue.connect(db).await.unwrap();
    let fenced: String = blue.query_one("SHOW default_transaction_read_only", &[]).await.unwrap().get(0);
    assert_eq!(fenced, "on", "the old primary stays fenced");
}

#[tokio::test]
async fn a_client_that_logs_in_during_the_switchover_completes_its_login_on_the_promoted_server() {
    let db = "phys_login";
    let pair = physical_pair(db).await;
    let proxy = common::proxy_from(|dir| pair.config(dir, db, "max_pause = \"60s\"")).await;
    let existing = proxy.connect(db).await;
    // The switchover waits after its catch-up, when the standby has replayed the
    // fence's NOLOGIN, until the test lets it go on.
    let (reached_tx, reached) = tokio::sync::oneshot::channel::<()>();
    let reached_tx = std::sync::Mutex::new(Some(reached_tx));
    let go = std::sync::Arc::new(tokio::sync::Notify::new());
    let g = go.clone();
    proxy.proxy().cutover.set_hook(Some(std::sync::Arc::new(move |at| {
        let g = g.clone();
        let reached = if at == "catchup" { reached_tx.lock().unwrap().take() } else { None };
        Box::pin(async move {
            if let Some(tx) = reached {
                let _ = tx.send(());
                g.notified().await;
            }
            Ok(())
        })
    })));
    let p = proxy.proxy().clone();
    let switch = tokio::spawn(async move { pgcutover::admin::execute(&p, "CUTOVER green").await.map(|r| r.rows()) });
    reached.await.unwrap();
    let green = pair.green.connect("postgres").await.unwrap();
    let login: bool = green.query_one("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'app'", &[]).await.unwrap().get(0);
    assert!(!login, "the standby has replayed the fence's NOLOGIN");
    let url = proxy.conninfo("app", common::PASSWORD, db);
    let newcomer = tokio::spawn(async move {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        c.query_one("INSERT INTO orders (client) VALUES (7) RETURNING pg_is_in_recovery()", &[]).await.map(|r| r.get::<_, bool>(0))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!newcomer.is_finished(), "the login waits for the pause to end");
    go.notify_one();
    let rows = switch.await.unwrap().expect("CUTOVER answers");
    let report: std::collections::HashMap<String, String> = rows.into_iter().map(|r| (r[0].clone().unwrap_or_default(), r[1].clone().unwrap_or_default())).collect();
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    let recovering = newcomer.await.unwrap().expect("the login completes after the switchover");
    assert!(!recovering, "the newcomer writes on the promoted server");
    existing.batch_execute("INSERT INTO orders (client) VALUES (8)").await.unwrap();
}
