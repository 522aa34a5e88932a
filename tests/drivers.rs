//! Transparent to every driver: the corners real drivers reach — a cancel and what
//! it may cancel, asyncpg's unsynced prepares, a backend that ends the session, the
//! pids in notifications, what node-postgres sends before its startup — answered
//! through the proxy as PostgreSQL answers them, also under a pause and across a
//! cutover.

mod common;

use std::time::Duration;

use common::{cut, fixture, Raw, RawMessage};
use pgcutover::config::{AuthMethod, Config, OnDrainTimeout};
use pgcutover::protocol::startup::CancelKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Tests that cut over fence blue (cluster-wide): they run alone.
static FENCE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn trust(c: &mut Config) {
    c.auth.method = AuthMethod::Trust;
}

/// A fresh database on blue owned by `trustuser`.
async fn database(name: &str) -> String {
    let admin = fixture().blue().connect("postgres").await.unwrap();
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await.unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {name} OWNER trustuser")).await.unwrap();
    name.to_string()
}

/// A raw session as `trustuser`, and the cancel key it was given.
async fn login(port: u16, db: &str) -> (Raw, CancelKey) {
    let mut raw = Raw::connect(port).await;
    raw.startup(&[("user", "trustuser"), ("database", db)]).await;
    let hello = raw.until_ready().await;
    let k = hello.iter().find(|m| m.tag == b'K').expect("BackendKeyData");
    let key = CancelKey { pid: i32::from_be_bytes(k.body[..4].try_into().unwrap()), secret: i32::from_be_bytes(k.body[4..8].try_into().unwrap()) };
    (raw, key)
}

/// Sends a CancelRequest and waits, as libpq's PQcancel does, until the server
/// closes the connection.
async fn cancel(port: u16, key: CancelKey) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(&pgcutover::protocol::startup::encode_cancel(key)).await.unwrap();
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut sink)).await.expect("the cancel connection is closed").ok();
}

fn error_of(reply: &[RawMessage]) -> Option<(String, String)> {
    reply.iter().find(|m| m.tag == b'E').map(|m| (m.sqlstate().unwrap_or_default(), m.message().unwrap_or_default()))
}

fn tags(reply: &[RawMessage]) -> String {
    reply.iter().map(|m| m.tag as char).collect()
}

/// PostgreSQL closes a cancel connection only after it has signalled the backend,
/// so a client that waits for the close knows that its next statement is safe. A
/// cancel of an idle session cancels nothing, directly and through the proxy.
#[tokio::test]
async fn a_cancel_is_acknowledged_only_after_it_reached_the_backend() {
    let _fence = FENCE.read().await;
    let f = fixture();
    let db = database("drv_cancel_ack").await;
    let proxy = f.proxy(trust).await;
    for (name, port) in [("directly", f.blue().port), ("through the proxy", proxy.port())] {
        let (mut raw, key) = login(port, &db).await;
        let mut cancelled = 0;
        for _ in 0..10 {
            cancel(port, key).await;
            raw.query("SELECT pg_sleep(0.2)").await;
            let reply = raw.until_ready().await;
            if error_of(&reply).is_some_and(|(code, _)| code == "57014") {
                cancelled += 1;
            }
        }
        assert_eq!(cancelled, 0, "{name}: a cancel of an idle session landed on the next statement");
    }
}

