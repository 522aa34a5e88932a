//! Throughput: pgbench select-only and tpcb-like, for the same duration, straight at
//! PostgreSQL, through pgcutover, and through PgBouncer (session pooling), runs
//! alternating, in one invocation. Prints TPS and average latency per target, the
//! proxies' CPU and context switches per transaction, and the ratios
//! pgcutover/direct and pgcutover/PgBouncer: of the means, and paired round by round
//! (median, geometric mean, rounds at or above 1), since a busy machine moves every
//! target's TPS from one round to the next.
//!
//!   cargo bench --bench throughput
//!   BENCH_SECONDS=10 BENCH_ROUNDS=3 BENCH_CLIENTS=16 BENCH_MODE=simple cargo bench --bench throughput

mod common;

use common::{env_or, run_pgbench, PgBouncer, Run};

/// CPU time (user, system) a process has used, from /proc, in microseconds.
fn cpu_us(pid: Option<u32>) -> (u64, u64) {
    let path = pid.map_or("/proc/self/stat".to_string(), |p| format!("/proc/{p}/stat"));
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 14th field.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    let tick = 1_000_000 / 100; // USER_HZ is 100 on Linux
    (f.get(11).copied().unwrap_or(0) * tick, f.get(12).copied().unwrap_or(0) * tick)
}

/// Context switches (voluntary: the proxy slept; involuntary: it was preempted)
/// summed over a process's threads, from /proc.
fn switches(pid: Option<u32>) -> (u64, u64) {
    let dir = pid.map_or("/proc/self/task".to_string(), |p| format!("/proc/{p}/task"));
    let mut total = (0, 0);
    for task in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            let count = |prefix: &str| line.strip_prefix(prefix).and_then(|v| v.trim().parse::<u64>().ok());
            if let Some(n) = count("voluntary_ctxt_switches:") {
                total.0 += n;
            } else if let Some(n) = count("nonvoluntary_ctxt_switches:") {
                total.1 += n;
            }
        }
    }
    total
}

/// Median, geometric mean and how many are at least 1, of ratios.
fn paired(ratios: &[f64]) -> String {
    if ratios.is_empty() {
        return "-".into();
    }
    let mut sorted = ratios.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    let median = if sorted.len() % 2 == 1 { sorted[mid] } else { (sorted[mid - 1] + sorted[mid]) / 2.0 };
    let geomean = (ratios.iter().map(|r| r.ln()).sum::<f64>() / ratios.len() as f64).exp();
    let at_least = ratios.iter().filter(|r| **r >= 1.0).count();
    format!("median {median:.3}, geomean {geomean:.3}, >= 1 in {at_least} of {} rounds", ratios.len())
}

