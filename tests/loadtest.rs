//! `pgcutover loadtest`, `/metrics` and `pgcutover demo`, end to end.

mod common;

use std::time::Duration;

use common::{fixture, Served, PASSWORD};

async fn loadtest(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgcutover")).arg("loadtest").args(args).output().await.unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn loadtest_without_a_cutover_reports_latencies_and_finds_every_write() {
    let f = fixture();
    let db = f.database("lt_plain").await;
    let proxy = f.proxy(|_| {}).await;
    let url = format!("postgres://app:{PASSWORD}@127.0.0.1:{}/{db}", proxy.port());
    for mode in ["simple", "extended", "prepared"] {
        let (ok, out, err) = loadtest(&["--url", &url, "--clients", "4", "--duration", "1500ms", "--mode", mode, "--init", "--json"]).await;
        assert!(ok, "{mode}: {out}{err}");
        let r: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert!(r["transactions"].as_u64().unwrap() > 10, "{r}");
        assert_eq!(r["errors"], serde_json::json!({}));
        assert_eq!(r["lost_writes"]["ok"], true, "{r}");
        assert_eq!(r["lost_writes"]["committed"], r["transactions"]);
        assert!(r["cutover_window"].is_null());
        assert!(r["steady"]["p99_ms"].as_f64().unwrap() > 0.0);
        // Structure, not how many buckets a busy machine filled: every transaction
        // is in one 100 ms bucket, in time order.
        let timeline = r["timeline"].as_array().unwrap();
        assert!(!timeline.is_empty(), "{r}");
        let in_buckets: u64 = timeline.iter().map(|b| b["transactions"].as_u64().unwrap()).sum();
        assert_eq!(in_buckets, r["transactions"].as_u64().unwrap(), "{r}");
        assert!(timeline.windows(2).all(|w| w[0]["t"].as_f64() < w[1]["t"].as_f64()), "{r}");
    }
    let (ok, out, _) = loadtest(&["--url", &url, "--clients", "2", "--duration", "500ms", "--workload", "select"]).await;
    assert!(ok);
    assert!(out.contains("steady state") && out.contains("errors: none"), "{out}");

    // A SQL file: its statements, in order, as one iteration.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("work.sql");
    // Concurrent CREATE TABLE IF NOT EXISTS can collide in the catalog: create it first.
    f.blue().execute(&db, "CREATE TABLE hits (n int); GRANT ALL ON hits TO app").await.unwrap();
    std::fs::write(&file, "INSERT INTO hits VALUES (1);\nSELECT count(*) FROM hits;").unwrap();
    for mode in ["simple", "prepared"] {
        let (ok, out, err) = loadtest(&["--url", &url, "--clients", "2", "--duration", "500ms", "--mode", mode, "--workload", file.to_str().unwrap(), "--json"]).await;
        assert!(ok, "{out}{err}");
        let r: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(r["workload"], "file");
        assert_eq!(r["errors"], serde_json::json!({}), "{r}");
        assert!(r["lost_writes"].is_null());
    }
    let hits: i64 = f.blue().connect(&db).await.unwrap().query_one("SELECT count(*) FROM hits", &[]).await.unwrap().get(0);
    assert!(hits > 0);
}

