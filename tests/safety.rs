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
    bench_database(f, db).await;
    let proxy = f
        .proxy(|c| {
            c.cutover.databases = vec![db.into()];
            c.cutover.reverse_replication = true;
        })
        .await;

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

#[tokio::test]
async fn a_rehearsal_with_reverse_replication_leaves_no_slot_or_publication_behind() {
    let _serial = serial().await;
    let f = fixture();
    let db = "sf_rehearse_back";
    common::cut::replicated(f, db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int)").await;
    let proxy = f
        .proxy(|c| {
            c.cutover.databases = vec![db.into()];
            c.cutover.reverse_replication = true;
        })
        .await;
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