fn main() -> anyhow::Result<()> {
    let seconds: u64 = env_or("BENCH_SECONDS", 10);
    let rounds: usize = env_or("BENCH_ROUNDS", 2);
    let clients: u32 = env_or("BENCH_CLIENTS", 16);
    let mode: String = env_or("BENCH_MODE", "simple".to_string());
    let scale: u32 = env_or("BENCH_SCALE", 10);

    let setup = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let cluster = setup.block_on(common::bench_cluster(scale))?;
    let (_rt, proxy_port, _dir) = common::start_pgcutover(cluster.port)?;
    let bouncer = PgBouncer::start(cluster.port, "session")?;
    if bouncer.is_none() {
        println!("PgBouncer is not installed (apt-get install pgbouncer): its column stays empty");
    }
    // Whose CPU a run costs: the proxy's process (pgcutover runs in this one).
    let mut targets: Vec<(&str, u16, Option<Option<u32>>)> = vec![("direct", cluster.port, None), ("pgcutover", proxy_port, Some(None))];
    if let Some(b) = &bouncer {
        targets.push(("pgbouncer", b.port, Some(Some(b.pid()?))));
    }
    println!(
        "pgbench: {clients} clients, {seconds}s per run, {rounds} rounds, -M {mode}, scale {scale}, {} cores",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );

    let only: String = env_or("BENCH_WORKLOADS", "select-only,tpcb-like".to_string());
    let workloads = [("select-only", vec!["-S"]), ("tpcb-like", vec![])];
    for (workload, extra) in workloads.into_iter().filter(|(w, _)| only.split(',').any(|o| o == *w)) {
        let mut results: Vec<Vec<Run>> = vec![Vec::new(); targets.len()];
        for round in 0..rounds {
            // Alternate the order so no target always runs on a warmer cache.
            let mut order: Vec<usize> = (0..targets.len()).collect();
            order.rotate_left(round % targets.len());
            for i in order {
                let (name, port, cpu_of) = targets[i];
                let secs = seconds.to_string();
                let jobs = clients.min(2).to_string();
                let c = clients.to_string();
                let mut args = vec!["-n", "-M", mode.as_str(), "-c", &c, "-j", &jobs, "-T", &secs];
                args.extend(extra.iter().copied());
                let before = cpu_of.map(|pid| (cpu_us(pid), switches(pid)));
                let mut run = run_pgbench(port, "bench", &args)?;
                if let (Some(pid), Some(((u0, s0), (v0, i0)))) = (cpu_of, before) {
                    let ((u1, s1), (v1, i1)) = (cpu_us(pid), switches(pid));
                    let xacts = (run.tps * seconds as f64).max(1.0);
                    run.cpu_us = Some(((u1 - u0) as f64 / xacts, (s1 - s0) as f64 / xacts));
                    run.switches = Some((v1.saturating_sub(v0) as f64 / xacts, i1.saturating_sub(i0) as f64 / xacts));
                }
                let per_xact = |v: Option<(f64, f64)>, digits: usize| v.map_or("-".into(), |(a, b)| format!("{a:.digits$} + {b:.digits$}"));
                eprintln!(
                    "  {workload:11} round {round} {name:9} {:>9.0} tps {:>7.3} ms failed {} cpu/xact us {} switches/xact {}",
                    run.tps,
                    run.latency_ms,
                    run.failed,
                    per_xact(run.cpu_us, 2),
                    per_xact(run.switches, 3)
                );
                results[i].push(run);
            }
        }
        let mean_switches = |runs: &[Run]| -> (f64, f64) {
            let n = runs.len().max(1) as f64;
            runs.iter().filter_map(|r| r.switches).fold((0.0, 0.0), |(v, i), (a, b)| (v + a / n, i + b / n))
        };
        let mean = |runs: &[Run]| -> (f64, f64, f64, f64) {
            let n = runs.len().max(1) as f64;
            let cpu = |f: fn(&(f64, f64)) -> f64| runs.iter().filter_map(|r| r.cpu_us.as_ref().map(f)).sum::<f64>() / n;
            (runs.iter().map(|r| r.tps).sum::<f64>() / n, runs.iter().map(|r| r.latency_ms).sum::<f64>() / n, cpu(|c| c.0), cpu(|c| c.1))
        };
        println!("\n{workload}:");
        println!("  {:10} {:>10} {:>12} {:>14} {:>14} {:>17}", "target", "tps", "latency ms", "proxy user us", "proxy sys us", "sleeps + preempts");
        let means: Vec<(f64, f64, f64, f64)> = results.iter().map(|r| mean(r)).collect();
        for (((name, _, cpu_of), (tps, lat, user, sys)), runs) in targets.iter().zip(&means).zip(&results) {
            let (user, sys, sw) = if cpu_of.is_some() {
                let (v, i) = mean_switches(runs);
                (format!("{user:.2}"), format!("{sys:.2}"), format!("{v:.3} + {i:.3}"))
            } else {
                ("-".into(), "-".into(), "-".into())
            };
            println!("  {name:10} {tps:>10.0} {lat:>12.3} {user:>14} {sys:>14} {sw:>17}");
        }
        if means.len() > 2 {
            let cpu = |m: &(f64, f64, f64, f64)| m.2 + m.3;
            println!("  cpu per xact pgcutover/pgbouncer = {:.2}", cpu(&means[1]) / cpu(&means[2]).max(0.001));
        }
        let proxy = means[1].0;
        println!("  pgcutover/direct    = {:.2}", proxy / means[0].0);
        if means.len() > 2 {
            println!("  pgcutover/pgbouncer = {:.2}", proxy / means[2].0);
            println!("  pgbouncer/direct    = {:.2}", means[2].0 / means[0].0);
            // Paired: each round's pgcutover run against that round's PgBouncer run.
            let ratio = |f: &dyn Fn(&Run) -> Option<f64>| -> Vec<f64> {
                results[1].iter().zip(&results[2]).filter_map(|(a, b)| Some(f(a)? / f(b)?.max(0.001))).collect()
            };
            println!("  paired pgcutover/pgbouncer tps:          {}", paired(&ratio(&|r| Some(r.tps))));
            println!("  paired pgcutover/pgbouncer cpu per xact (lower is better): {}", paired(&ratio(&|r| r.cpu_us.map(|(u, s)| u + s))));
        }
    }
    Ok(())
}