#[tokio::test]
async fn loadtest_with_a_cutover_lines_up_the_proxy_report_and_plots_it() {
    // A fence is cluster-wide: this test gets a blue/green pair of its own, so that
    // the other tests here keep a writable blue.
    let f = fixture();
    let pair = pgcutover::cluster::Pair::start(&Default::default()).unwrap();
    for c in [&pair.blue, &pair.green] {
        c.execute("postgres", &format!("CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'")).await.unwrap();
    }
    // Replicated FOR ALL TABLES, the usual setup, with no table yet: --init creates
    // the workload's tables on green first, then through the proxy on blue, and
    // refreshes green's subscription.
    let db = "lt_cutover";
    pair.replicated_database(db, "app", "SELECT 1").await.unwrap();
    let (own_blue, own_green) = (pair.blue.port, pair.green.port);
    let s = Served::start(|t| {
        t.replace(&format!("port = {}", f.blue().port), &format!("port = {own_blue}")).replace(&format!("port = {}", f.green().port), &format!("port = {own_green}"))
    })
    .await;
    let url = format!("postgres://app:{PASSWORD}@127.0.0.1:{}/{db}", s.port);
    let plot = s.dir.path().join("run.svg");
    let config = s.config_path();
    let (ok, out, err) = loadtest(&[
        "--url", &url, "--clients", "8", "--duration", "3s", "--cutover-at", "1s", "--init",
        "--config", config.to_str().unwrap(), "--plot", plot.to_str().unwrap(), "--json",
    ])
    .await;
    assert!(ok, "{out}{err}\n{}", s.log());
    let r: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(r["cutover"]["outcome"], "committed", "{r}");
    assert_eq!(r["cutover"]["sessions_moved"], 8);
    assert_eq!(r["errors"], serde_json::json!({}), "{r}");
    assert_eq!(r["lost_writes"]["ok"], true, "{r}");
    assert!(r["cutover_window"]["count"].as_u64().unwrap() > 0);
    let (t0, t1) = (r["cutover_started_s"].as_f64().unwrap(), r["cutover_ended_s"].as_f64().unwrap());
    // A timer never fires early; how late it fires is up to the machine.
    assert!(t0 >= 0.99 && t1 > t0, "{t0} {t1}");
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("cutover paused"), "{}", &svg[..200.min(svg.len())]);
    // Every order landed on green, where the proxy ends.
    let on_green: i64 = pair.green.connect(db).await.unwrap().query_one("SELECT count(*) FROM loadtest_orders", &[]).await.unwrap().get(0);
    assert_eq!(on_green as u64, r["lost_writes"]["committed"].as_u64().unwrap());
}

#[tokio::test]
async fn a_cutover_request_that_fails_is_reported_and_fails_the_load_test() {
    let f = fixture();
    let db = f.database("lt_failed_request").await;
    let proxy = f.proxy(|_| {}).await;
    let url = format!("postgres://app:{PASSWORD}@127.0.0.1:{}/{db}", proxy.port());
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-proxy.toml");
    let (ok, _, err) = loadtest(&["--url", &url, "--clients", "1", "--duration", "200ms", "--init", "--config", missing.to_str().unwrap()]).await;
    assert!(!ok && err.contains("no-such-proxy.toml"), "--init with a missing configuration: {err}");
    let (ok, out, err) = loadtest(&["--url", &url, "--clients", "1", "--duration", "200ms", "--init"]).await;
    assert!(ok, "{out}{err}");
    let (ok, out, err) = loadtest(&["--url", &url, "--clients", "2", "--duration", "1s", "--cutover-at", "300ms", "--config", missing.to_str().unwrap(), "--json"]).await;
    assert!(!ok, "a cutover that never happened passed the load test: {out}{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(r["cutover"]["outcome"], "request failed", "{r}");
    assert!(r["cutover"]["reason"].as_str().unwrap().contains("no-such-proxy.toml"), "{r}");
    assert!(err.contains("did not commit"), "{err}");

    // The table says so too; and a proxy whose admin socket is not there.
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, f.config_text(&dir.path().join("sock"), "127.0.0.1:1")).unwrap();
    let (ok, out, _) = loadtest(&["--url", &url, "--clients", "2", "--duration", "1s", "--cutover-at", "300ms", "--config", config.to_str().unwrap()]).await;
    assert!(!ok);
    assert!(out.contains("CUTOVER NOT COMMITTED: request failed") && out.contains("admin console"), "{out}");
}

