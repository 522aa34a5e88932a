//! The operator's safety net: a rehearsal that changes nothing, and a way back
//! that loses no write (reverse replication, then a cutover back), both under load.

mod common;

use std::time::Duration;

use common::cut::{bench_database, blue_writable, cutover, pgbench, serial};
use common::fixture;

#[tokio::test]
async fn a_rehearsal_under_load_pauses_the_clients_and_changes_nothing() {
    let _serial = serial().await;
    let f = fixture();
    let db = "sf_rehearse";
    bench_database(f, db).await;
    let proxy = f
        .proxy(|c| {
            c.cutover.databases = vec![db.into()];
        })
        .await;
    let green = f.green().connect(db).await.unwrap();
    let seq = "SELECT last_value FROM orders_id_seq";
    let green_seq_before: i64 = green.query_one(seq, &[]).await.unwrap().get(0);

    let load = pgbench(proxy.port(), db, "prepared", 8, 4);
    let rehearse = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cutover(&proxy, "green REHEARSE").await
    };
    let ((processed, _), report) = tokio::join!(load, rehearse);
    assert_eq!(report["outcome"], "rehearsed", "{report:#?}");
    assert_eq!(report["reason"], "", "{report:#?}");
    for phase in ["preflight", "prewarm", "drain", "fence", "catchup", "sequences", "rollback"] {
        assert!(report.contains_key(&format!("phase_{phase}_ms")), "the report has no {phase}: {report:#?}");
    }
    assert!(report["pause_ms"].parse::<f64>().unwrap() > 0.0, "{report:#?}");
    assert!(!report.contains_key("phase_repoint_ms"), "a rehearsal never repoints: {report:#?}");

    // Everything stayed on blue, and blue is as it was.
    assert_eq!(proxy.proxy().active_backend().name, "blue");
    blue_writable(f, db).await;
    let blue = f.blue().connect(db).await.unwrap();
    let on_blue: i64 = blue.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0);
    assert_eq!(on_blue, processed, "every committed transaction is on blue, once");
    // The target: its subscription still runs and catches up; its sequences were
    // checked, not set.
    let running: bool = green
        .query_one("SELECT bool_and(s.subenabled) AND count(w.pid) > 0 FROM pg_subscription s LEFT JOIN pg_stat_subscription w ON w.subid = s.oid AND w.relid IS NULL WHERE s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())", &[])
        .await
        .unwrap()
        .get(0);
    assert!(running, "the target's subscription stopped");
    assert!(
        common::eventually(30, || async { green.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get::<_, i64>(0) == processed }).await,
        "green did not catch up after the rehearsal"
    );
    let green_seq_after: i64 = green.query_one(seq, &[]).await.unwrap().get(0);
    assert_eq!(green_seq_after, green_seq_before, "a rehearsal set a sequence on the target");

    // A real cutover after the rehearsal commits.
    let report = cutover(&proxy, "green").await;
    assert_eq!(report["outcome"], "committed", "{report:#?}");
}

