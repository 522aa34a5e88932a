//! Protocol conformance: the same client bytes, played over a raw socket against
//! PostgreSQL directly and through the proxy, get the same replies — byte for byte,
//! except BackendKeyData and the pid in NotificationResponse. Every corner of the
//! request/response accounting is played with no pause, with the gate closed while
//! the request arrives, and (for a transaction the proxy ends) at a drain deadline.

mod common;

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use common::{fixture, Raw};
use pgcutover::config::{AuthMethod, OnDrainTimeout};

/// Client messages, built by hand.
mod msg {
    use super::*;

    pub fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u8(tag);
        b.put_u32(body.len() as u32 + 4);
        b.put_slice(body);
        b.to_vec()
    }
    fn cstr(b: &mut Vec<u8>, s: &str) {
        b.extend_from_slice(s.as_bytes());
        b.push(0);
    }
    pub fn query(sql: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, sql);
        frame(b'Q', &b)
    }
    pub fn parse(name: &str, sql: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, name);
        cstr(&mut b, sql);
        b.extend_from_slice(&0u16.to_be_bytes());
        frame(b'P', &b)
    }
    /// Bind with text parameters and text results.
    pub fn bind(portal: &str, stmt: &str, params: &[&str]) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, portal);
        cstr(&mut b, stmt);
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&(params.len() as u16).to_be_bytes());
        for p in params {
            b.extend_from_slice(&(p.len() as i32).to_be_bytes());
            b.extend_from_slice(p.as_bytes());
        }
        b.extend_from_slice(&0u16.to_be_bytes());
        frame(b'B', &b)
    }
    pub fn describe_portal(portal: &str) -> Vec<u8> {
        let mut b = vec![b'P'];
        cstr(&mut b, portal);
        frame(b'D', &b)
    }
    pub fn describe_statement(name: &str) -> Vec<u8> {
        let mut b = vec![b'S'];
        cstr(&mut b, name);
        frame(b'D', &b)
    }
    pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, portal);
        b.extend_from_slice(&max_rows.to_be_bytes());
        frame(b'E', &b)
    }
    pub fn close_statement(name: &str) -> Vec<u8> {
        let mut b = vec![b'S'];
        cstr(&mut b, name);
        frame(b'C', &b)
    }
    pub fn sync() -> Vec<u8> {
        frame(b'S', &[])
    }
    pub fn flush() -> Vec<u8> {
        frame(b'H', &[])
    }
    pub fn copy_data(data: &str) -> Vec<u8> {
        frame(b'd', data.as_bytes())
    }
    pub fn copy_done() -> Vec<u8> {
        frame(b'c', &[])
    }
    pub fn copy_fail(why: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, why);
        frame(b'f', &b)
    }
    /// FunctionCall of int4abs(-42), binary in and out.
    pub fn function_call(oid: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&oid.to_be_bytes());
        b.extend_from_slice(&[0, 1, 0, 1, 0, 1]);
        b.extend_from_slice(&4i32.to_be_bytes());
        b.extend_from_slice(&(-42i32).to_be_bytes());
        b.extend_from_slice(&[0, 1]);
        frame(b'F', &b)
    }
    /// An extended query of one statement, libpq's PQsendQueryParams shape.
    pub fn extended(sql: &str, params: &[&str]) -> Vec<u8> {
        [parse("", sql), bind("", "", params), describe_portal(""), execute("", 0), sync()].concat()
    }
}

/// One step of a script: bytes sent at once, then replies read until `until`.
struct Step {
    send: Vec<u8>,
    until: Until,
    /// The step leaves an extended batch open that only prepared (asyncpg's
    /// Parse / Describe / Flush): the session is quiescent after it.
    quiet: bool,
}

#[derive(Clone, Copy)]
enum Until {
    /// This many ReadyForQuery messages.
    Ready(usize),
    /// This many messages of any kind.
    Messages(usize),
}

fn step(send: Vec<u8>, readies: usize) -> Step {
    Step { send, until: Until::Ready(readies), quiet: false }
}

type Reply = Vec<(u8, Vec<u8>)>;