/// A request held at the closed gate has reached no backend: its cancel answers it
/// as a cancelled statement at once (57014, then ReadyForQuery idle), and it never
/// runs, not even after RESUME. A simple query and an extended batch alike.
#[tokio::test]
async fn a_cancel_of_a_held_request_answers_it_57014_and_it_never_runs() {
    let _fence = FENCE.read().await;
    let f = fixture();
    let db = database("drv_cancel_held").await;
    let proxy = f.proxy(trust).await;
    let (mut raw, key) = login(proxy.port(), &db).await;
    raw.query("CREATE TABLE t (n int)").await;
    raw.until_ready().await;
    let p = proxy.proxy().clone();
    let held = || {
        let p = p.clone();
        async move { p.sessions.list().iter().any(|s| s.held_since().is_some()) }
    };

    proxy.admin("PAUSE").await.unwrap();
    for request in [common_query("INSERT INTO t VALUES (1)"), extended("INSERT INTO t VALUES (2)")] {
        raw.send(&request).await;
        assert!(common::eventually(5, held).await, "the request is held");
        cancel(proxy.port(), key).await;
        let reply = raw.until_ready().await;
        assert_eq!(tags(&reply), "EZ", "answered at once while the gate is closed");
        assert_eq!(error_of(&reply), Some(("57014".into(), "canceling statement due to user request".into())));
        assert_eq!(&reply[1].body[..], b"I");
        assert!(!held().await, "nothing is held any more");
    }
    // The next request holds as usual and runs at RESUME.
    raw.query("SELECT count(*) FROM t").await;
    assert!(common::eventually(5, held).await);
    proxy.admin("RESUME").await.unwrap();
    let reply = raw.until_ready().await;
    let row = reply.iter().find(|m| m.tag == b'D').expect("a row");
    assert!(row.body.ends_with(b"0"), "a cancelled request ran: {:?}", row.body);
    let n: i64 = f.blue().connect(&db).await.unwrap().query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 0);
}

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut b = vec![tag];
    b.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    b.extend_from_slice(body);
    b
}

fn common_query(sql: &str) -> Vec<u8> {
    frame(b'Q', &[sql.as_bytes(), b"\0"].concat())
}

/// Parse, Bind, Execute, Sync of one unnamed statement.
fn extended(sql: &str) -> Vec<u8> {
    [frame(b'P', &[b"\0", sql.as_bytes(), b"\0\0\0"].concat()), frame(b'B', b"\0\0\0\0\0\0\0\0"), frame(b'E', b"\0\0\0\0\0"), frame(b'S', b"")].concat()
}

/// When the backend ends a session — `pg_terminate_backend`, `idle_session_timeout`
/// — the client gets the backend's FATAL and its connection is closed, every time
/// (sessions relaying on the express lanes lost the end after a short read).
#[tokio::test]
async fn a_session_the_backend_ends_is_closed_with_its_fatal_every_time() {
    let _fence = FENCE.read().await;
    let f = fixture();
    let db = database("drv_goodbye").await;
    let proxy = f.proxy(trust).await;
    let mut clients = Vec::new();
    for _ in 0..60 {
        clients.push(login(proxy.port(), &db).await.0);
    }
    // Idle sessions board their lanes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pids: Vec<i32> = proxy.proxy().sessions.list().iter().map(|s| s.backend().key.pid).collect();
    assert_eq!(pids.len(), 60);
    let admin = f.blue().connect("postgres").await.unwrap();
    admin.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid", &[&pids]).await.unwrap();
    let mut hung = 0;
    for (i, c) in clients.iter_mut().enumerate() {
        match c.until_closed(10).await {
            Some(msgs) => assert_eq!(msgs.iter().map(|m| (m.tag, m.sqlstate())).collect::<Vec<_>>(), vec![(b'E', Some("57P01".to_string()))], "client {i}"),
            None => hung += 1,
        }
    }
    assert_eq!(hung, 0, "clients whose connection stayed open after their backend ended it");
    let p = proxy.proxy().clone();
    assert!(common::eventually(5, || async { p.sessions.is_empty() }).await, "the sessions ended");

    let (mut raw, _) = login(proxy.port(), &db).await;
    raw.query("SET idle_session_timeout = '200ms'").await;
    raw.until_ready().await;
    let msgs = raw.until_closed(10).await.expect("closed after the timeout");
    assert_eq!(msgs.iter().map(|m| (m.tag, m.sqlstate())).collect::<Vec<_>>(), vec![(b'E', Some("57P05".to_string()))]);
}

