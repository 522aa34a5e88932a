//! Managed PostgreSQL across major versions: servers set up as managed services set
//! them up — every TCP connection over TLS (`hostssl` lines only), SCRAM passwords,
//! and an admin role that is not a superuser (CREATEROLE, CREATEDB, REPLICATION,
//! pg_monitor, pg_signal_backend, ADMIN OPTION on the application role, and
//! pg_create_subscription from 16 on) — on PostgreSQL 12 to 18, the server builds
//! scripts/prereqs installs. One cluster per major version for the whole binary;
//! each test has databases of its own and the tests run one at a time (a fence
//! takes LOGIN from `app` cluster-wide).

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use common::{Certs, Raw, TestProxy};
use pgcutover::cluster::{major_bin_dir, subscription_name, Cluster, ClusterOptions};

const ADMIN: &str = "cloudadmin";
const PASSWORD: &str = common::PASSWORD;
const MAJORS: [u32; 7] = [12, 13, 14, 15, 16, 17, 18];

fn certs() -> &'static Certs {
    static CERTS: OnceLock<Certs> = OnceLock::new();
    CERTS.get_or_init(Certs::generate)
}

/// One managed-style server per major version, started once (on a thread of its
/// own: the tests call this from inside their runtime).
fn servers() -> &'static HashMap<u32, Cluster> {
    static SERVERS: OnceLock<HashMap<u32, Cluster>> = OnceLock::new();
    SERVERS.get_or_init(|| {
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            MAJORS.iter().map(|&major| (major, rt.block_on(managed(major)))).collect()
        })
        .join()
        .expect("start the managed-style servers")
    })
}

fn server(major: u32) -> &'static Cluster {
    &servers()[&major]
}

/// A server as a managed service runs it, with the roles it would have.
async fn managed(major: u32) -> Cluster {
    let c = certs();
    let options = ClusterOptions {
        tls: Some((c.cert_pem.clone(), c.key_pem.clone())),
        bin: Some(major_bin_dir(major).expect("scripts/prereqs --for-tests installs PostgreSQL 12..18")),
        hostssl_only: true,
        ..Default::default()
    };
    let cluster = Cluster::start(&format!("managed-{major}"), &options).unwrap_or_else(|e| panic!("PostgreSQL {major}: {e:#}"));
    let mut sql = format!(
        "CREATE ROLE app LOGIN PASSWORD '{PASSWORD}';
         CREATE ROLE {ADMIN} LOGIN PASSWORD '{PASSWORD}' CREATEROLE CREATEDB REPLICATION;
         GRANT pg_monitor, pg_signal_backend TO {ADMIN};
         GRANT app TO {ADMIN} WITH ADMIN OPTION;"
    );
    if major >= 16 {
        sql.push_str(&format!("GRANT pg_create_subscription TO {ADMIN};"));
    }
    cluster.execute("postgres", &sql).await.unwrap();
    cluster
}

/// One test at a time; `app` may log in everywhere before each.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let guard = LOCK.lock().await;
    for c in servers().values() {
        c.execute("postgres", "ALTER ROLE app LOGIN").await.unwrap();
    }
    guard
}

/// `db` on both servers, owned by `app`, with `schema` (and `rows` on the source);
/// published on the source by `app` table by table (FOR ALL TABLES needs a
/// superuser), subscribed on the target by the admin over TLS — as its owner from
/// 16 on, by the superuser before (PostgreSQL requires one there).
async fn replicate(src: u32, dst: u32, db: &str, schema: &str, rows: &str) {
    let (s, d) = (server(src), server(dst));
    for c in [s, d] {
        // One statement at a time: CREATE DATABASE runs outside a transaction block.
        for sql in [format!("DROP DATABASE IF EXISTS {db}"), format!("CREATE DATABASE {db} OWNER app"), format!("GRANT CREATE ON DATABASE {db} TO {ADMIN}")] {
            c.execute("postgres", &sql).await.unwrap();
        }
        c.execute(db, &format!("SET ROLE app; {schema}")).await.unwrap();
    }
    s.execute(db, &format!("SET ROLE app; {rows}")).await.unwrap();
    let tables: String = s
        .connect(db)
        .await
        .unwrap()
        .query_one("SELECT string_agg(format('%I.%I', schemaname, tablename), ', ') FROM pg_tables WHERE schemaname = 'public'", &[])
        .await
        .unwrap()
        .get(0);
    s.execute(db, &format!("SET ROLE app; CREATE PUBLICATION pgcutover_pub FOR TABLE {tables}")).await.unwrap();
    let conninfo = format!("host=127.0.0.1 port={} user={ADMIN} password={PASSWORD} dbname={db} sslmode=require", s.port);
    let target = d.connect(db).await.unwrap();
    if dst >= 16 {
        target.batch_execute(&format!("SET ROLE {ADMIN}")).await.unwrap();
    }
    target.batch_execute(&format!("CREATE SUBSCRIPTION {} CONNECTION '{conninfo}' PUBLICATION pgcutover_pub", subscription_name(db))).await.unwrap();
    target.batch_execute("RESET ROLE").await.unwrap();
    let synced = common::eventually(60, || async { target.query_one("SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'", &[]).await.unwrap().get::<_, i64>(0) == 0 }).await;
    assert!(synced, "{db}: the initial copy from {src} to {dst} did not finish");
}

