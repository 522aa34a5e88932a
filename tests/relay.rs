//! Forwarding: everything passes unchanged, whatever its size or protocol flow.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{fixture, Raw};
use futures::{SinkExt, StreamExt};
use pgcutover::config::AuthMethod;

#[tokio::test]
async fn simple_extended_and_pipelined_queries_pass_unchanged() {
    let f = fixture();
    let db = f.database("relay_queries").await;
    let proxy = f.proxy(|_| {}).await;
    let c = proxy.connect(&db).await;
    c.batch_execute("CREATE TABLE kv (k int PRIMARY KEY, v text); INSERT INTO kv SELECT g, 'v' || g FROM generate_series(1, 1000) g").await.unwrap();
    let stmt = c.prepare("SELECT v FROM kv WHERE k = $1").await.unwrap();
    // Pipelined: tokio-postgres sends all of these before reading any answer.
    let (a, b, d) = tokio::join!(c.query_one(&stmt, &[&1i32]), c.query_one(&stmt, &[&2i32]), c.query("SELECT k FROM kv ORDER BY k", &[]));
    assert_eq!(a.unwrap().get::<_, String>(0), "v1");
    assert_eq!(b.unwrap().get::<_, String>(0), "v2");
    assert_eq!(d.unwrap().len(), 1000);
    // An error in the middle of a pipeline leaves the others intact.
    let (ok1, bad, ok2) = tokio::join!(c.query_one("SELECT 1::int", &[]), c.query_one("SELECT 1/0", &[]), c.query_one("SELECT 2::int", &[]));
    assert_eq!(ok1.unwrap().get::<_, i32>(0), 1);
    assert_eq!(common::sqlstate(&bad.unwrap_err()), "22012");
    assert_eq!(ok2.unwrap().get::<_, i32>(0), 2);
    let msgs = c.simple_query("SELECT 1; SELECT 2, 3").await.unwrap();
    assert_eq!(msgs.iter().filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))).count(), 2);
}

#[tokio::test]
async fn copy_in_and_copy_out_of_more_than_100_mb_pass() {
    let f = fixture();
    let db = f.database("relay_copy").await;
    let proxy = f.proxy(|_| {}).await;
    let c = proxy.connect(&db).await;
    c.batch_execute("CREATE UNLOGGED TABLE lines (n int, line text)").await.unwrap();
    let row = format!("{}\n", "x".repeat(1020));
    let rows = 105_000; // ~108 MB
    let sink = c.copy_in("COPY lines (line) FROM STDIN").await.unwrap();
    futures::pin_mut!(sink);
    let chunk = Bytes::from(row.repeat(100));
    for _ in 0..rows / 100 {
        sink.send(chunk.clone()).await.unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), rows as u64);

    let stream = c.copy_out("COPY lines (line) TO STDOUT").await.unwrap();
    futures::pin_mut!(stream);
    let mut total = 0usize;
    while let Some(piece) = stream.next().await {
        total += piece.unwrap().len();
    }
    assert_eq!(total, rows * row.len());
    assert!(total > 100 * 1024 * 1024);
}

#[tokio::test]
async fn a_message_of_hundreds_of_megabytes_passes_both_ways() {
    let f = fixture();
    let db = f.database("relay_large").await;
    let proxy = f.proxy(|_| {}).await;
    let c = proxy.connect(&db).await;
    let big = "y".repeat(256 * 1024 * 1024);
    let row = c.query_one("SELECT length($1::text)::int8, $1::text", &[&big]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), big.len() as i64);
    assert_eq!(row.get::<_, &str>(1).len(), big.len());
}

async fn trust_login(port: u16, db: &str) -> (Raw, i32) {
    let mut raw = Raw::connect(port).await;
    raw.startup(&[("user", "app"), ("database", db)]).await;
    let hello = raw.until_ready().await;
    let key = hello.iter().find(|m| m.tag == b'K').expect("BackendKeyData");
    (raw, i32::from_be_bytes(key.body[..4].try_into().unwrap()))
}

#[tokio::test]
async fn notices_and_notifications_reach_the_client_with_its_own_pid() {
    let f = fixture();
    let db = f.database("relay_notify").await;
    let proxy = f.proxy(|c| c.auth.method = AuthMethod::Trust).await;
    let (mut raw, pid) = trust_login(proxy.port(), &db).await;

    raw.query("DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$").await;
    let reply = raw.until_ready().await;
    let notice = reply.iter().find(|m| m.tag == b'N').expect("NoticeResponse");
    assert_eq!(notice.message().as_deref(), Some("hello from plpgsql"));

    // Our own notification carries the pid we were given in BackendKeyData.
    raw.query("LISTEN orders; NOTIFY orders, 'mine'").await;
    let reply = raw.until_ready().await;
    let own = reply.iter().find(|m| m.tag == b'A').expect("NotificationResponse");
    assert_eq!(i32::from_be_bytes(own.body[..4].try_into().unwrap()), pid);

    // Another session's notification reaches us while we sit idle, asking nothing.
    let other = proxy.connect(&db).await;
    other.batch_execute("NOTIFY orders, 'theirs'").await.unwrap();
    let m = raw.recv().await.expect("a notification while idle");
    assert_eq!(m.tag, b'A');
    assert_ne!(i32::from_be_bytes(m.body[..4].try_into().unwrap()), pid);
    assert!(m.body.ends_with(b"orders\0theirs\0"));
}

