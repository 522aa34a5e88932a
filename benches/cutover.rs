//! The pause clients feel: a 16-client pgbench load (tpcb-like plus an insert into a
//! bigserial table) with a switch from blue to green in the middle, once through
//! pgcutover (`CUTOVER`) and once through PgBouncer with the usual script (PAUSE,
//! wait for the LSN, copy sequences, edit the host, RELOAD, RESUME), in one
//! invocation. Reads every transaction's latency from pgbench's log and compares the
//! worst and the p99 around the switch with steady state.
//!
//! `--idle-sessions 16,1000` runs the pgcutover switch once per count, with that
//! many idle sessions besides the load, each holding a SET value, a SQL prepared
//! statement and a LISTEN (the pause must not grow with them); PgBouncer's switch
//! runs with the largest count of idle clients.
//!
//! `--fleet 3` adds a fleet of three instances coordinated through a throwaway
//! etcd, the same load spread over them, one fleet cutover; its pause (first gate
//! closed to last gate open) and worst stall are printed beside one instance's
//! cutover under the same load, in the same run (goal: at most 20 ms more).
//!
//! `--physical` adds a switchover to a streaming standby (the same load and idle
//! sessions, a primary and its `pg_basebackup` copy) and prints its pause and worst
//! stall beside the logical cutover's.
//!
//! `--source-version 12 --target-version 17` adds a cutover between servers of
//! those major versions (the builds `scripts/prereqs --for-tests` installs) under the same load,
//! printed beside a 15 -> 15 cutover of the same run.
//!
//!   cargo bench --bench cutover
//!   cargo bench --bench cutover -- --source-version 12 --target-version 17
//!   cargo bench --bench cutover -- --idle-sessions 16,1000
//!   cargo bench --bench cutover -- --physical
//!   cargo bench --bench cutover -- --fleet 3
//!   BENCH_SECONDS=12 BENCH_CLIENTS=16 BENCH_MODE=simple cargo bench --bench cutover

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{env_or, pgbench, PgBouncer, PASSWORD};
use futures::StreamExt;
use pgcutover::cluster::{ClusterOptions, Pair};

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

/// Latencies (µs) of transactions in flight during the switch, and of the rest.
struct Latencies {
    window: Vec<u64>,
    /// The window's transactions: start and end (epoch seconds), latency (µs).
    spans: Vec<(f64, f64, u64)>,
    steady: Vec<u64>,
    failed: u64,
}

fn percentile(v: &mut [u64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * q).round() as usize] as f64 / 1000.0
}

/// Reads pgbench's per-transaction logs (`client tx latency_us script epoch us`).
fn read_logs(dir: &Path, switch: (f64, f64)) -> anyhow::Result<Latencies> {
    let mut l = Latencies { window: Vec::new(), spans: Vec::new(), steady: Vec::new(), failed: 0 };
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if !path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("tx.")) {
            continue;
        }
        for line in std::fs::read_to_string(&path)?.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 6 {
                continue;
            }
            let Ok(latency) = f[2].parse::<u64>() else {
                l.failed += 1;
                continue;
            };
            let end = f[4].parse::<f64>().unwrap_or(0.0) + f[5].parse::<f64>().unwrap_or(0.0) / 1e6;
            let start = end - latency as f64 / 1e6;
            if start <= switch.1 && end >= switch.0 {
                l.window.push(latency);
                l.spans.push((start, end, latency));
            } else if end < switch.0 - 0.5 || start > switch.1 + 0.5 {
                l.steady.push(latency);
            }
        }
    }
    Ok(l)
}