/// A proxy in front of the two servers, reaching both over TLS (`require`) as the
/// admin role.
async fn proxy(src: u32, dst: u32, cutover: &str) -> TestProxy {
    proxy_with_tls(src, dst, cutover, "tls = \"require\"").await
}

/// The test CA, where the servers' processes can read it too (the way back's
/// subscription checks the target's certificate with it).
fn ca_file() -> &'static std::path::Path {
    static CA: OnceLock<std::path::PathBuf> = OnceLock::new();
    CA.get_or_init(|| {
        let path = server(MAJORS[0]).socket_dir().join("test-ca.pem");
        std::fs::write(&path, &certs().ca_pem).unwrap();
        path
    })
}

async fn proxy_with_tls(src: u32, dst: u32, cutover: &str, tls: &str) -> TestProxy {
    let (s, d) = (server(src).port, server(dst).port);
    common::proxy_from(|dir| {
        format!(
            r#"
            [proxy]
            listen = "127.0.0.1:0"
            socket_dir = "{dir}"
            client_login_timeout = "5s"
            [auth]
            method = "trust"
            [[auth.users]]
            name = "app"
            password = "{PASSWORD}"
            [backends.blue]
            host = "127.0.0.1"
            port = {s}
            {tls}
            admin_user = "{ADMIN}"
            admin_password = "{PASSWORD}"
            [backends.green]
            host = "127.0.0.1"
            port = {d}
            {tls}
            admin_user = "{ADMIN}"
            admin_password = "{PASSWORD}"
            [cutover]
            active = "blue"
            target = "green"
            drain_timeout = "10s"
            max_pause = "30s"
            {cutover}
            "#,
            dir = dir.display()
        )
    })
    .await
}

fn rows_by_name(rows: Vec<Vec<Option<String>>>) -> HashMap<String, String> {
    rows.into_iter().map(|r| (r[0].clone().unwrap_or_default(), r[1].clone().unwrap_or_default())).collect()
}

/// A connection straight to a server over TLS as `user`.
async fn direct(major: u32, user: &str, db: &str, sslmode: &str) -> Result<tokio_postgres::Client, String> {
    let url = format!("host=127.0.0.1 port={} user={user} password={PASSWORD} dbname={db} sslmode={sslmode}", server(major).port);
    let config: tokio_postgres::Config = url.parse().unwrap();
    let tls = pgcutover::tls::client_tls(pgcutover::config::BackendTlsMode::Require, None).unwrap().unwrap();
    let connected = if sslmode == "disable" {
        config.connect(tokio_postgres::NoTls).await.map(|(c, conn)| {
            tokio::spawn(conn);
            c
        })
    } else {
        config.connect(pgcutover::cutover::control_tls::MakeRustls::new(tls)).await.map(|(c, conn)| {
            tokio::spawn(conn);
            c
        })
    };
    connected.map_err(|e| format!("{e:?}"))
}