#[tokio::test]
async fn function_call_passes() {
    let f = fixture();
    let db = f.database("relay_fcall").await;
    let proxy = f.proxy(|c| c.auth.method = AuthMethod::Trust).await;
    let admin = f.blue().connect(&db).await.unwrap();
    let oid: u32 = admin.query_one("SELECT 'pg_catalog.int4abs'::regproc::oid", &[]).await.unwrap().get(0);
    let (mut raw, _) = trust_login(proxy.port(), &db).await;
    // FunctionCall: oid, 1 argument format (binary), 1 argument (-42), binary result.
    let mut body = Vec::new();
    body.extend_from_slice(&oid.to_be_bytes());
    body.extend_from_slice(&[0, 1, 0, 1, 0, 1]);
    body.extend_from_slice(&4i32.to_be_bytes());
    body.extend_from_slice(&(-42i32).to_be_bytes());
    body.extend_from_slice(&[0, 1]);
    raw.send_message(b'F', &body).await;
    let reply = raw.until_ready().await;
    let v = reply.iter().find(|m| m.tag == b'V').expect("FunctionCallResponse");
    assert_eq!(&v.body[..], &[0, 0, 0, 4, 0, 0, 0, 42]);
}

#[tokio::test]
async fn pgbench_runs_with_zero_failures_in_every_query_mode() {
    let f = fixture();
    let db = f.database("relay_pgbench").await;
    let proxy = f.proxy(|_| {}).await;
    let url = format!("host=127.0.0.1 port={} user=app dbname={db}", proxy.port());
    let init = tokio::process::Command::new(common::pg_program("pgbench")).args(["-i", "-q", "-s", "1", &url]).env("PGPASSWORD", common::PASSWORD).output().await.unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    for mode in ["simple", "extended", "prepared"] {
        let out = tokio::process::Command::new(common::pg_program("pgbench"))
            .args(["-n", "-M", mode, "-c", "4", "-j", "2", "-t", "150", &url])
            .env("PGPASSWORD", common::PASSWORD)
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{mode}: {text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("number of transactions actually processed: 600/600"), "{mode}: {text}");
        assert!(text.contains("number of failed transactions: 0 "), "{mode}: {text}");
    }
}

#[tokio::test]
async fn terminate_ends_the_backend_session_too() {
    let f = fixture();
    let db = f.database("relay_terminate").await;
    let proxy = f.proxy(|c| c.auth.method = AuthMethod::Trust).await;
    let (mut raw, _) = {
        let mut raw = Raw::connect(proxy.port()).await;
        raw.startup(&[("user", "app"), ("database", &db), ("application_name", "goodbye")]).await;
        raw.until_ready().await;
        (raw, ())
    };
    let admin = f.blue().connect("postgres").await.unwrap();
    let count = || async { admin.query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'goodbye'", &[]).await.unwrap().get::<_, i64>(0) };
    assert_eq!(count().await, 1);
    raw.send_message(b'X', &[]).await;
    assert!(raw.closed().await);
    assert!(common::eventually(10, || async { count().await == 0 }).await);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn the_fixture_replicates_blue_to_green() {
    let f = fixture();
    f.pair.replicated_database("relay_replication", "app", "CREATE TABLE events (id bigserial PRIMARY KEY, what text)").await.unwrap();
    let proxy = f.proxy(|_| {}).await;
    let c = proxy.connect("relay_replication").await;
    c.execute("INSERT INTO events (what) VALUES ('through the proxy')", &[]).await.unwrap();
    let green = f.green().connect("relay_replication").await.unwrap();
    let seen = common::eventually(10, || async {
        green.query_one("SELECT count(*) FROM events WHERE what = 'through the proxy'", &[]).await.unwrap().get::<_, i64>(0) == 1
    })
    .await;
    assert!(seen, "the row did not replicate to green");
}

/// A TLS client that stops reading while a large result arrives still gets all of
/// it, ReadyForQuery included: writes to a TLS stream are flushed (tokio-rustls may
/// take the plaintext and keep ciphertext buffered behind a full socket).
#[tokio::test]
async fn a_slow_tls_reader_gets_the_whole_response_to_its_ready_for_query() {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = fixture();
    let db = f.database("relay_tls_slow").await;
    let proxy = f
        .proxy(|c| {
            c.auth.method = AuthMethod::Trust;
            c.proxy.tls_cert = Some(f.certs.cert_path());
            c.proxy.tls_key = Some(f.certs.key_path());
            c.proxy.tls_mode = pgcutover::config::ClientTlsMode::Require;
        })
        .await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut f.certs.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port())).await.unwrap();
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await.unwrap();
    assert_eq!(tcp.read_u8().await.unwrap(), b'S');
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    tls.write_all(&pgcutover::protocol::startup::encode_startup(&[("user".into(), "app".into()), ("database".into(), db.clone())])).await.unwrap();
    let mut buf = Vec::new();
    // Reads messages until `readies` ReadyForQuery have come; returns the bytes seen.
    async fn until_ready<S: tokio::io::AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>, mut readies: usize) -> usize {
        let mut seen = 0;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            while buf.len() >= 5 {
                let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize + 1;
                if buf.len() < len {
                    break;
                }
                if buf[0] == b'Z' {
                    readies -= 1;
                }
                seen += len;
                buf.drain(..len);
                if readies == 0 {
                    return seen;
                }
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed");
            buf.extend_from_slice(&chunk[..n]);
        }
    }
    until_ready(&mut tls, &mut buf, 1).await;
    let mut q = b"Q\0\0\0\0SELECT repeat('x', 1000) FROM generate_series(1, 30000)\0".to_vec();
    let len = (q.len() - 1) as u32;
    q[1..5].copy_from_slice(&len.to_be_bytes());
    tls.write_all(&q).await.unwrap();
    // Read nothing while the proxy fills the socket.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = tokio::time::timeout(Duration::from_secs(20), until_ready(&mut tls, &mut buf, 1)).await.expect("the tail of the response never came");
    assert!(seen > 30_000 * 1000);
}