async fn setup(pair: &Pair, db: &str) -> anyhow::Result<()> {
    pair.replicated_database(db, "app", pgcutover::cluster::PGBENCH_SCHEMA).await?;
    pair.blue.execute(db, &pgcutover::cluster::pgbench_rows(100_000)).await?;
    let green = pair.green.connect(db).await?;
    for _ in 0..600 {
        let n: i64 = green.query_one("SELECT count(*) FROM pgbench_accounts", &[]).await?.get(0);
        if n == 100_000 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("green did not catch up with the initial data")
}

/// Runs pgbench against `ports` (the clients split among them) for `seconds`,
/// calling `switch` after `at`.
async fn load<F, Fut>(ports: &[u16], db: &str, seconds: u64, at: Duration, switch: F) -> anyhow::Result<(Latencies, (f64, f64), String)>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<String>>,
{
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("load.sql");
    std::fs::write(&script, pgcutover::cluster::pgbench_script(100_000))?;
    let clients: u32 = env_or("BENCH_CLIENTS", 16);
    let each = (clients / ports.len() as u32).max(1);
    let mode: String = env_or("BENCH_MODE", "simple".to_string());
    let runs = ports.iter().enumerate().map(|(i, port)| {
        let url = format!("host=127.0.0.1 port={port} user=app dbname={db}");
        tokio::process::Command::new(pgbench())
            .args(["-n", "-M", &mode, "-c", &each.to_string(), "-j", "2", "-T", &seconds.to_string(), "--failures-detailed", "-l", "--log-prefix"])
            .arg(dir.path().join(format!("tx.{i}")))
            .arg("-f")
            .arg(&script)
            .arg(&url)
            .env("PGPASSWORD", PASSWORD)
            .output()
    });
    let run = futures::future::join_all(runs);
    let switching = async {
        tokio::time::sleep(at).await;
        let t0 = now();
        let note = switch().await;
        (t0, now(), note)
    };
    let (outs, (t0, t1, note)) = tokio::join!(run, switching);
    let note = note?;
    let mut lat = read_logs(dir.path(), (t0, t1))?;
    let mut failed = 0;
    for out in outs {
        let out = out?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || text.contains("number of failed transactions: ") && !text.contains("number of failed transactions: 0 ") {
            eprintln!("pgbench: {text}{}", String::from_utf8_lossy(&out.stderr));
        }
        if let Some(f) = text.lines().find_map(|l| l.strip_prefix("number of failed transactions: ")).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse::<u64>().ok()) {
            failed += f;
        }
    }
    lat.failed = lat.failed.max(failed);
    Ok((lat, (t0, t1), note))
}

async fn unfence(pair: &Pair) -> anyhow::Result<()> {
    let blue = pair.blue.connect("postgres").await?;
    blue.batch_execute("SET default_transaction_read_only = off").await?;
    blue.batch_execute("ALTER SYSTEM RESET default_transaction_read_only").await?;
    blue.batch_execute("SELECT pg_reload_conf()").await?;
    blue.batch_execute("ALTER ROLE app LOGIN").await?;
    Ok(())
}

fn row(name: &str, l: &mut Latencies, switch: (f64, f64)) {
    let steady_p99 = percentile(&mut l.steady, 0.99);
    let steady_max = percentile(&mut l.steady, 1.0);
    let win_p99 = percentile(&mut l.window, 0.99);
    let win_max = percentile(&mut l.window, 1.0);
    println!(
        "  {name:10} {:>10.1} {:>10.1} {:>12.1} {:>12.1} {:>10.1} {:>7}",
        steady_p99,
        steady_max,
        win_p99,
        win_max,
        (switch.1 - switch.0) * 1000.0,
        l.failed
    );
}

/// `--idle-sessions a,b,...` (default: none besides the load).
fn idle_counts() -> Vec<usize> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--idle-sessions")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![0])
}

/// Opens `n` idle sessions to `port`, each with a SET value, a SQL prepared
/// statement and a LISTEN.
async fn idle_sessions(port: u16, db: &str, n: usize, with_state: bool) -> anyhow::Result<Vec<tokio_postgres::Client>> {
    let url = format!("host=127.0.0.1 port={port} user=app password={PASSWORD} dbname={db}");
    let opened = futures::stream::iter(0..n)
        .map(|i| {
            let url = url.clone();
            async move {
                let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                if with_state {
                    c.batch_execute(&format!("SET work_mem = '{}kB'; PREPARE idle_{i} (int) AS SELECT $1 + {i}; LISTEN idle_{i}", 4096 + i)).await?;
                } else {
                    c.batch_execute("SELECT 1").await?;
                }
                Ok::<_, anyhow::Error>(c)
            }
        })
        .buffer_unordered(16);
    opened.collect::<Vec<_>>().await.into_iter().collect()
}