/// Reads one step's replies, with pids blanked out of notifications.
async fn read_step(raw: &mut Raw, until: Until) -> Reply {
    let mut out = Vec::new();
    let (mut readies, mut messages) = (0, 0);
    loop {
        let done = match until {
            Until::Ready(n) => readies == n,
            Until::Messages(n) => messages == n,
        };
        if done {
            return out;
        }
        let Some(m) = raw.recv().await else {
            out.push((b'!', b"connection closed".to_vec()));
            return out;
        };
        let mut body = m.body.to_vec();
        if m.tag == b'A' {
            body[..4].copy_from_slice(&[0; 4]);
        }
        messages += 1;
        if m.tag == b'Z' {
            readies += 1;
        }
        out.push((m.tag, body));
    }
}

async fn login(port: u16, db: &str) -> Raw {
    let mut raw = Raw::connect(port).await;
    raw.startup(&[("user", "trustuser"), ("database", db)]).await;
    let hello = raw.until_ready().await;
    assert!(hello.iter().any(|m| m.tag == b'K'), "logged in");
    raw
}

/// Plays `steps` on a fresh connection to `port`.
async fn play(port: u16, db: &str, steps: &[Step]) -> Vec<Reply> {
    let mut raw = login(port, db).await;
    let mut replies = Vec::new();
    for s in steps {
        raw.send(&s.send).await;
        replies.push(read_step(&mut raw, s.until).await);
    }
    replies
}