#[tokio::test]
async fn a_cutover_and_back_with_reverse_replication_keeps_every_write_exactly_once() {
    let _serial = serial().await;
    let f = fixture();
    let db = "sf_back";
    let proxy = bench_with_the_way_back(f, db).await;

    // There, under load.
    let there = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cutover(&proxy, "green").await
    };
    let ((first, _), report) = tokio::join!(pgbench(proxy.port(), db, "prepared", 8, 4), there);
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    assert!(report["reverse_replication_1"].contains("streams from slot"), "{report:#?}");
    let blue = f.blue().connect(db).await.unwrap();
    let green = f.green().connect(db).await.unwrap();
    let on_green: i64 = green.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0);
    assert_eq!(on_green, first);
    // Writes made on green flow back to blue, fenced as it is.
    assert!(
        common::eventually(30, || async { blue.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get::<_, i64>(0) == first }).await,
        "the writes on green did not flow back to blue"
    );
    let ro: String = blue.query_one("SHOW default_transaction_read_only", &[]).await.unwrap().get(0);
    assert_eq!(ro, "on", "blue stays fenced after the switch");

    // And back, under load.
    let back = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cutover(&proxy, "blue").await
    };
    let ((second, _), report) = tokio::join!(pgbench(proxy.port(), db, "prepared", 8, 4), back);
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    assert!(report["opened_target"].contains("LOGIN"), "blue was opened again: {report:#?}");
    assert_eq!(proxy.proxy().active_backend().name, "blue");
    blue_writable(f, db).await;

    // Every committed row exactly once on blue (the key says "once"), the same
    // rows green had, and the sequence went on without a duplicate key (pgbench
    // saw no failure).
    let (count, distinct): (i64, i64) = {
        let r = blue.query_one("SELECT count(*), count(DISTINCT id) FROM orders", &[]).await.unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((count, distinct), (first + second, first + second), "orders on blue vs committed transactions");
    let (sum_history, sum_branches): (i64, i64) = {
        let r = blue.query_one("SELECT (SELECT coalesce(sum(delta), 0) FROM pgbench_history)::int8, (SELECT sum(bbalance) FROM pgbench_branches)::int8", &[]).await.unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(sum_history, sum_branches, "balances and history agree on blue");
    // The way back has its own way back: blue's writes since the switch flow to green.
    assert!(report["reverse_replication_1"].contains("streams from slot"), "{report:#?}");
    assert!(
        common::eventually(30, || async { green.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get::<_, i64>(0) == first + second }).await,
        "the writes on blue did not flow to green"
    );
}

/// pgbench's tables in `db`, and a proxy that makes the way back at each cutover.
async fn bench_with_the_way_back(f: &common::Fixture, db: &str) -> common::TestProxy {
    bench_database(f, db).await;
    f.proxy(|c| {
        c.cutover.databases = vec![db.into()];
        c.cutover.reverse_replication = true;
    })
    .await
}

/// A replicated table `t` in `db`, and a proxy that makes the way back at each cutover.
async fn with_the_way_back(f: &common::Fixture, db: &str) -> common::TestProxy {
    common::cut::replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    f.proxy(|c| {
        c.cutover.databases = vec![db.into()];
        c.cutover.reverse_replication = true;
    })
    .await
}

#[tokio::test]
async fn a_rehearsal_with_reverse_replication_leaves_no_slot_or_publication_behind() {
    let _serial = serial().await;
    let f = fixture();
    let db = "sf_rehearse_back";
    let proxy = with_the_way_back(f, db).await;
    let report = cutover(&proxy, "green REHEARSE").await;
    assert_eq!(report["outcome"], "rehearsed", "{report:#?}");
    assert!(report.contains_key("phase_reverse_slot_ms"), "the slot was rehearsed: {report:#?}");
    let green = f.green().connect(db).await.unwrap();
    let left: i64 = green
        .query_one("SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pgcutover_back%' AND database = current_database()) + (SELECT count(*) FROM pg_publication WHERE pubname LIKE 'pgcutover_back%')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the rehearsal left its way back behind on green");
}

#[tokio::test]
async fn reverse_replication_that_cannot_work_is_refused_by_preflight_with_what_is_missing() {
    let _serial = serial().await;
    let f = fixture();
    let db = "sf_back_refused";
    common::cut::replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    // An admin user that can read what preflight reads, and no more.
    f.green().execute("postgres", "CREATE ROLE plain_admin LOGIN PASSWORD 'plain' IN ROLE pg_monitor").await.unwrap();
    f.green().execute(db, "GRANT SELECT ON pg_file_settings TO plain_admin; GRANT EXECUTE ON FUNCTION pg_show_all_file_settings() TO plain_admin").await.unwrap();
    let proxy = f
        .proxy(|c| {
            c.cutover.databases = vec![db.into()];
            c.cutover.reverse_replication = true;
            let green = c.backends.get_mut("green").unwrap();
            green.admin_user = "plain_admin".into();
            green.admin_password = Some("plain".into());
        })
        .await;
    let report = cutover(&proxy, "green").await;
    assert_eq!(report["outcome"], "refused", "{report:#?}");
    assert!(report["reason"].contains("neither SUPERUSER nor REPLICATION"), "{report:#?}");
    blue_writable(f, db).await;
}

/// Back and forth four times under load with the way back made at each switch:
/// every cutover commits (the third used to be refused: the first one's disabled
/// subscription stood in its way), every committed row is on the final database
/// exactly once, and no slot on either side pins WAL without a live subscriber.
#[tokio::test]
async fn four_cutovers_back_and_forth_under_load_all_commit_and_leave_no_idle_slot() {
    let _serial = serial().await;
    let f = fixture();
    let db = "sf_four";
    let proxy = bench_with_the_way_back(f, db).await;
    let mut committed = 0;
    for (i, to) in ["green", "blue", "green", "blue"].into_iter().enumerate() {
        let switch = async {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            cutover(&proxy, to).await
        };
        let ((processed, _), report) = tokio::join!(pgbench(proxy.port(), db, "prepared", 8, 3), switch);
        if report["outcome"] != "committed" {
            // What the servers said, to tell a flake from a defect.
            let errors = |c: &pgcutover::cluster::Cluster| std::fs::read_to_string(c.log_path()).unwrap_or_default().lines().filter(|l| l.contains("ERROR") || l.contains("FATAL")).map(str::to_owned).collect::<Vec<_>>().join("\n");
            panic!("cutover {} to {to}: {report:#?}\nblue:\n{}\ngreen:\n{}", i + 1, errors(f.blue()), errors(f.green()));
        }
        committed += processed;
        // The way back streams before the next switch.
        let back = if to == "green" { f.blue() } else { f.green() };
        let c = back.connect(db).await.unwrap();
        assert!(
            common::eventually(30, || async { c.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get::<_, i64>(0) == committed }).await,
            "cutover {}: the writes did not flow back",
            i + 1
        );
    }
    assert_eq!(proxy.proxy().active_backend().name, "blue");
    blue_writable(f, db).await;
    let blue = f.blue().connect(db).await.unwrap();
    let (count, distinct): (i64, i64) = {
        let r = blue.query_one("SELECT count(*), count(DISTINCT id) FROM orders", &[]).await.unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((count, distinct), (committed, committed), "every committed order exactly once on blue");
    for c in [f.blue(), f.green()] {
        let c = c.connect(db).await.unwrap();
        let idle = || async {
            c.query("SELECT slot_name::text FROM pg_replication_slots WHERE database = current_database() AND NOT active", &[]).await.unwrap().is_empty()
        };
        assert!(common::eventually(10, idle).await, "a slot without a live subscriber is left");
        let slots: i64 = c.query_one("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()", &[]).await.unwrap().get(0);
        assert!(slots <= 1, "one slot at most: the way back's");
        let publications: i64 = c.query_one("SELECT count(*) FROM pg_publication WHERE pubname LIKE 'pgcutover_back%'", &[]).await.unwrap().get(0);
        assert!(publications <= 1, "one way back publication at most");
    }
}

/// `pgcutover cleanup` lists what pgcutover left and no longer needs — an idle way
/// back slot, its publication, a disabled way back subscription — then drops it,
/// and never touches the live way back.
#[tokio::test]
async fn cleanup_lists_then_drops_the_leftovers_and_keeps_the_live_way_back() {
    let _serial = serial().await;
    let f = fixture();
    let db = "sf_cleanup";
    let proxy = with_the_way_back(f, db).await;
    let report = cutover(&proxy, "green").await;
    assert_eq!(report["outcome"], "committed", "{report:#?}");
    // What an interrupted earlier cutover could have left.
    let green = f.green().connect(db).await.unwrap();
    green.batch_execute("SELECT pg_create_logical_replication_slot('pgcutover_back_stale', 'pgoutput'); CREATE PUBLICATION pgcutover_back_stale FOR TABLE t").await.unwrap();
    let blue = f.blue().connect(db).await.unwrap();
    blue.batch_execute("SET default_transaction_read_only = off").await.unwrap();
    blue.batch_execute(&format!(
        "CREATE SUBSCRIPTION pgcutover_back_old CONNECTION 'host=127.0.0.1 port={} user=postgres dbname={db}' PUBLICATION pgcutover_back_stale WITH (connect = false)",
        f.green().port
    ))
    .await
    .unwrap();

    // Cleanup looks at every database; this test's own are in this one.
    let config = proxy.proxy().config();
    let here = |all: Vec<pgcutover::cutover::cleanup::Leftover>| all.into_iter().filter(|l| l.database == db).collect::<Vec<_>>();
    let listed = here(pgcutover::cutover::cleanup::run(&config, true).await.unwrap());
    let mut names: Vec<(String, &str, String)> = listed.iter().map(|l| (l.backend.clone(), l.kind.as_str(), l.name.clone())).collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            ("blue".to_string(), "subscription", "pgcutover_back_old".to_string()),
            ("green".to_string(), "publication", "pgcutover_back_stale".to_string()),
            ("green".to_string(), "slot", "pgcutover_back_stale".to_string()),
        ],
        "{listed:#?}"
    );
    assert!(listed.iter().all(|l| l.outcome == "would drop"));
    let dropped = pgcutover::cutover::cleanup::run(&config, false).await.unwrap();
    assert!(dropped.iter().all(|l| l.outcome == "dropped"), "{dropped:#?}");
    assert!(pgcutover::cutover::cleanup::run(&config, true).await.unwrap().is_empty(), "a second run finds nothing, in any database");
    let slots: i64 = green.query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgcutover_back_stale'", &[]).await.unwrap().get(0);
    assert_eq!(slots, 0);
    // The live way back still carries green's writes to blue.
    let c = proxy.connect(db).await;
    c.batch_execute("INSERT INTO t (v) VALUES (42)").await.unwrap();
    assert!(
        common::eventually(30, || async { blue.query_one("SELECT count(*) FROM t WHERE v = 42", &[]).await.unwrap().get::<_, i64>(0) == 1 }).await,
        "the way back stopped"
    );
}