/// The file descriptors a thousand sessions need (client, backend, prewarmed).
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

async fn bench() -> anyhow::Result<()> {
    raise_fd_limit();
    let seconds: u64 = env_or("BENCH_SECONDS", 12);
    let at = Duration::from_secs(seconds / 2);
    let counts = idle_counts();
    let most = counts.iter().copied().max().unwrap_or(0);
    let options = ClusterOptions { settings: vec![format!("max_connections = {}", 2 * most + 200)], ..Default::default() };
    let pair = Pair::start(&options)?;
    for c in [&pair.blue, &pair.green] {
        c.execute("postgres", &format!("CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'")).await?;
    }

    // pgcutover, once per count of idle sessions.
    let mut runs = Vec::new();
    for &n in &counts {
        let db = format!("bench_cutover_{n}");
        setup(&pair, &db).await?;
        let (lat, switch, report) = through_proxy(pair.blue.port, pair.green.port, false, &db, n, seconds, at).await?;
        unfence(&pair).await?;
        runs.push((n, lat, switch, report));
    }
    if let Some(members) = fleet_size() {
        setup(&pair, "bench_single").await?;
        let mut single = through_proxy(pair.blue.port, pair.green.port, false, "bench_single", 0, seconds, at).await?;
        unfence(&pair).await?;
        setup(&pair, "bench_fleet").await?;
        let mut fleet = fleet_cutover(&pair, "bench_fleet", members, seconds, at).await?;
        unfence(&pair).await?;
        let pause = |r: &str, fleet: bool| {
            let v: serde_json::Value = serde_json::from_str(r).unwrap_or_default();
            if fleet { v["fleet"]["pause_ms"].as_f64().unwrap_or(0.0) } else { v["pause_ms"].as_f64().unwrap_or(0.0) }
        };
        let (p1, pf) = (pause(&single.2, false), pause(&fleet.2, true));
        let (s1, sf) = (percentile(&mut single.0.window, 1.0), percentile(&mut fleet.0.window, 1.0));
        println!("\none instance and a fleet of {members} (etcd), the same load (16 clients, spread over the fleet), ms:");
        println!("  single: pause {p1:>8.1}  worst stall {s1:>8.1}  failed {}", single.0.failed);
        println!("  fleet:  pause {pf:>8.1}  worst stall {sf:>8.1}  failed {}  (first gate closed to last gate open)", fleet.0.failed);
        let v: serde_json::Value = serde_json::from_str(&fleet.2).unwrap_or_default();
        for m in v["fleet"]["members"].as_array().into_iter().flatten() {
            println!("    {}: {} drain {:.1} pause {:.1} held {}", m["name"].as_str().unwrap_or(""), m["outcome"].as_str().unwrap_or(""), m["drain_ms"].as_f64().unwrap_or(0.0), m["pause_ms"].as_f64().unwrap_or(0.0), m["held_requests"]);
        }
        let phases: Vec<String> = v["phases"].as_array().into_iter().flatten().map(|p| format!("{} {:.1}", p["name"].as_str().unwrap_or(""), p["ms"].as_f64().unwrap_or(0.0))).collect();
        println!("    leader's phases: {}", phases.join(", "));
        println!("  fleet pause - single pause = {:+.1} ms (goal: at most +20); fleet pause / single pause = {:.2}; worst stall ratio {:.2}", pf - p1, pf / p1.max(0.001), sf / s1.max(0.001));
    }
    if let Some((from, to)) = versions() {
        let options = |major: u32| -> anyhow::Result<ClusterOptions> { Ok(ClusterOptions { bin: Some(pgcutover::cluster::major_bin_dir(major)?), ..Default::default() }) };
        let (source, target) = (options(from)?, options(to)?);
        let versions = Pair { blue: pgcutover::cluster::Cluster::start(&format!("blue-{from}"), &source)?, green: pgcutover::cluster::Cluster::start(&format!("green-{to}"), &target)? };
        for c in [&versions.blue, &versions.green] {
            c.execute("postgres", &format!("CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'")).await?;
        }
        setup(&versions, "bench_versions").await?;
        let mut cross = through_proxy(versions.blue.port, versions.green.port, false, "bench_versions", 0, seconds, at).await?;
        setup(&pair, "bench_same_version").await?;
        let mut same = through_proxy(pair.blue.port, pair.green.port, false, "bench_same_version", 0, seconds, at).await?;
        unfence(&pair).await?;
        let pause = |r: &str| serde_json::from_str::<serde_json::Value>(r).map(|v| v["pause_ms"].as_f64().unwrap_or(0.0)).unwrap_or(0.0);
        let (pc, ps) = (pause(&cross.2), pause(&same.2));
        let (wc, ws) = (percentile(&mut cross.0.window, 1.0), percentile(&mut same.0.window, 1.0));
        println!("
a cutover across major versions and one within, the same load ({} clients), ms:", env_or::<u32>("BENCH_CLIENTS", 16));
        println!("  {from} -> {to}: pause {pc:>8.1}  worst stall {wc:>8.1}  failed {}", cross.0.failed);
        println!("  15 -> 15: pause {ps:>8.1}  worst stall {ws:>8.1}  failed {}", same.0.failed);
        println!("  pause ratio {from}->{to} / 15->15 = {:.2}; worst stall ratio {:.2}", pc / ps.max(0.001), wc / ws.max(0.001));
    }
    if std::env::args().any(|a| a == "--physical") {
        let (lat, switch, report) = switchover(most, seconds, at).await?;
        runs.push((most, lat, switch, report));
        println!("\nlogical cutover and physical switchover, {most} idle sessions, same load:");
        let last = runs.len() - 1;
        let (logical, physical) = runs.split_at_mut(last);
        let logical = &mut logical[last - 1..];
        print_runs(logical);
        print_runs(physical);
        let r = |run: &(usize, Latencies, (f64, f64), String)| serde_json::from_str::<serde_json::Value>(&run.3).map(|v| v["pause_ms"].as_f64().unwrap_or(0.0)).unwrap_or(0.0);
        let (l, p) = (r(&logical[0]), r(&physical[0]));
        println!("  switchover pause / logical pause = {:.2}", p / l.max(0.001));
        runs.pop();
    }
    print_runs(&mut runs);
    let (_, ours, switch_ours, report) = runs.last_mut().ok_or_else(|| anyhow::anyhow!("no run"))?;
    let (ours, switch_ours, report) = (std::mem::replace(ours, Latencies { window: Vec::new(), spans: Vec::new(), steady: Vec::new(), failed: 0 }), *switch_ours, report.clone());
    let mut ours = ours;

    // PgBouncer, transaction pooling, with the usual script.
    setup(&pair, "bench_bouncer").await?;
    let db_line = |port: u16| format!("bench_bouncer = host=127.0.0.1 port={port} dbname=bench_bouncer");
    let Some(bouncer) = PgBouncer::start_with(&db_line(pair.blue.port), "transaction")? else {
        println!("PgBouncer is not installed (apt-get install pgbouncer): only pgcutover was measured");
        print_ours(&mut ours, switch_ours, &report);
        return Ok(());
    };
    // The usual operator script: psql per step, the LSN polled every 0.1 s, sed on
    // the ini file.
    let script = format!(
        r#"set -eu
step() {{ now=$(date +%s%N); echo "$1 $(( (now - last) / 1000000 )) ms"; last=$now; }}
last=$(date +%s%N)
export PGPASSWORD='{PASSWORD}'
bouncer="host=127.0.0.1 port={bport} user=app dbname=pgbouncer"
blue="host=127.0.0.1 port={blue} user=postgres dbname=bench_bouncer"
green="host=127.0.0.1 port={green} user=postgres dbname=bench_bouncer"
psql -X -q "$bouncer" -c "PAUSE bench_bouncer"; step PAUSE
lsn=$(psql -XAt "$blue" -c "SELECT pg_current_wal_lsn()")
until [ "$(psql -XAt "$blue" -c "SELECT coalesce(bool_or(replay_lsn >= '$lsn'), false) FROM pg_stat_replication WHERE application_name = '{sub}'")" = t ]; do sleep 0.1; done; step "wait for LSN"
psql -XAt "$blue" -c "SELECT string_agg(format('SELECT setval(%L, %s, true);', format('%I.%I', schemaname, sequencename), last_value), ' ') FROM pg_sequences WHERE last_value IS NOT NULL" | psql -X -q "$green" >/dev/null; step "copy sequences"
sed -i 's/port={blue} dbname=bench_bouncer/port={green} dbname=bench_bouncer/' '{ini}'
psql -X -q "$bouncer" -c "RELOAD"; step "edit host + RELOAD"
psql -X -q "$bouncer" -c "RESUME bench_bouncer"; step RESUME
"#,
        bport = bouncer.port,
        blue = pair.blue.port,
        green = pair.green.port,
        sub = pgcutover::cluster::subscription_name("bench_bouncer"),
        ini = bouncer.dir().join("pgbouncer.ini").display(),
    );
    // Idle clients hold no server connection in transaction pooling (and could
    // keep no session state there).
    let idle = idle_sessions(bouncer.port, "bench_bouncer", most, false).await?;
    let (mut theirs, switch_theirs, steps) = load(&[bouncer.port], "bench_bouncer", seconds, at, || async {
        let out = tokio::process::Command::new("bash").arg("-c").arg(&script).env("PATH", path_with_psql()).output().await?;
        if !out.status.success() {
            anyhow::bail!("the PgBouncer script failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).lines().collect::<Vec<_>>().join(", "))
    })
    .await?;

    drop(idle);
    print_ours(&mut ours, switch_ours, &report);
    row("pgbouncer", &mut theirs, switch_theirs);
    println!("  PgBouncer script: {steps}");
    let ratio = percentile(&mut ours.window, 1.0) / percentile(&mut theirs.window, 1.0).max(0.001);
    // pgcutover's window spans its whole switch, prewarm included (seconds at a
    // thousand sessions, before anything pauses); PgBouncer's is its script.
    println!("\n  worst stall pgcutover/pgbouncer = {ratio:.3} (pgcutover's window includes its prewarm: {:.0} ms)", (switch_ours.1 - switch_ours.0) * 1000.0);
    drop(bouncer);
    Ok(())
}

/// A proxy in front of `blue` and `green` (`standby_of = "blue"` when `standby`)
/// with `n` idle sessions, and the load with a cutover in the middle.
#[allow(clippy::too_many_arguments)]
async fn through_proxy(blue: u16, green: u16, standby: bool, db: &str, n: usize, seconds: u64, at: Duration) -> anyhow::Result<(Latencies, (f64, f64), String)> {
    let dir = tempfile::tempdir()?;
    let config = pgcutover::config::Config::parse(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nsocket_dir = \"{}\"\nmax_client_connections = {}\n[auth]\nmethod = \"scram-sha-256\"\n[[auth.users]]\nname = \"app\"\npassword = \"{PASSWORD}\"\n\
         [backends.blue]\nhost = \"127.0.0.1\"\nport = {blue}\ntls = \"disable\"\n[backends.green]\nhost = \"127.0.0.1\"\nport = {green}\ntls = \"disable\"\n{}\
         [cutover]\nactive = \"blue\"\ntarget = \"green\"\ndrain_timeout = \"2s\"\n",
        dir.path().display(),
        n + 100,
        if standby { "standby_of = \"blue\"\n" } else { "" },
    ))?;
    let handle = pgcutover::server::start(config).await?;
    let idle = idle_sessions(handle.tcp_addr.port(), db, n, true).await?;
    let proxy = handle.proxy.clone();
    // Where the time goes between the cutover's await points (its test hooks).
    // (hook point, when, wall-clock seconds)
    type Points = std::sync::Arc<std::sync::Mutex<Vec<(&'static str, std::time::Instant, f64)>>>;
    let points: Points = Default::default();
    let seen = points.clone();
    proxy.cutover.set_hook(Some(std::sync::Arc::new(move |at| {
        seen.lock().unwrap_or_else(|p| p.into_inner()).push((at, std::time::Instant::now(), now()));
        Box::pin(async { Ok(()) })
    })));
    // The cutover prewarms a connection per session before it pauses (about 9 ms
    // each here): the load runs on long enough that the pause falls inside it.
    let seconds = seconds + (n as u64 * 15).div_ceil(1000);
    let result = load(&[handle.tcp_addr.port()], db, seconds, at, || async {
        let report = pgcutover::cutover::run(&proxy, pgcutover::cutover::Options::default()).await;
        if !report.committed() {
            anyhow::bail!("cutover {}: {:?}", report.outcome.as_str(), report.reason);
        }
        Ok(serde_json::to_string(&report)?)
    })
    .await;
    drop(idle);
    let points = points.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let steps: Vec<String> = points.windows(2).map(|w| format!("{} {:.1}", w[1].0, (w[1].1 - w[0].1).as_secs_f64() * 1000.0)).collect();
    println!("  {n} idle: ms up to each await point since the one before: {}", steps.join(", "));
    // Where the worst stalls fell: before the gate closed (the prewarm's logins
    // and state copies share the machine with the load), across the pause, or
    // after it (old connections closing, sessions adopting their new ones).
    if let (Ok((lat, _, report)), Some(&(_, _, closed))) = (&result, points.iter().find(|p| p.0 == "pause")) {
        let pause_ms = serde_json::from_str::<serde_json::Value>(report).ok().and_then(|v| v["pause_ms"].as_f64()).unwrap_or(0.0);
        let opened = closed + pause_ms / 1000.0;
        if lat.spans.iter().all(|s| s.1 < opened) {
            println!("  {n} idle: the load ended before the pause did: raise BENCH_SECONDS");
        }
        let worst = |keep: &dyn Fn(f64, f64) -> bool| lat.spans.iter().filter(|s| keep(s.0, s.1)).map(|s| s.2).max().unwrap_or(0) as f64 / 1000.0;
        println!(
            "  {n} idle: worst stall, ms: ended before the pause {:.1}, across the pause {:.1}, began after it {:.1}",
            worst(&|_, end| end < closed),
            worst(&|start, end| start <= opened && end >= closed),
            worst(&|start, _| start > opened),
        );
    }
    result
}

/// `--fleet N`.
/// `--source-version N --target-version M`.
fn versions() -> Option<(u32, u32)> {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok());
    Some((value("--source-version")?, value("--target-version")?))
}

fn fleet_size() -> Option<usize> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == "--fleet")?;
    Some(args.get(i + 1).and_then(|n| n.parse().ok()).unwrap_or(3))
}