/// `pg_ctl stop -m fast` tells every client why before it closes: an idle client
/// through the proxy reads what a direct one reads.
#[tokio::test]
async fn a_fast_shutdown_reaches_an_idle_client_as_postgresql_sends_it() {
    let own = pgcutover::cluster::Cluster::start("drv-stop", &pgcutover::cluster::ClusterOptions { hba: vec!["host all trustuser 127.0.0.1/32 trust".into()], ..Default::default() }).unwrap();
    own.execute("postgres", "CREATE ROLE trustuser LOGIN").await.unwrap();
    let f = fixture();
    let proxy = f.proxy(|c| {
        trust(c);
        c.backends.get_mut("blue").unwrap().port = own.port;
    })
    .await;
    let (mut direct, _) = login(own.port, "postgres").await;
    let (mut proxied, _) = login(proxy.port(), "postgres").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    own.stop();
    let fields = |msgs: Vec<RawMessage>| msgs.iter().map(|m| (m.tag, m.sqlstate(), m.message())).collect::<Vec<_>>();
    let direct = fields(direct.until_closed(10).await.expect("direct: closed"));
    let proxied = fields(proxied.until_closed(10).await.expect("through the proxy: closed"));
    assert_eq!(direct, vec![(b'E', Some("57P01".to_string()), Some("terminating connection due to administrator command".to_string()))]);
    assert_eq!(proxied, direct);
}

/// A NotificationResponse carries the sender's pid as the receiving client can
/// know it: the minted pid a session of this proxy got in BackendKeyData (before
/// and after a cutover), the real pid of a sender from outside the proxy.
#[tokio::test]
async fn a_notification_carries_the_pid_its_sender_was_given() {
    let _fence = FENCE.write().await;
    let _serial = cut::serial().await;
    let f = fixture();
    let db = "drv_notify";
    f.pair.replicated_database(db, "trustuser", "CREATE TABLE t (n int PRIMARY KEY)").await.unwrap();
    let proxy = f.proxy(trust).await;
    let (mut listener, _) = login(proxy.port(), db).await;
    let (mut sender, sender_key) = login(proxy.port(), db).await;
    listener.query("LISTEN ch").await;
    listener.until_ready().await;

    async fn notification_pid(raw: &mut Raw) -> i32 {
        let m = raw.recv().await.expect("a notification");
        assert_eq!(m.tag, b'A', "{}", m.tag as char);
        i32::from_be_bytes(m.body[..4].try_into().unwrap())
    }

    sender.query("NOTIFY ch, 'from a session of the proxy'").await;
    sender.until_ready().await;
    assert_eq!(notification_pid(&mut listener).await, sender_key.pid, "before the cutover");

    let outside = f.blue().connect(db).await.unwrap();
    let outside_pid: i32 = outside.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    outside.batch_execute("NOTIFY ch, 'from outside'").await.unwrap();
    assert_eq!(notification_pid(&mut listener).await, outside_pid, "a sender from outside keeps its pid");

    let report = cut::cutover(&proxy, "green").await;
    assert_eq!(report.get("outcome").map(String::as_str), Some("committed"), "{report:?}");
    sender.query("NOTIFY ch, 'after the cutover'").await;
    sender.until_ready().await;
    assert_eq!(notification_pid(&mut listener).await, sender_key.pid, "after the cutover");
    cut::unfence(f.blue()).await;
}

/// Minted pids never name a real process: they lie above Linux's PID_MAX_LIMIT
/// (2^22), so a client that passes its pid to pg_terminate_backend ends nobody.
#[tokio::test]
async fn minted_pids_lie_outside_the_range_of_real_pids() {
    let _fence = FENCE.read().await;
    let f = fixture();
    let db = database("drv_pids").await;
    let proxy = f.proxy(trust).await;
    let mut sessions = Vec::new();
    for _ in 0..50 {
        let (raw, key) = login(proxy.port(), &db).await;
        assert!(key.pid >= 1 << 22, "minted pid {} could be a real process", key.pid);
        sessions.push(raw);
    }
    let (mut raw, key) = login(proxy.port(), &db).await;
    raw.query(&format!("SELECT pg_terminate_backend({})", key.pid)).await;
    let reply = raw.until_ready().await;
    assert!(reply.iter().any(|m| m.tag == b'D' && m.body.ends_with(b"f")), "{}", tags(&reply));
}

