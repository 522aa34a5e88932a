//! From the first byte to a relayed session: TLS, protocol negotiation, client and
//! backend authentication, startup parameters, backend refusals, cancel.

mod common;

use std::time::Duration;

use common::{fixture, sqlstate, Raw, PASSWORD};
use pgcutover::config::{AuthMethod, BackendTlsMode, ClientTlsMode};

#[tokio::test]
async fn scram_login_works_over_tcp_and_the_unix_socket() {
    let f = fixture();
    let db = f.database("hs_scram").await;
    let proxy = f.proxy(|_| {}).await;
    let client = proxy.connect(&db).await;
    let row = client.query_one("SELECT current_user::text, current_database()::text", &[]).await.unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, String>(1)), ("app".into(), db.clone()));

    let conninfo = format!("host={} port={} user=app password={PASSWORD} dbname={db}", proxy.socket_dir().display(), proxy.port());
    let (ok, out, err) = common::psql(&conninfo, &["-Atc", "SELECT 'via unix socket'"]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "via unix socket");
}

#[tokio::test]
async fn wrong_password_and_unknown_user_get_the_same_fatal_28p01() {
    let f = fixture();
    let proxy = f.proxy(|_| {}).await;
    let wrong = proxy.connect_as("app", "nope", "postgres").await.unwrap_err();
    let unknown = proxy.connect_as("ghost", "nope", "postgres").await.unwrap_err();
    for (e, user) in [(&wrong, "app"), (&unknown, "ghost")] {
        let db = e.as_db_error().expect("a server error");
        assert_eq!(db.code().code(), "28P01");
        assert_eq!(db.severity(), "FATAL");
        assert_eq!(db.message(), format!("password authentication failed for user \"{user}\""));
    }
}

#[tokio::test]
async fn md5_clients_and_md5_backends_log_in() {
    let f = fixture();
    let db = f.database("hs_md5").await;
    let proxy = f.proxy(|c| c.auth.method = AuthMethod::Md5).await;
    // app: md5 to the proxy, SCRAM to the backend; md5user: md5 on both legs.
    proxy.connect(&db).await.simple_query("SELECT 1").await.unwrap();
    let c = proxy.connect_as("md5user", "md5pass", &db).await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    assert_eq!(sqlstate(&proxy.connect_as("md5user", "bad", &db).await.unwrap_err()), "28P01");
}

#[tokio::test]
async fn trust_clients_and_cleartext_or_trust_backends_log_in() {
    let f = fixture();
    let db = f.database("hs_trust").await;
    let proxy = f.proxy(|c| c.auth.method = AuthMethod::Trust).await;
    for user in ["pwuser", "trustuser", "app"] {
        let c = proxy.connect_as(user, "", &db).await.unwrap_or_else(|e| panic!("{user}: {e:?}"));
        let who: String = c.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
        assert_eq!(who, user);
    }
}

#[tokio::test]
async fn a_scram_verifier_in_the_config_logs_in_to_the_backend_too() {
    let f = fixture();
    let db = f.database("hs_verifier").await;
    let proxy = f.proxy(|_| {}).await;
    let c = proxy.connect_as("verifier_user", PASSWORD, &db).await.unwrap();
    let who: String = c.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(who, "verifier_user");
    assert_eq!(sqlstate(&proxy.connect_as("verifier_user", "bad", &db).await.unwrap_err()), "28P01");
}

#[tokio::test]
async fn tls_with_scram_channel_binding_and_require_refuses_plaintext() {
    let f = fixture();
    let db = f.database("hs_tls").await;
    let proxy = f
        .proxy(|c| {
            c.proxy.tls_cert = Some(f.certs.cert_path());
            c.proxy.tls_key = Some(f.certs.key_path());
            c.proxy.tls_mode = ClientTlsMode::Require;
        })
        .await;
    let info = format!("user=app password={PASSWORD} dbname={db} sslmode=verify-full sslrootcert={} channel_binding=require", f.certs.ca_path().display());
    let (ok, out, err) = proxy.psql(&info.replace("host=127.0.0.1", ""), &["-Atc", "SELECT 'secure'"]).await;
    assert!(ok, "psql over TLS with SCRAM-SHA-256-PLUS: {err}");
    assert_eq!(out.trim(), "secure");

    let (ok, _, err) = proxy.psql(&format!("user=app password={PASSWORD} dbname={db} sslmode=disable"), &["-c", "SELECT 1"]).await;
    assert!(!ok);
    assert!(err.contains("SSL required"), "{err}");

    let (ok, _, err) = proxy.psql(&format!("user=app password=bad dbname={db} sslmode=require"), &["-c", "SELECT 1"]).await;
    assert!(!ok);
    assert!(err.contains("password authentication failed"), "{err}");
}

#[tokio::test]
async fn backend_tls_modes_encrypt_and_verify_full_checks_the_certificate() {
    let f = fixture();
    let db = f.database("hs_backend_tls").await;
    for mode in [BackendTlsMode::Prefer, BackendTlsMode::Require, BackendTlsMode::VerifyFull] {
        let proxy = f
            .proxy(|c| {
                let b = c.backends.get_mut("blue").unwrap();
                b.tls = mode;
                b.tls_ca = Some(f.certs.ca_path());
            })
            .await;
        // SCRAM over TLS to the backend: the proxy picks SCRAM-SHA-256-PLUS.
        let c = proxy.connect(&db).await;
        let ssl: bool = c.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap().get(0);
        assert!(ssl, "{mode:?}");
    }
    // verify-full against another CA fails, with a clear error and no session.
    let other_ca = f.certs.dir.join("other-ca.pem");
    std::fs::write(&other_ca, rcgen::generate_simple_self_signed(vec!["elsewhere".to_string()]).unwrap().cert.pem()).unwrap();
    let proxy = f
        .proxy(|c| {
            let b = c.backends.get_mut("blue").unwrap();
            b.tls = BackendTlsMode::VerifyFull;
            b.tls_ca = Some(other_ca.clone());
        })
        .await;
    let e = proxy.connect_as("app", PASSWORD, &db).await.unwrap_err();
    assert_eq!(sqlstate(&e), "08006");
}