/// `pgcutover check` and a rehearsal on a replicated pair of every major version
/// (12 → 13 → … → 18, so that each runs every statement as source and as target),
/// as an admin that is not a superuser, over TLS only: nothing fails for want of a
/// right; what the admin cannot read is a note that says why; the fence is
/// role-level and a rehearsal leaves the source as it was.
#[tokio::test]
async fn every_major_version_is_checked_and_rehearsed_without_a_superuser() {
    let _serial = serial().await;
    for pair in MAJORS.windows(2) {
        let (src, dst) = (pair[0], pair[1]);
        let db = format!("chain_{src}_{dst}");
        replicate(src, dst, &db, "CREATE TABLE items (id bigserial PRIMARY KEY, name text); CREATE SEQUENCE tickets;", "INSERT INTO items (name) SELECT 'x' FROM generate_series(1, 100); SELECT setval('tickets', 41);").await;
        let refused = direct(src, "app", &db, "disable").await.expect_err("a plaintext connection is refused");
        assert!(refused.contains("no encryption") || refused.contains("SSL off"), "{src}: {refused}");

        let p = proxy(src, dst, "").await;
        // No session is open: check finds the database by its subscription.
        let rows = p.admin("CHECK").await.unwrap_or_else(|e| panic!("{src} -> {dst}: {e:?}"));
        let failed: Vec<_> = rows.iter().filter(|r| r[1].as_deref() != Some("ok") && r[1].as_deref() != Some("note")).collect();
        assert!(failed.is_empty(), "{src} -> {dst}: {failed:?}");
        assert!(rows.iter().any(|r| r[0].as_deref().is_some_and(|n| n.contains(&db))), "{src} -> {dst}: {db} was not checked: {rows:?}");
        assert!(rows.iter().any(|r| r[1].as_deref() == Some("note") && r[2].as_deref().is_some_and(|d| d.contains("superusers only"))), "{rows:?}");
        assert!(rows.iter().any(|r| r[0].as_deref().is_some_and(|n| n.contains("role-level fence"))), "{rows:?}");

        let c = p.connect(&db).await;
        let report = rows_by_name(p.admin("CUTOVER green REHEARSE").await.unwrap());
        assert_eq!(report.get("outcome").map(String::as_str), Some("rehearsed"), "{src} -> {dst}: {report:?}");
        assert_eq!(report.get("fence").map(String::as_str), Some("role-level"), "{report:?}");
        // The source is as it was: the session writes, app logs in, no role setting is left.
        c.batch_execute("INSERT INTO items (name) VALUES ('after')").await.unwrap();
        let app = direct(src, "app", &db, "require").await.expect("app logs in on the source after the rehearsal");
        app.batch_execute("INSERT INTO items (name) VALUES ('direct')").await.unwrap();
        let left: i64 = server(src).connect(&db).await.unwrap().query_one("SELECT count(*) FROM pg_db_role_setting WHERE setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())", &[]).await.unwrap().get(0);
        assert_eq!(left, 0, "{src}: the rehearsal left role settings behind");
    }
}

/// A client session with a prepared statement, a SET value and a LISTEN, to be
/// held through a cutover.
async fn held_session_keeps_its_state(p: &TestProxy, db: &str) -> Raw {
    let mut raw = Raw::connect(p.port()).await;
    raw.startup(&[("user", "app"), ("database", db)]).await;
    raw.until_ready().await;
    raw.query("SET work_mem = '7MB'; PREPARE answer AS SELECT 41 + 1; LISTEN news").await;
    let reply = raw.until_ready().await;
    assert!(reply.iter().all(|m| m.tag != b'E'), "{:?}", reply.iter().map(|m| m.message()).collect::<Vec<_>>());
    raw
}

/// After the cutover the session kept its prepared statement, its SET value and
/// its LISTEN, and was told the new server_version without reconnecting.
async fn after_the_move(raw: &mut Raw, p: &TestProxy, db: &str, dst: u32) {
    raw.query("SHOW work_mem; EXECUTE answer").await;
    let reply = raw.until_ready().await;
    let version = reply.iter().find(|m| m.tag == b'S' && m.body.starts_with(b"server_version\0")).map(|m| String::from_utf8_lossy(&m.body).to_string());
    assert!(version.as_deref().is_some_and(|v| v.contains(&format!("\0{dst}."))), "the client was told the new server_version: {version:?}");
    let data: Vec<String> = reply.iter().filter(|m| m.tag == b'D').map(|m| String::from_utf8_lossy(&m.body[6..]).to_string()).collect();
    assert_eq!(data, vec!["7MB".to_string(), "42".to_string()], "SET and PREPARE came along");
    p.connect(db).await.batch_execute("NOTIFY news, 'moved'").await.unwrap();
    let m = raw.recv().await.expect("the notification");
    assert_eq!(m.tag, b'A');
}