/// `members` proxies in front of blue and green, one fleet through a throwaway
/// etcd, the load spread over them, one fleet cutover asked of the first.
async fn fleet_cutover(pair: &Pair, db: &str, members: usize, seconds: u64, at: Duration) -> anyhow::Result<(Latencies, (f64, f64), String)> {
    let etcd = pgcutover::etcd_server::Etcd::start()?;
    let dir = tempfile::tempdir()?;
    let mut handles = Vec::new();
    for i in 0..members {
        let config = pgcutover::config::Config::parse(&format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nsocket_dir = \"{}/{i}\"\n[auth]\nmethod = \"scram-sha-256\"\n[[auth.users]]\nname = \"app\"\npassword = \"{PASSWORD}\"\n\
             [backends.blue]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"disable\"\n[backends.green]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"disable\"\n\
             [cutover]\nactive = \"blue\"\ntarget = \"green\"\ndrain_timeout = \"2s\"\n[fleet]\netcd = [\"{}\"]\nname = \"m{i}\"\nlease_ttl = \"2s\"\n",
            dir.path().display(),
            pair.blue.port,
            pair.green.port,
            etcd.endpoint,
        ))?;
        let fleet = pgcutover::fleet::Fleet::connect(config.fleet.as_ref().ok_or_else(|| anyhow::anyhow!("no [fleet]"))?).await?;
        fleet.init_active("blue").await?;
        let handle = pgcutover::server::start(config).await?;
        fleet.join(&handle.proxy).await?;
        handles.push(handle);
    }
    // Every member sees every other before the cutover is asked for.
    let leader = handles[0].proxy.clone();
    for _ in 0..100 {
        if leader.fleet().is_some_and(|f| f.view().members.len() == members) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ports: Vec<u16> = handles.iter().map(|h| h.tcp_addr.port()).collect();
    let result = load(&ports, db, seconds, at, || async {
        let report = pgcutover::cutover::run(&leader, pgcutover::cutover::Options::default()).await;
        if !report.committed() {
            anyhow::bail!("fleet cutover {}: {:?}", report.outcome.as_str(), report.reason);
        }
        Ok(serde_json::to_string(&report)?)
    })
    .await;
    for mut h in handles {
        h.stop_accepting().await;
        h.proxy.shutdown(Duration::from_secs(2)).await;
    }
    drop(etcd);
    result
}