/// Logs in with the trust method over a raw connection and returns the messages
/// up to the first ReadyForQuery.
async fn raw_login(port: u16, params: &[(&str, &str)]) -> (Raw, Vec<common::RawMessage>) {
    let mut raw = Raw::connect(port).await;
    raw.startup(params).await;
    let hello = raw.until_ready().await;
    (raw, hello)
}

#[tokio::test]
async fn gssenc_is_declined_and_protocol_3_2_is_negotiated_down_to_3_0() {
    let f = fixture();
    let db = f.database("hs_negotiate").await;
    let proxy = f.proxy(|c| c.auth.method = AuthMethod::Trust).await;

    let mut raw = Raw::connect(proxy.port()).await;
    raw.send(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]).await; // GSSENCRequest
    assert_eq!(raw.recv_byte().await, b'N');
    let mut packet = pgcutover::protocol::startup::encode_startup(&[("user".into(), "app".into()), ("database".into(), db.clone()), ("_pq_.something".into(), "1".into())]);
    packet[7] = 2; // protocol 3.2
    raw.send(&packet).await;
    let hello = raw.until_ready().await;
    assert_eq!(hello[0].tag, b'v', "NegotiateProtocolVersion first");
    let mut body = hello[0].body.clone();
    use bytes::Buf;
    assert_eq!(body.get_i32(), 3 << 16);
    assert_eq!(body.get_i32(), 1);
    assert_eq!(&body[..], b"_pq_.something\0");
    assert!(hello.iter().any(|m| m.tag == b'R'));
    assert_eq!(hello.last().unwrap().tag, b'Z');
    raw.query("SELECT 1").await;
    assert!(raw.until_ready().await.iter().any(|m| m.tag == b'D'));
}

#[tokio::test]
async fn startup_parameters_reach_the_backend_and_parameter_status_reaches_the_client() {
    let f = fixture();
    let db = f.database("hs_params").await;
    let proxy = f.proxy(|_| {}).await;
    let info = format!("user=app password={PASSWORD} dbname={db} application_name=shopfront options='-c search_path=audit,public -c work_mem=7MB' client_encoding=LATIN1");
    let (ok, out, err) = proxy.psql(&info, &["-At", "-c", "SELECT current_setting('application_name'), current_setting('search_path'), current_setting('work_mem')", "-c", "\\encoding", "-c", "SET client_encoding TO 'UTF8'", "-c", "\\encoding"]).await;
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, vec!["shopfront|audit,public|7MB", "LATIN1", "SET", "UTF8"], "{out}");

    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1").port(proxy.port()).user("app").password(PASSWORD).dbname(&db).options("-c TimeZone=Asia/Tokyo -c DateStyle=German");
    let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let tz: String = c.query_one("SELECT current_setting('TimeZone')", &[]).await.unwrap().get(0);
    assert_eq!(tz, "Asia/Tokyo");
}

#[tokio::test]
async fn backend_refusals_reach_the_client_as_the_backends_own_errors() {
    let f = fixture();
    let db = f.database("hs_refusals").await;
    let proxy = f.proxy(|c| c.auth.users.iter_mut().filter(|u| u.name == "pwuser").for_each(|u| u.password = Some("not-the-db-password".into()))).await;

    let e = proxy.connect_as("app", PASSWORD, "no_such_db").await.unwrap_err();
    assert_eq!(sqlstate(&e), "3D000");
    assert!(e.as_db_error().unwrap().message().contains("no_such_db"));

    let e = proxy.connect_as("pwuser", "not-the-db-password", &db).await.unwrap_err();
    assert_eq!(sqlstate(&e), "28P01");

    let first = proxy.connect_as("limited", PASSWORD, &db).await.unwrap();
    let e = proxy.connect_as("limited", PASSWORD, &db).await.unwrap_err();
    assert_eq!(sqlstate(&e), "53300");
    first.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn cancel_request_cancels_the_running_query_and_a_forged_key_cancels_nothing() {
    let f = fixture();
    let db = f.database("hs_cancel").await;
    let proxy = f.proxy(|_| {}).await;
    let client = proxy.connect(&db).await;
    let token = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(tokio_postgres::NoTls).await
    });
    let e = client.simple_query("SELECT pg_sleep(30)").await.unwrap_err();
    assert_eq!(sqlstate(&e), "57014");
    canceller.await.unwrap().unwrap();

    // A forged key: the query runs to its end.
    let trusting = f.proxy(|c| c.auth.method = AuthMethod::Trust).await;
    let (mut raw, hello) = raw_login(trusting.port(), &[("user", "app"), ("database", &db)]).await;
    let key = hello.iter().find(|m| m.tag == b'K').expect("BackendKeyData");
    let pid = i32::from_be_bytes(key.body[..4].try_into().unwrap());
    let secret = i32::from_be_bytes(key.body[4..8].try_into().unwrap());
    raw.query("SELECT pg_sleep(1)").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let forged = pgcutover::protocol::startup::encode_cancel(pgcutover::protocol::startup::CancelKey { pid, secret: secret.wrapping_add(1) });
    let mut c = tokio::net::TcpStream::connect(raw.stream.peer_addr().unwrap()).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut c, &forged).await.unwrap();
    let reply = raw.until_ready().await;
    assert!(reply.iter().all(|m| m.tag != b'E'), "the forged key cancelled the query");
}