fn show(replies: &[Reply]) -> String {
    replies
        .iter()
        .enumerate()
        .map(|(i, r)| format!("step {i}: {}", r.iter().map(|(t, b)| format!("{}({})", *t as char, String::from_utf8_lossy(b).replace('\0', "|"))).collect::<Vec<_>>().join(" ")))
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_same(direct: &[Reply], proxied: &[Reply], what: &str) {
    assert!(direct == proxied, "{what}: replies differ\n--- direct\n{}\n--- through the proxy\n{}", show(direct), show(proxied));
}

/// The cutover test fences blue (cluster-wide): it runs alone.
static FENCE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A database owned by `trustuser` on blue, with a table to play with.
async fn database(name: &str) -> String {
    let f = fixture();
    let admin = f.blue().connect("postgres").await.unwrap();
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await.unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {name} OWNER trustuser")).await.unwrap();
    name.to_string()
}

/// Every corner of the request accounting, as scripted client bytes.
async fn corner_script(db: &str) -> Vec<Step> {
    let admin = fixture().blue().connect(db).await.unwrap();
    let oid: u32 = admin.query_one("SELECT 'pg_catalog.int4abs'::regproc::oid", &[]).await.unwrap().get(0);
    admin.batch_execute("CREATE TABLE IF NOT EXISTS t (n int, s text); GRANT ALL ON t TO trustuser").await.unwrap();
    vec![
        // The same start on every run (the table keeps its OID, seen in RowDescription).
        step(msg::query("TRUNCATE t"), 1),
        // A simple query of several statements: one ReadyForQuery.
        step(msg::query("SELECT 1; SELECT 2, 'two'; SELECT generate_series(1, 3)"), 1),
        // Pipelined extended batches, three Syncs in flight.
        step([msg::extended("INSERT INTO t VALUES ($1, 'a')", &["1"]), msg::extended("INSERT INTO t VALUES ($1, 'b')", &["2"]), msg::extended("SELECT count(*) FROM t", &[])].concat(), 3),
        // A named statement, described, bound twice, executed in row chunks.
        step([msg::parse("s1", "SELECT n FROM t WHERE n >= $1 ORDER BY n"), msg::describe_statement("s1"), msg::sync()].concat(), 1),
        step([msg::bind("p1", "s1", &["0"]), msg::execute("p1", 1), msg::execute("p1", 1), msg::execute("p1", 1), msg::sync()].concat(), 1),
        // asyncpg's prepare: Parse, Describe and Flush without a Sync, of a named
        // and of the unnamed statement (a pause holds, a cutover moves the session
        // here); then both run in one batch.
        Step {
            send: [msg::parse("a1", "SELECT $1::int * 2"), msg::describe_statement("a1"), msg::parse("", "SELECT $1::int + 100"), msg::describe_statement(""), msg::flush()].concat(),
            until: Until::Messages(6),
            quiet: true,
        },
        step([msg::bind("", "a1", &["21"]), msg::execute("", 0), msg::bind("", "", &["1"]), msg::execute("", 0), msg::sync()].concat(), 1),
        // Flush without Sync: answers come, the batch stays open, then is synced.
        Step { send: [msg::parse("s2", "SELECT $1::int + 1"), msg::flush()].concat(), until: Until::Messages(1), quiet: true },
        step([msg::bind("", "s2", &["41"]), msg::execute("", 0), msg::sync()].concat(), 1),
        // A lone Flush and a lone Sync.
        Step { send: msg::flush(), until: Until::Messages(0), quiet: false },
        step(msg::sync(), 1),
        // An error in the middle of a pipeline: skipped to its Sync, the rest runs.
        step([msg::extended("SELECT 1", &[]), msg::extended("SELECT 1/0", &[]), msg::extended("SELECT 3", &[]), msg::query("SELECT 4")].concat(), 4),
        step([msg::parse("", "SELEC 1"), msg::bind("", "", &[]), msg::execute("", 0), msg::parse("", "SELECT 2"), msg::sync()].concat(), 1),
        // COPY FROM STDIN, simple protocol.
        step([msg::query("COPY t FROM STDIN"), msg::copy_data("10\tx\n11\ty\n"), msg::copy_done()].concat(), 1),
        // COPY FROM STDIN, extended, libpq's way: a Sync before the data, one after.
        step([msg::extended("COPY t FROM STDIN", &[]), msg::copy_data("12\tz\n"), msg::copy_done(), msg::sync()].concat(), 1),
        // The same with bad data: the error ends COPY, the second Sync answers.
        step([msg::extended("COPY t FROM STDIN", &[]), msg::copy_data("not a number\tz\n"), msg::copy_done(), msg::sync()].concat(), 1),
        // CopyFail, simple protocol.
        step([msg::query("COPY t FROM STDIN"), msg::copy_data("13\tw\n"), msg::copy_fail("changed my mind")].concat(), 1),
        // COPY TO STDOUT through both protocols.
        step(msg::query("COPY (SELECT n, s FROM t ORDER BY n) TO STDOUT"), 1),
        step(msg::extended("COPY (SELECT n FROM t ORDER BY n) TO STDOUT", &[]), 1),
        // Stray COPY messages outside COPY are ignored by PostgreSQL.
        step([msg::copy_data("ignored"), msg::copy_done(), msg::query("SELECT count(*) FROM t")].concat(), 1),
        // FunctionCall.
        step(msg::function_call(oid), 1),
        // A transaction block, a failed one, and its end.
        step(msg::query("BEGIN; INSERT INTO t VALUES (20, 'tx')"), 1),
        step(msg::extended("SELECT 1/0", &[]), 1),
        step([msg::extended("SELECT 1", &[]), msg::query("SELECT 2"), msg::function_call(oid)].concat(), 3),
        step(msg::query("COMMIT"), 1),
        // Notices and a notification of our own.
        step(msg::query("DO $$ BEGIN RAISE NOTICE 'hello'; END $$; LISTEN ch; NOTIFY ch, 'payload'"), 1),
        step([msg::close_statement("s1"), msg::close_statement("s2"), msg::sync()].concat(), 1),
        step(msg::query("SELECT n, s FROM t ORDER BY n"), 1),
    ]
}

fn trust_proxy(c: &mut pgcutover::config::Config) {
    c.auth.method = AuthMethod::Trust;
}

#[tokio::test]
async fn every_corner_gets_the_replies_postgresql_gives() {
    let _fence = FENCE.read().await;
    let f = fixture();
    let db = database("conf_corners").await;
    let proxy = f.proxy(trust_proxy).await;
    let script = corner_script(&db).await;
    let direct = play(f.blue().port, &db, &script).await;
    let proxied = play(proxy.port(), &db, &script).await;
    assert_same(&direct, &proxied, "no pause");
    // After all of that the session is idle: a pause waits for nobody.
    let rows = proxy.admin("PAUSE 1s").await.expect("nothing in flight after the script");
    assert_eq!(rows[0][2].as_deref(), Some("0"), "{rows:?}");
    proxy.admin("RESUME").await.unwrap();
}

/// Plays each step with the gate closed as it is sent, and opens it a little later:
/// a request held whole and then run gives the same replies.
#[tokio::test]
async fn every_corner_held_at_a_closed_gate_gets_the_same_replies() {
    let _fence = FENCE.read().await;
    let f = fixture();
    let db = database("conf_held").await;
    let proxy = f.proxy(trust_proxy).await;
    let script = corner_script(&db).await;
    let direct = play(f.blue().port, &db, &script).await;

    let mut raw = login(proxy.port(), &db).await;
    let mut proxied: Vec<Reply> = Vec::new();
    for (i, s) in script.iter().enumerate() {
        // Only a client outside any transaction and batch (or in a batch that only
        // prepared) is held; inside one the request goes on (and a pause would
        // wait for it).
        let idle = match proxied.last() {
            None => true,
            Some(r) => r.last().is_some_and(|(t, b)| *t == b'Z' && b == b"I"),
        } || i > 0 && script[i - 1].quiet;
        if idle {
            let rows = proxy.admin("PAUSE 2s").await.expect("each step starts at a request boundary");
            assert_eq!(rows[0][2].as_deref(), Some("0"), "in flight between steps: {rows:?}");
        }
        raw.send(&s.send).await;
        if idle {
            tokio::time::sleep(Duration::from_millis(30)).await;
            proxy.admin("RESUME").await.unwrap();
        }
        proxied.push(read_step(&mut raw, s.until).await);
    }
    assert_same(&direct, &proxied, "held at the gate");
}

/// The accounting never leaves a session "in flight" after COPY over the extended
/// protocol or a lone Flush, and the gate holds that session's next request.
#[tokio::test]
async fn after_extended_copy_or_a_lone_flush_a_pause_waits_for_nobody_and_holds_the_next_request() {
    let _fence = FENCE.read().await;
    let f = fixture();
    let db = database("conf_copy_pause").await;
    let proxy = f.proxy(trust_proxy).await;
    let mut raw = login(proxy.port(), &db).await;
    raw.query("CREATE TABLE t (n int)").await;
    raw.until_ready().await;
    raw.send(&[msg::extended("COPY t FROM STDIN", &[]), msg::copy_data("1\n2\n"), msg::copy_done(), msg::sync()].concat()).await;
    let reply = read_step(&mut raw, Until::Ready(1)).await;
    assert!(reply.iter().any(|(t, b)| *t == b'C' && b.starts_with(b"COPY 2")), "{reply:?}");
    raw.send(&msg::flush()).await;

    let rows = proxy.admin("PAUSE 300ms").await.expect("nothing in flight");
    assert_eq!(rows[0][2].as_deref(), Some("0"), "{rows:?}");
    raw.query("INSERT INTO t VALUES (3)").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let count: i64 = f.blue().connect(&db).await.unwrap().query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(count, 2, "the request went through a closed gate");
    proxy.admin("RESUME").await.unwrap();
    raw.until_ready().await;
    let count: i64 = f.blue().connect(&db).await.unwrap().query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(count, 3);
}

/// Inside a failed transaction PostgreSQL answers every message type in its own
/// way; after the proxy ends a transaction at a drain deadline, the client gets the
/// one 40001 first, then exactly what PostgreSQL answers in a failed transaction.
#[tokio::test]
async fn a_transaction_ended_at_the_deadline_answers_every_message_as_a_failed_one() {
    let _fence = FENCE.read().await;
    let f = fixture();
    let db = database("conf_ended").await;
    let proxy = f.proxy(|c| {
        trust_proxy(c);
        c.cutover.on_drain_timeout = OnDrainTimeout::Cancel;
    })
    .await;
    let admin = f.blue().connect(&db).await.unwrap();
    admin.batch_execute("CREATE TABLE t (n int); GRANT ALL ON t TO trustuser").await.unwrap();
    let oid: u32 = admin.query_one("SELECT 'pg_catalog.int4abs'::regproc::oid", &[]).await.unwrap().get(0);
    let setup = vec![step(msg::parse("ins", "INSERT INTO t VALUES ($1)"), 0), step(msg::sync(), 1), step(msg::query("BEGIN"), 1), step([msg::bind("", "ins", &["1"]), msg::execute("", 0), msg::sync()].concat(), 1)];
    // What PostgreSQL answers inside a failed transaction, message type by message type.
    let after = vec![
        step(msg::query("INSERT INTO t VALUES (2)"), 1),
        step([msg::bind("", "ins", &["3"]), msg::execute("", 0), msg::sync()].concat(), 1),
        step(msg::extended("INSERT INTO t VALUES (4)", &[]), 1),
        step(msg::function_call(oid), 1),
        step([msg::parse("rb", "ROLLBACK"), msg::describe_statement("rb"), msg::sync()].concat(), 1),
        step(msg::sync(), 1),
        step(msg::query("COMMIT"), 1),
        step(msg::query("SELECT count(*) FROM t"), 1),
    ];

    // Directly: the transaction fails on an error of its own.
    let mut direct = Raw::connect(f.blue().port).await;
    direct.startup(&[("user", "trustuser"), ("database", &db)]).await;
    direct.until_ready().await;
    for s in &setup {
        direct.send(&s.send).await;
        read_step(&mut direct, s.until).await;
    }
    direct.send(&[msg::bind("", "ins", &["x"]), msg::execute("", 0), msg::sync()].concat()).await;
    let first_direct = read_step(&mut direct, Until::Ready(1)).await;
    let mut expected = Vec::new();
    for s in &after {
        direct.send(&s.send).await;
        expected.push(read_step(&mut direct, s.until).await);
    }

    // Through the proxy: the transaction is ended at a pause's deadline.
    let mut raw = login(proxy.port(), &db).await;
    for s in &setup {
        raw.send(&s.send).await;
        read_step(&mut raw, s.until).await;
    }
    let rows = proxy.admin("PAUSE 200ms").await.expect("the deadline ends the idle transaction");
    assert_eq!(rows[0][3].as_deref(), Some("1"), "{rows:?}");
    proxy.admin("RESUME").await.unwrap();
    // The reused prepared statement is the first request: it gets the 40001.
    raw.send(&[msg::bind("", "ins", &["2"]), msg::execute("", 0), msg::sync()].concat()).await;
    let first = read_step(&mut raw, Until::Ready(1)).await;
    let tags: Vec<u8> = first.iter().map(|(t, _)| *t).collect();
    let direct_tags: Vec<u8> = first_direct.iter().map(|(t, _)| *t).collect();
    assert_eq!(tags, direct_tags, "shaped like a failing first message: {}", show(std::slice::from_ref(&first)));
    assert!(first[0].1.windows(5).any(|w| w == b"40001"), "{}", show(std::slice::from_ref(&first)));
    assert_eq!(first.last().unwrap().1, b"E");
    let mut proxied = Vec::new();
    for s in &after {
        raw.send(&s.send).await;
        proxied.push(read_step(&mut raw, s.until).await);
    }
    assert_same(&expected, &proxied, "after the ended transaction");
    let n: i64 = admin.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "nothing of the ended transaction was committed");
}

