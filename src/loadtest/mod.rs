//! `pgcutover loadtest`: N clients run transactions through the proxy; every
//! transaction's latency is recorded; with `--cutover-at`, the proxy is asked to
//! cut over mid-run and its phase report is lined up with what the clients felt.

mod plot;
pub mod workload;

use std::collections::{BTreeMap, HashSet};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;

pub use workload::{Mode, Workload};

pub struct Options {
    pub url: String,
    /// More places to connect (the other instances of a fleet): client i connects
    /// to the i-th of `url` and these, round robin.
    pub spread: Vec<String>,
    pub clients: u32,
    pub duration: Duration,
    pub mode: Mode,
    pub workload: Workload,
    pub cutover_at: Option<Duration>,
    pub config: Option<PathBuf>,
    /// The cutover asked for is a rehearsal.
    pub rehearse: bool,
    pub plot: Option<PathBuf>,
    /// Create the built-in workload's tables (through `url`) if they are missing.
    pub init: bool,
    pub progress: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        let q = |q: f64| if h.is_empty() { 0.0 } else { h.value_at_quantile(q) as f64 / 1000.0 };
        Latency { count: h.len(), p50_ms: q(0.5), p90_ms: q(0.9), p99_ms: q(0.99), p999_ms: q(0.999), max_ms: if h.is_empty() { 0.0 } else { h.max() as f64 / 1000.0 } }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LostWrites {
    pub committed: u64,
    pub found: u64,
    pub missing: u64,
    pub duplicated: u64,
    pub ok: bool,
}

/// 100 ms of the run: the slowest transaction that ended in it, and how many ended.
#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    pub t: f64,
    pub max_ms: f64,
    pub transactions: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub clients: u32,
    pub duration_s: f64,
    pub mode: Mode,
    pub workload: String,
    pub transactions: u64,
    pub tps: f64,
    /// Transactions that did not overlap the cutover.
    pub steady: Latency,
    /// Transactions in flight at any moment of the cutover.
    pub cutover_window: Option<Latency>,
    pub errors: BTreeMap<String, u64>,
    pub lost_writes: Option<LostWrites>,
    /// Seconds from the start when the cutover was asked for and when it answered.
    pub cutover_started_s: Option<f64>,
    pub cutover_ended_s: Option<f64>,
    /// The proxy's own report, or why the request failed (`outcome`, `reason`).
    pub cutover: Option<serde_json::Value>,
    /// The cutover asked for was a rehearsal.
    pub rehearsal: bool,
    pub timeline: Vec<Bucket>,
}

/// What one client brings back.
struct ClientResult {
    id: i32,
    /// (end offset µs, latency µs) per committed or completed transaction.
    done: Vec<(u64, u64)>,
    errors: BTreeMap<String, u64>,
    committed: Vec<i64>,
}

fn error_code(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.code().code().to_string(),
        None if e.is_closed() => "connection closed".into(),
        None => "connection error".into(),
    }
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