/// The same load and idle sessions with a switchover to a streaming standby
/// (`pg_basebackup -R -c fast`) instead of a logical cutover.
async fn switchover(n: usize, seconds: u64, at: Duration) -> anyhow::Result<(Latencies, (f64, f64), String)> {
    let options = ClusterOptions { settings: vec![format!("max_connections = {}", 2 * n + 200)], ..Default::default() };
    let primary = pgcutover::cluster::Cluster::start("primary", &options)?;
    let db = "bench_switchover";
    primary.execute("postgres", &format!("CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'")).await?;
    primary.execute("postgres", &format!("CREATE DATABASE {db} OWNER app")).await?;
    primary.execute(db, &format!("SET ROLE app; {} {}", pgcutover::cluster::PGBENCH_SCHEMA, pgcutover::cluster::pgbench_rows(100_000))).await?;
    let standby = pgcutover::cluster::Cluster::start_standby("standby", &primary)?;
    let (p, s) = (primary.connect("postgres").await?, standby.connect("postgres").await?);
    let lsn: String = p.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    while !s.query_one("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", &[&lsn]).await?.get::<_, bool>(0) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    through_proxy(primary.port, standby.port, true, db, n, seconds, at).await
}

/// One line per count of idle sessions: the pause, its phases and the worst stall.
fn print_runs(runs: &mut [(usize, Latencies, (f64, f64), String)]) {
    println!("\npgcutover by idle sessions (besides the load): pause and worst client stall, ms");
    let mut pauses = Vec::new();
    for (n, lat, _, report) in runs.iter_mut() {
        let r: serde_json::Value = serde_json::from_str(report).unwrap_or_default();
        let pause = r["pause_ms"].as_f64().unwrap_or(0.0);
        pauses.push(pause);
        let phases: Vec<String> = r["phases"].as_array().into_iter().flatten().map(|p| format!("{} {:.1}", p["name"].as_str().unwrap_or(""), p["ms"].as_f64().unwrap_or(0.0))).collect();
        println!(
            "  {n:>5} idle: pause {pause:>8.1}  worst stall {:>8.1}  failed {}  moved {}  prepared {}  phases: {}",
            percentile(&mut lat.window, 1.0),
            lat.failed,
            r["sessions_moved"],
            r["sessions_prepared"],
            phases.join(", ")
        );
    }
    if let (Some(first), Some(last)) = (pauses.first(), pauses.last()) {
        if pauses.len() > 1 {
            println!("  pause at the most sessions / pause at the fewest = {:.2} (goal: at most 2)", last / first.max(0.001));
        }
    }
}

fn print_ours(ours: &mut Latencies, switch: (f64, f64), report: &str) {
    let mode: String = env_or("BENCH_MODE", "simple".to_string());
    println!("\npgbench -M {mode}, tpcb-like + bigserial insert; latencies in ms; window = transactions in flight during the switch");
    println!("  {:10} {:>10} {:>10} {:>12} {:>12} {:>10} {:>7}", "target", "steady p99", "steady max", "window p99", "window max", "switch ms", "failed");
    row("pgcutover", ours, switch);
    if let Ok(r) = serde_json::from_str::<serde_json::Value>(report) {
        let phases: Vec<String> = r["phases"].as_array().into_iter().flatten().map(|p| format!("{} {:.1} ms", p["name"].as_str().unwrap_or(""), p["ms"].as_f64().unwrap_or(0.0))).collect();
        println!("  pgcutover pause {:.1} ms; phases: {}", r["pause_ms"].as_f64().unwrap_or(0.0), phases.join(", "));
    }
}

/// PATH with the PostgreSQL client programs first.
fn path_with_psql() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    match pgcutover::cluster::bin_dir() {
        Some(d) => format!("{}:{path}", d.display()),
        None => path,
    }
}

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(bench())
}