/// A FunctionCall after the ended transaction gets its answer (it used to wait for
/// a Sync that never comes).
#[tokio::test]
async fn a_function_call_after_an_ended_transaction_is_answered_at_once() {
    let _fence = FENCE.read().await;
    let f = fixture();
    let db = database("conf_ended_fcall").await;
    let proxy = f.proxy(|c| {
        trust_proxy(c);
        c.cutover.on_drain_timeout = OnDrainTimeout::Cancel;
    })
    .await;
    let oid: u32 = f.blue().connect(&db).await.unwrap().query_one("SELECT 'pg_catalog.int4abs'::regproc::oid", &[]).await.unwrap().get(0);
    let mut raw = login(proxy.port(), &db).await;
    raw.query("BEGIN").await;
    raw.until_ready().await;
    proxy.admin("PAUSE 100ms").await.unwrap();
    proxy.admin("RESUME").await.unwrap();
    raw.send(&msg::function_call(oid)).await;
    let reply = read_step(&mut raw, Until::Ready(1)).await;
    assert_eq!(reply.iter().map(|(t, _)| *t).collect::<Vec<_>>(), b"EZ", "{}", show(std::slice::from_ref(&reply)));
    assert!(reply[0].1.windows(5).any(|w| w == b"40001"));
    raw.query("ROLLBACK").await;
    let reply = read_step(&mut raw, Until::Ready(1)).await;
    assert_eq!(reply.last().unwrap().1, b"I");
}