/// The bytes a client sends before or instead of a proper startup, answered
/// exactly as PostgreSQL answers them: silence and a close where it is silent
/// (node-postgres's Terminate before its StartupMessage), its FATAL where it sends
/// one. Compared with PostgreSQL itself, without the source file and line fields.
#[tokio::test]
async fn malformed_startups_get_the_answers_postgresql_gives() {
    let _fence = FENCE.read().await;
    let f = fixture();
    let proxy = f.proxy(trust).await;
    let startup = pgcutover::protocol::startup::encode_startup(&[("user".into(), "trustuser".into()), ("database".into(), "postgres".into())]).to_vec();
    let packet = |code: u32, payload: &[u8]| {
        let mut v = ((payload.len() + 8) as u32).to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(payload);
        v
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("node-postgres: Terminate, then its StartupMessage", [frame(b'X', b""), startup.clone()].concat()),
        ("length 4", vec![0, 0, 0, 4]),
        ("length 10005", [&10_005u32.to_be_bytes()[..], &[0, 3, 0, 0], &[b'x'; 100]].concat()),
        ("an HTTP request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("a CancelRequest of 12 bytes", packet(80_877_102, &[0, 0, 0, 1])),
        ("protocol 2.0", packet(2 << 16, b"user\0trustuser\0\0")),
        ("protocol 4.0", packet(4 << 16, b"user\0trustuser\0\0")),
        ("no user", packet(3 << 16, b"database\0postgres\0\0")),
        ("no terminator", packet(3 << 16, b"user\0trustuser\0")),
        ("an odd number of strings", packet(3 << 16, b"user\0trustuser\0database\0\0")),
    ];
    for (what, bytes) in cases {
        let mut answers = Vec::new();
        for port in [f.blue().port, proxy.port()] {
            let mut raw = Raw::connect(port).await;
            raw.send(&bytes).await;
            let got = raw.bytes_until_closed(10).await.unwrap_or_else(|| panic!("{what}: not closed"));
            answers.push(without_source_fields(&got));
        }
        assert_eq!(answers[0], answers[1], "{what}: PostgreSQL (left) vs through the proxy (right)");
    }
}

/// Drops the F (file), L (line) and R (routine) fields of ErrorResponses in a byte
/// stream (they name PostgreSQL's source), fixing the lengths; other bytes stay.
fn without_source_fields(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let tag = rest[0];
        // 'N'/'S' single bytes answer SSLRequest; an old-protocol error has no length.
        if matches!(tag, b'N' | b'S' | b'G') && (rest.len() == 1 || rest[1] != 0) {
            out.push((tag, Vec::new()));
            rest = &rest[1..];
            continue;
        }
        if rest.len() < 5 || rest[1] != 0 {
            out.push((b'?', rest.to_vec()));
            break;
        }
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let body = &rest[5..(len + 1).min(rest.len())];
        let body = if tag == b'E' {
            pgcutover::protocol::read::parse_fields(body).into_iter().filter(|(c, _)| !matches!(c, b'F' | b'L' | b'R')).flat_map(|(c, v)| [&[c][..], v.as_bytes(), b"\0"].concat()).collect()
        } else {
            body.to_vec()
        };
        out.push((tag, body));
        rest = &rest[(len + 1).min(rest.len())..];
    }
    out
}

/// asyncpg prepares every statement with Parse, Describe and Flush, and no Sync:
/// such a session holds nothing open that a pause must wait for. With
/// `on_drain_timeout = "abort"` a pause succeeds at once; the next message holds
/// and runs after RESUME.
#[tokio::test]
async fn a_batch_that_only_prepared_is_quiescent_for_a_pause() {
    let _fence = FENCE.read().await;
    let f = fixture();
    let db = database("drv_quiet_batch").await;
    let proxy = f.proxy(|c| {
        trust(c);
        c.cutover.on_drain_timeout = OnDrainTimeout::Abort;
    })
    .await;
    let (mut raw, _) = login(proxy.port(), &db).await;
    raw.query("CREATE TABLE t (n int)").await;
    raw.until_ready().await;
    let prepare = [frame(b'P', b"s1\0INSERT INTO t VALUES (1) RETURNING n\0\0\0"), frame(b'D', b"Ss1\0"), frame(b'H', b"")].concat();
    raw.send(&prepare).await;
    for tag in [b'1', b't', b'T'] {
        assert_eq!(raw.recv().await.expect("an answer").tag, tag);
    }
    let rows = proxy.admin("PAUSE 300ms").await.expect("a session that only prepared is not in the way");
    assert_eq!(rows[0][2].as_deref(), Some("0"), "{rows:?}");
    raw.send(&[frame(b'B', b"\0s1\0\0\0\0\0\0\0"), frame(b'E', b"\0\0\0\0\0"), frame(b'S', b"")].concat()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let n: i64 = f.blue().connect(&db).await.unwrap().query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "the Bind went through a closed gate");
    proxy.admin("RESUME").await.unwrap();
    assert_eq!(tags(&raw.until_ready().await), "2DCZ");
    let n: i64 = f.blue().connect(&db).await.unwrap().query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
}