async fn run_client(opts: Arc<Options>, id: i32, run: Arc<String>, start: Instant, deadline: Instant, done: Arc<std::sync::atomic::AtomicU64>) -> ClientResult {
    let mut result = ClientResult { id, done: Vec::new(), errors: BTreeMap::new(), committed: Vec::new() };
    let mut seq: i64 = 0;
    let url = match id as usize % (opts.spread.len() + 1) {
        0 => &opts.url,
        i => &opts.spread[i - 1],
    };
    'connect: while Instant::now() < deadline {
        let client = match connect(url).await {
            Ok(c) => c,
            Err(e) => {
                *result.errors.entry(error_code(&e)).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let prepared = match workload::prepare(&client, opts.mode).await {
            Ok(p) => p,
            Err(e) => {
                *result.errors.entry(error_code(&e)).or_default() += 1;
                continue;
            }
        };
        while Instant::now() < deadline {
            seq += 1;
            let t = Instant::now();
            match workload::run_once(&client, opts.mode, &opts.workload, prepared.as_ref(), &run, id, seq).await {
                Ok(committed) => {
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let end = start.elapsed().as_micros() as u64;
                    result.done.push((end, t.elapsed().as_micros() as u64));
                    if committed {
                        result.committed.push(seq);
                    }
                }
                Err(e) => {
                    *result.errors.entry(error_code(&e)).or_default() += 1;
                    if client.is_closed() {
                        continue 'connect;
                    }
                }
            }
        }
        break;
    }
    result
}

/// Creates the built-in workload's tables through `url` when they are missing.
///
/// With the proxy's configuration, the tables are created first on every other
/// backend (schema only, owned by the same role; the rows come by replication),
/// then through the proxy, and the subscriptions on the other backends that
/// stream from the active one are refreshed and waited for, so that the workload
/// replicates and the next cutover finds every table synchronised. Without it,
/// the operator is told what to do on the target.
pub async fn init(url: &str, config: Option<&std::path::Path>) -> anyhow::Result<()> {
    let Some(path) = config else {
        init_here(url).await?;
        eprintln!(
            "loadtest: created loadtest_accounts and loadtest_orders through the proxy only. For them to replicate, create them on the target too \
             (schema only) and run ALTER SUBSCRIPTION <name> REFRESH PUBLICATION there, or pass --config to have it done:\n{}",
            workload::SCHEMA.trim()
        );
        return Ok(());
    };
    let config = crate::config::Config::load(path)?;
    let pg: tokio_postgres::Config = url.parse().context("--url")?;
    let db = pg.get_dbname().or(pg.get_user()).context("--url names no database")?.to_string();
    let role = pg.get_user().context("--url names no user")?.to_string();
    let active = crate::state::path(&config, Some(path)).and_then(|p| crate::state::load(&p)).unwrap_or_else(|| config.cutover.active.clone());
    let others: Vec<(&String, &crate::config::BackendConfig)> = config.backends.iter().filter(|(name, _)| **name != active).collect();
    let ident = crate::session::migrate::quote_ident(&role);
    for (name, b) in &others {
        let c = crate::cutover::control_connect(b, &db, "pgcutover loadtest --init").await.with_context(|| format!("backend {name}"))?;
        c.batch_execute(&format!("SET ROLE {ident}; {}", workload::SCHEMA)).await.with_context(|| format!("creating the load-test tables on {name}"))?;
    }
    init_here(url).await?;
    let active_cfg = config.backends.get(&active).with_context(|| format!("the active backend {active:?} is not in the configuration"))?;
    let src = crate::cutover::control_connect(active_cfg, &db, "pgcutover loadtest --init").await.with_context(|| format!("backend {active}"))?;
    for (name, b) in &others {
        let c = crate::cutover::control_connect(b, &db, "pgcutover loadtest --init").await.with_context(|| format!("backend {name}"))?;
        let refreshed = crate::cutover::refresh_subscriptions_from(&src, &c, std::time::Duration::from_secs(120)).await.with_context(|| format!("refreshing the subscriptions on {name}"))?;
        if !refreshed.is_empty() {
            eprintln!("loadtest: {name}: refreshed {} and waited for the new tables' initial copy", refreshed.join(", "));
        }
    }
    Ok(())
}

async fn init_here(url: &str) -> anyhow::Result<()> {
    let c = connect(url).await.context("cannot connect to create the load-test tables")?;
    c.batch_execute(workload::SCHEMA).await?;
    c.batch_execute(&workload::fill_accounts()).await?;
    Ok(())
}

/// What became of the cutover the load test asked for: the proxy's report, or a
/// failed request (the admin socket unreachable, no such configuration file).
fn failed_request(e: &anyhow::Error) -> serde_json::Value {
    serde_json::json!({ "outcome": "request failed", "reason": format!("{e:#}") })
}

pub async fn run(opts: Options) -> anyhow::Result<Report> {
    if opts.init && (opts.workload.checks_writes() || opts.workload == Workload::Select) {
        init(&opts.url, opts.config.as_deref()).await?;
    }
    if opts.cutover_at.is_some() && opts.config.is_none() {
        anyhow::bail!("--cutover-at needs --config (the proxy's admin socket)");
    }
    let opts = Arc::new(opts);
    let run_id = Arc::new(format!("{:x}", rand::random::<u64>()));
    let start = Instant::now();
    let deadline = start + opts.duration;
    let mut tasks = tokio::task::JoinSet::new();
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for id in 0..opts.clients {
        tasks.spawn(run_client(opts.clone(), id as i32, run_id.clone(), start, deadline, done.clone()));
    }
    let command = if opts.rehearse { "CUTOVER REHEARSE" } else { "CUTOVER" };
    let cutover = opts.cutover_at.zip(opts.config.clone()).map(|(at, config)| {
        tokio::spawn(async move {
            tokio::time::sleep(at).await;
            let t0 = start.elapsed().as_secs_f64();
            let rows = crate::cli::admin_command(&config, command).await;
            let t1 = start.elapsed().as_secs_f64();
            let report = match rows {
                Ok(rows) => rows
                    .iter()
                    .find(|r| r.first().and_then(|c| c.1.as_deref()) == Some("json"))
                    .and_then(|r| r.get(1).and_then(|c| c.1.clone()))
                    .and_then(|j| serde_json::from_str::<serde_json::Value>(&j).ok())
                    .unwrap_or_else(|| failed_request(&anyhow::anyhow!("the proxy's answer to CUTOVER holds no report"))),
                Err(e) => failed_request(&e),
            };
            (t0, t1, Some(report))
        })
    });
    let progress = (opts.progress && std::io::stdout().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    });
    if let Some(bar) = &progress {
        let bar = bar.clone();
        let total = opts.duration;
        let done = done.clone();
        tokio::spawn(async move {
            // A live line: elapsed time and the throughput of the last second.
            let mut last = (Instant::now(), 0u64);
            let mut tps = 0.0;
            while start.elapsed() < total {
                let n = done.load(std::sync::atomic::Ordering::Relaxed);
                if last.0.elapsed() >= Duration::from_secs(1) {
                    tps = (n - last.1) as f64 / last.0.elapsed().as_secs_f64();
                    last = (Instant::now(), n);
                }
                bar.set_message(format!("{:.0}/{:.0} s  {n} transactions  {tps:.0} tps", start.elapsed().as_secs_f64(), total.as_secs_f64()));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }

    let mut results = Vec::new();
    while let Some(r) = tasks.join_next().await {
        results.push(r.context("a load-test client failed")?);
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let cut = match cutover {
        Some(h) => Some(h.await.context("the cutover request failed")?),
        None => None,
    };
    let elapsed = start.elapsed().as_secs_f64();

    // Histograms: steady state, and the transactions in flight during the cutover.
    let new_hist = || Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| unreachable!());
    let (mut steady, mut window) = (new_hist(), new_hist());
    let mut errors = BTreeMap::new();
    let mut buckets: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let window_span = cut.as_ref().map(|(t0, t1, _)| ((t0 * 1e6) as u64, (t1 * 1e6) as u64));
    let mut transactions = 0;
    for r in &results {
        for (k, v) in &r.errors {
            *errors.entry(k.clone()).or_insert(0) += v;
        }
        for &(end, lat) in &r.done {
            transactions += 1;
            let begin = end.saturating_sub(lat);
            match window_span {
                Some((a, b)) if begin <= b && end >= a => window.saturating_record(lat.max(1)),
                _ => steady.saturating_record(lat.max(1)),
            }
            let b = buckets.entry(end / 100_000).or_default();
            b.0 = b.0.max(lat);
            b.1 += 1;
        }
    }
    let timeline = buckets.into_iter().map(|(k, (max, n))| Bucket { t: k as f64 / 10.0, max_ms: max as f64 / 1000.0, transactions: n }).collect();

    let lost_writes = if opts.workload.checks_writes() { Some(check_writes(&opts.url, &run_id, &results).await?) } else { None };
    let report = Report {
        clients: opts.clients,
        duration_s: elapsed,
        mode: opts.mode,
        workload: opts.workload.name(),
        transactions,
        tps: transactions as f64 / elapsed,
        steady: Latency::of(&steady),
        cutover_window: cut.as_ref().map(|_| Latency::of(&window)),
        errors,
        lost_writes,
        cutover_started_s: cut.as_ref().map(|c| c.0),
        cutover_ended_s: cut.as_ref().map(|c| c.1),
        cutover: cut.and_then(|c| c.2),
        rehearsal: opts.rehearse,
        timeline,
    };
    if let Some(path) = &opts.plot {
        plot::svg(&report, path)?;
    }
    Ok(report)
}

/// Every committed transaction's row is present exactly once where the proxy ends.
async fn check_writes(url: &str, run: &str, results: &[ClientResult]) -> anyhow::Result<LostWrites> {
    let c = connect(url).await.context("cannot connect for the lost-write check")?;
    let rows = c.query("SELECT client, seq, count(*) FROM loadtest_orders WHERE run = $1 GROUP BY client, seq", &[&run]).await?;
    let mut found = HashSet::new();
    let mut duplicated = 0;
    for r in &rows {
        let (client, seq, n): (i32, i64, i64) = (r.get(0), r.get(1), r.get(2));
        if n > 1 {
            duplicated += 1;
        }
        found.insert((client, seq));
    }
    let mut committed = 0;
    let mut missing = 0;
    for r in results {
        for seq in &r.committed {
            committed += 1;
            if !found.contains(&(r.id, *seq)) {
                missing += 1;
            }
        }
    }
    Ok(LostWrites { committed, found: found.len() as u64, missing, duplicated, ok: missing == 0 && duplicated == 0 })
}

impl Report {
    /// No cutover was asked for, or the one asked for committed (a rehearsal:
    /// was rehearsed).
    pub fn cutover_succeeded(&self) -> bool {
        let want = if self.rehearsal { "rehearsed" } else { "committed" };
        self.cutover.as_ref().is_none_or(|c| c["outcome"] == want)
    }

    /// The report as a table.
    pub fn print(&self) {
        println!(
            "loadtest: {} clients, {:.1} s, workload {}, {:?} mode: {} transactions, {:.1} tps",
            self.clients, self.duration_s, self.workload, self.mode, self.transactions, self.tps
        );
        println!("  {:16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}", "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max");
        let line = |name: &str, l: &Latency| {
            println!("  {name:16} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}", l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms);
        };
        line("steady state", &self.steady);
        if let Some(w) = &self.cutover_window {
            line("around cutover", w);
        }
        if self.errors.is_empty() {
            println!("  errors: none");
        } else {
            let e: Vec<String> = self.errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            println!("  errors: {}", e.join(", "));
        }
        if let Some(l) = &self.lost_writes {
            println!(
                "  lost-write check: {} of {} committed transactions missing, {} duplicated — {}",
                l.missing,
                l.committed,
                l.duplicated,
                if l.ok { "ok" } else { "FAILED" }
            );
        }
        if let (Some(t0), Some(t1)) = (self.cutover_started_s, self.cutover_ended_s) {
            println!("  cutover asked at {t0:.2} s, answered at {t1:.2} s");
        }
        if let Some(c) = &self.cutover {
            if !self.cutover_succeeded() {
                println!("  CUTOVER NOT {}: {}: {}", if self.rehearsal { "REHEARSED" } else { "COMMITTED" }, c["outcome"].as_str().unwrap_or("?"), c["reason"].as_str().unwrap_or(""));
            }
            if c["outcome"] == "request failed" {
                return;
            }
            println!("  cutover {}: pause {:.1} ms{}", c["outcome"].as_str().unwrap_or("?"), c["pause_ms"].as_f64().unwrap_or(0.0), c["reason"].as_str().map(|r| format!(" ({r})")).unwrap_or_default());
            let phases: Vec<String> = c["phases"].as_array().into_iter().flatten().map(|p| format!("{} {:.1}", p["name"].as_str().unwrap_or(""), p["ms"].as_f64().unwrap_or(0.0))).collect();
            println!("  phases (ms): {}", phases.join(", "));
            println!(
                "  sessions moved {}, cancelled {}, closed {}; held requests {}, longest hold {:.1} ms",
                c["sessions_moved"], c["sessions_cancelled"], c["sessions_closed"], c["held_requests"], c["longest_hold_ms"].as_f64().unwrap_or(0.0)
            );
            let fleet = &c["fleet"];
            if fleet.is_object() {
                println!("  fleet: led by {}, decision: {}, fleet pause {:.1} ms (first gate closed to last gate open)", fleet["leader"].as_str().unwrap_or("?"), fleet["decision"].as_str().unwrap_or("?"), fleet["pause_ms"].as_f64().unwrap_or(0.0));
                for m in fleet["members"].as_array().into_iter().flatten() {
                    println!(
                        "    {:12} {:12} drain {:>7.1} ms  pause {:>7.1} ms  held {:>4} (longest {:.1} ms)  moved {}",
                        m["name"].as_str().unwrap_or("?"),
                        m["outcome"].as_str().unwrap_or("?"),
                        m["drain_ms"].as_f64().unwrap_or(0.0),
                        m["pause_ms"].as_f64().unwrap_or(0.0),
                        m["held_requests"],
                        m["longest_hold_ms"].as_f64().unwrap_or(0.0),
                        m["sessions_moved"]
                    );
                }
            }
        }
    }
}