/// A request held at the gate whose client goes away is dropped, never run.
#[tokio::test]
async fn a_held_request_whose_client_left_never_runs() {
    let _fence = FENCE.read().await;
    let f = fixture();
    let db = database("conf_held_gone").await;
    let proxy = f.proxy(trust_proxy).await;
    let mut raw = login(proxy.port(), &db).await;
    raw.query("CREATE TABLE t (n int)").await;
    raw.until_ready().await;
    let mut terminating = login(proxy.port(), &db).await;

    proxy.admin("PAUSE").await.unwrap();
    raw.query("INSERT INTO t VALUES (1)").await;
    terminating.send(&[msg::query("INSERT INTO t VALUES (2)"), msg::frame(b'X', &[])].concat()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(raw);
    assert!(terminating.closed().await);
    let p = proxy.proxy().clone();
    assert!(common::eventually(5, || async { p.sessions.is_empty() }).await, "the sessions ended while held");
    proxy.admin("RESUME").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n: i64 = f.blue().connect(&db).await.unwrap().query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "a held request ran after its client had left");
}

/// Blanks the table OIDs in RowDescription (the same table has another OID on
/// another cluster).
fn without_table_oids(replies: &[Reply]) -> Vec<Reply> {
    replies
        .iter()
        .map(|r| {
            r.iter()
                .map(|(tag, body)| {
                    let mut body = body.clone();
                    if *tag == b'T' && body.len() >= 2 {
                        let n = u16::from_be_bytes([body[0], body[1]]) as usize;
                        let mut at = 2;
                        for _ in 0..n {
                            let Some(end) = body[at..].iter().position(|b| *b == 0) else { break };
                            at += end + 1;
                            if at + 18 > body.len() {
                                break;
                            }
                            body[at..at + 4].copy_from_slice(&[0; 4]);
                            at += 18;
                        }
                    }
                    (*tag, body)
                })
                .collect()
        })
        .collect()
}