/// A cutover under `pgbench -M prepared` (tpcb-like plus a bigserial insert, 8
/// clients) across major versions, managed-style on both sides: zero failed
/// transactions, zero lost writes, sequences continue, the held sessions keep
/// their state; the source is fenced role by role.
#[tokio::test]
async fn a_cutover_from_12_and_from_15_to_17_under_load_needs_no_superuser() {
    let _serial = serial().await;
    for src in [12, 15] {
        let dst = 17;
        let db = format!("upgrade_{src}");
        replicate(src, dst, &db, pgcutover::cluster::PGBENCH_SCHEMA, &pgcutover::cluster::pgbench_rows(10_000)).await;
        let p = proxy(src, dst, "").await;
        let mut raw = held_session_keeps_its_state(&p, &db).await;
        let load = tokio::spawn({
            let port = p.port();
            let db = db.clone();
            async move { common::cut::pgbench(port, &db, "prepared", 8, 6).await }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        let report = rows_by_name(p.admin("CUTOVER green").await.unwrap());
        let (processed, out) = load.await.unwrap();
        assert_eq!(report.get("outcome").map(String::as_str), Some("committed"), "{src} -> {dst}: {report:?}\n{out}");
        assert_eq!(report.get("fence").map(String::as_str), Some("role-level"), "{report:?}");
        after_the_move(&mut raw, &p, &db, dst).await;
        let green = server(dst).connect(&db).await.unwrap();
        let orders: i64 = green.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0);
        assert_eq!(orders, processed, "{src} -> {dst}: every committed transaction's order exactly once on {dst}");
        // The sequence continues on the new server: a new order gets a fresh id.
        green.batch_execute("SET ROLE app; INSERT INTO orders (client) VALUES (-1)").await.unwrap();
        // The source: app cannot log in, and its new sessions would be read-only.
        let refused = direct(src, "app", &db, "require").await.expect_err("app is fenced out of the source");
        assert!(refused.contains("not permitted to log in"), "{refused}");
        let setting: Option<String> = server(src)
            .connect(&db)
            .await
            .unwrap()
            .query_one("SELECT (SELECT s FROM pg_db_role_setting x, unnest(setconfig) s WHERE x.setrole = 'app'::regrole AND s LIKE 'default_transaction_read_only%')", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(setting.as_deref(), Some("default_transaction_read_only=on"));
    }
}

/// The way back needs the source to subscribe to the target: PostgreSQL before 16
/// lets only superusers do that, so preflight refuses with that reason; from 16 on
/// the admin's pg_create_subscription is enough, and a cutover there and back
/// under load keeps every write exactly once.
#[tokio::test]
async fn the_way_back_works_from_16_on_and_is_refused_before_with_the_reason() {
    let _serial = serial().await;
    replicate(12, 17, "back_12", "CREATE TABLE items (id bigserial PRIMARY KEY, n int);", "").await;
    let p = proxy(12, 17, "reverse_replication = true").await;
    let _c = p.connect("back_12").await;
    let report = rows_by_name(p.admin("CUTOVER green").await.unwrap());
    assert_eq!(report.get("outcome").map(String::as_str), Some("refused"), "{report:?}");
    assert!(report.get("reason").is_some_and(|r| r.contains("before 16")), "{report:?}");

    replicate(16, 17, "back_16", "CREATE TABLE items (id bigserial PRIMARY KEY, n int);", "").await;
    // verify-full: the control connections check the certificates, and the way
    // back's subscription carries sslmode=verify-full and the CA file.
    let tls = format!("tls = \"verify-full\"\n            tls_ca = \"{}\"", ca_file().display());
    let p = proxy_with_tls(16, 17, "reverse_replication = true", &tls).await;
    let writer = p.connect("back_16").await;
    let writes = tokio::spawn(async move {
        let mut n = 0;
        for i in 0..400 {
            writer.execute("INSERT INTO items (n) VALUES ($1)", &[&i]).await.expect("no write fails");
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        n
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let there = rows_by_name(p.admin("CUTOVER green").await.unwrap());
    assert_eq!(there.get("outcome").map(String::as_str), Some("committed"), "{there:?}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let back = rows_by_name(p.admin("CUTOVER blue").await.unwrap());
    assert_eq!(back.get("outcome").map(String::as_str), Some("committed"), "{back:?}");
    let written: i64 = writes.await.unwrap();
    let on_16 = server(16).connect("back_16").await.unwrap();
    let (rows, distinct): (i64, i64) = {
        let r = on_16.query_one("SELECT count(*), count(DISTINCT n) FROM items", &[]).await.unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((rows, distinct), (written, written), "every write exactly once on 16 after the way back");
    let conninfo: String = on_16.query_one("SELECT subconninfo FROM pg_subscription WHERE subname LIKE 'pgcutover_back%' LIMIT 1", &[]).await.map(|r| r.get(0)).unwrap_or_default();
    assert!(conninfo.is_empty() || conninfo.contains("sslmode=verify-full") && conninfo.contains("sslrootcert="), "{conninfo}");
}