/// The asyncpg the fixture installed (`scripts/prereqs`), or `PGCUTOVER_PYTHON`.
fn asyncpg_python() -> std::path::PathBuf {
    std::env::var_os("PGCUTOVER_PYTHON").map(Into::into).unwrap_or_else(|| "/opt/pgcutover/venv/bin/python".into())
}

/// A real asyncpg program — prepared statements reused, its statement cache, a
/// connection that prepared and waits — through pauses and a cutover: zero
/// errors, every insert exactly once on the new database, every connection on it,
/// and the prepared statements still work there.
#[tokio::test]
async fn asyncpg_runs_through_pauses_and_a_cutover_without_an_error() {
    use tokio::io::AsyncBufReadExt;
    let _fence = FENCE.write().await;
    let _serial = cut::serial().await;
    let f = fixture();
    let db = "drv_asyncpg";
    f.pair.replicated_database(db, "trustuser", "CREATE TABLE asyncpg_rows (id bigserial PRIMARY KEY, worker int NOT NULL, i int NOT NULL)").await.unwrap();
    let proxy = f.proxy(|c| {
        trust(c);
        // Any session a pause had to wait for past the deadline fails the test.
        c.cutover.on_drain_timeout = OnDrainTimeout::Abort;
        c.cutover.drain_timeout = Duration::from_secs(2);
    })
    .await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/asyncpg_load.py");
    let mut child = tokio::process::Command::new(asyncpg_python())
        .arg(&script)
        .arg(format!("postgresql://trustuser@127.0.0.1:{}/{db}", proxy.port()))
        .arg("4")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("asyncpg's python (scripts/prereqs installs it)");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("started"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..4 {
        proxy.admin("PAUSE").await.expect("asyncpg's sessions are not in the way of a pause");
        tokio::time::sleep(Duration::from_millis(100)).await;
        proxy.admin("RESUME").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let report = cut::cutover(&proxy, "green").await;
    assert_eq!(report.get("outcome").map(String::as_str), Some("committed"), "{report:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"stop\n").await.unwrap();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.expect("asyncpg finished").unwrap().expect("its report");
    let out: serde_json::Value = serde_json::from_str(&line).unwrap();
    cut::unfence(f.blue()).await;
    assert_eq!(out["errors"], serde_json::json!([]), "{out}");
    assert!(out["queries"].as_i64().unwrap() > 0, "{out}");
    assert_eq!(out["waited"], 42, "the statement prepared before the pauses, run after the cutover: {out}");
    let green = f.green().port as i64;
    assert_eq!(out["ports"].as_array().unwrap().iter().filter(|p| p.as_i64() == Some(green)).count(), 5, "every connection ends on green: {out}");
    let rows: i64 = f.green().connect(db).await.unwrap().query_one("SELECT count(DISTINCT (worker, i)) FROM asyncpg_rows", &[]).await.unwrap().get(0);
    let all: i64 = f.green().connect(db).await.unwrap().query_one("SELECT count(*) FROM asyncpg_rows", &[]).await.unwrap().get(0);
    assert_eq!((rows, all), (out["inserted"].as_i64().unwrap(), out["inserted"].as_i64().unwrap()), "every insert exactly once on green");
    let _ = child.wait().await;
}