#[tokio::test]
async fn init_without_a_configuration_says_what_the_target_needs() {
    let f = fixture();
    let db = f.database("lt_init_alone").await;
    let proxy = f.proxy(|_| {}).await;
    let url = format!("postgres://app:{PASSWORD}@127.0.0.1:{}/{db}", proxy.port());
    let (ok, out, err) = loadtest(&["--url", &url, "--clients", "1", "--duration", "200ms", "--init"]).await;
    assert!(ok, "{out}{err}");
    assert!(err.contains("REFRESH PUBLICATION") && err.contains("CREATE TABLE IF NOT EXISTS loadtest_orders"), "{err}");
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    text.split_once("\r\n\r\n").unwrap().1.to_string()
}

#[tokio::test]
async fn metrics_are_valid_prometheus_text() {
    let f = fixture();
    let db = f.database("lt_metrics").await;
    let proxy = f.proxy(|c| c.proxy.metrics_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let addr = proxy.handle.metrics_addr.unwrap();
    let c = proxy.connect(&db).await;
    for _ in 0..5 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    proxy.admin("PAUSE").await.unwrap();
    proxy.admin("RESUME").await.unwrap();
    let body = scrape(addr).await;

    // Every sample: a declared metric, valid labels, a number.
    let mut declared = std::collections::HashMap::new();
    let mut samples = std::collections::HashMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            declared.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number: {line}"));
        let name = series.split('{').next().unwrap();
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            assert!(labels.starts_with('{') && labels.ends_with('}') && labels.contains("=\""), "{line}");
        }
        let base = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
        assert!(declared.contains_key(name) || declared.get(base).is_some_and(|k| k == "histogram"), "undeclared: {line}");
        assert!(name.starts_with("pgcutover_"), "{line}");
        samples.insert(series.to_string(), value);
    }
    assert_eq!(samples["pgcutover_client_connections{state=\"idle\"}"], 1.0);
    assert!(samples["pgcutover_stats_totals_query_count"] >= 5.0);
    assert!(samples["pgcutover_stats_totals_xact_count"] >= 5.0);
    assert_eq!(samples["pgcutover_pauses_total"], 1.0);
    assert_eq!(samples["pgcutover_pause_duration_seconds_count"], 1.0);
    assert_eq!(samples["pgcutover_pause_duration_seconds_bucket{le=\"+Inf\"}"], 1.0);
    assert_eq!(samples["pgcutover_active_backend{backend=\"blue\"}"], 1.0);
    assert_eq!(samples["pgcutover_cutovers_total{outcome=\"committed\"}"], 0.0);
    assert!(samples["pgcutover_stats_totals_received_bytes"] > 0.0);
}

async fn demo(extra: &[&str]) -> (String, String, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("demo.svg");
    let log = dir.path().join("demo.log");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_pgcutover")).args(["demo", "--seconds", "4", "--plot"]).arg(&plot).arg("--log").arg(&log).args(extra).output(),
    )
    .await
    .expect("the demo finishes")
    .unwrap();
    let (text, err) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "{text}{err}");
    assert!(std::fs::read_to_string(&plot).unwrap().starts_with("<svg"));
    (text, err, log, dir)
}

#[tokio::test]
async fn the_demo_runs_end_to_end_in_a_short_mode() {
    let (text, err, log, _dir) = demo(&[]).await;
    assert!(text.contains("cutover committed"), "{text}");
    assert!(text.contains("errors: none"), "{text}");
    assert!(text.contains("lost-write check: 0 of"), "{text}");
    // The report alone on the terminal; the proxy's log in its file.
    for noise in [" INFO ", " WARN ", "\x1b["] {
        assert!(!text.contains(noise) && !err.contains(noise), "log lines on the terminal ({noise:?}): {text}{err}");
    }
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("cutover committed") && !logged.contains('\x1b'), "{logged}");

    let (text, _, _, _dir) = demo(&["--rehearse"]).await;
    assert!(text.contains("cutover rehearsed"), "{text}");
    assert!(text.contains("errors: none") && text.contains("lost-write check: 0 of"), "{text}");
}