/// Half of the script runs on blue, the session moves to green at a cutover, the
/// other half runs there: the replies are PostgreSQL's all along, and the session's
/// prepared statements and LISTEN went with it.
#[tokio::test]
async fn every_corner_across_a_cutover_gets_the_same_replies() {
    let _fence = FENCE.write().await;
    let f = fixture();
    let db = "conf_cutover";
    f.pair.replicated_database(db, "trustuser", "CREATE TABLE t (n int, s text); ALTER TABLE t REPLICA IDENTITY FULL").await.unwrap();
    let proxy = f.proxy(trust_proxy).await;
    let script = corner_script(db).await;
    let direct = play(f.blue().port, db, &script).await;

    let mut raw = login(proxy.port(), db).await;
    let mut proxied = Vec::new();
    // Right after asyncpg's prepare: the session moves with its batch open.
    let cut = 6;
    for (i, s) in script.iter().enumerate() {
        if i == cut {
            let rows = proxy.admin("CUTOVER green").await.expect("CUTOVER answers");
            let get = |k: &str| rows.iter().find(|r| r[0].as_deref() == Some(k)).and_then(|r| r[1].clone()).unwrap_or_default();
            assert_eq!(get("outcome"), "committed", "{rows:?}");
            assert_eq!(get("sessions_moved"), "1", "{rows:?}");
        }
        raw.send(&s.send).await;
        proxied.push(read_step(&mut raw, s.until).await);
    }
    // Blue back to how the other tests need it, before anything can fail.
    let admin = f.blue().connect("postgres").await.unwrap();
    for sql in ["SET default_transaction_read_only = off", "ALTER SYSTEM RESET default_transaction_read_only", "SELECT pg_reload_conf()"] {
        admin.batch_execute(sql).await.unwrap();
    }
    for role in ["app", "verifier_user", "md5user", "pwuser", "trustuser", "limited"] {
        admin.batch_execute(&format!("ALTER ROLE {role} LOGIN")).await.unwrap();
    }
    raw.query("SELECT inet_server_port()").await;
    let reply = raw.until_ready().await;
    assert!(reply.iter().any(|m| m.tag == b'D' && m.body.ends_with(f.green().port.to_string().as_bytes())), "the session ran on green");
    assert_same(&without_table_oids(&direct), &without_table_oids(&proxied), "across a cutover");
}
