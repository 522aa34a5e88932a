//! Throughput: pgbench select-only and tpcb-like, for the same duration, straight at
//! PostgreSQL, through pgcutover, and through PgBouncer (session pooling), runs
//! alternating, in one invocation. Prints TPS and average latency per target and
//! the ratios pgcutover/direct and pgcutover/PgBouncer.
//!
//!   cargo bench --bench throughput
//!   BENCH_SECONDS=10 BENCH_ROUNDS=3 BENCH_CLIENTS=16 BENCH_MODE=simple cargo bench --bench throughput

mod common;

use common::{env_or, run_pgbench, PgBouncer, Run};

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
    let mut targets: Vec<(&str, u16)> = vec![("direct", cluster.port), ("pgcutover", proxy_port)];
    if let Some(b) = &bouncer {
        targets.push(("pgbouncer", b.port));
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
                let (name, port) = targets[i];
                let secs = seconds.to_string();
                let jobs = clients.min(2).to_string();
                let c = clients.to_string();
                let mut args = vec!["-n", "-M", mode.as_str(), "-c", &c, "-j", &jobs, "-T", &secs];
                args.extend(extra.iter().copied());
                let run = run_pgbench(port, "bench", &args)?;
                eprintln!("  {workload:11} round {round} {name:9} {:>9.0} tps {:>7.3} ms failed {}", run.tps, run.latency_ms, run.failed);
                results[i].push(run);
            }
        }
        let mean = |runs: &[Run]| -> (f64, f64) {
            let n = runs.len().max(1) as f64;
            (runs.iter().map(|r| r.tps).sum::<f64>() / n, runs.iter().map(|r| r.latency_ms).sum::<f64>() / n)
        };
        println!("\n{workload}:");
        println!("  {:10} {:>10} {:>12}", "target", "tps", "latency ms");
        let means: Vec<(f64, f64)> = results.iter().map(|r| mean(r)).collect();
        for ((name, _), (tps, lat)) in targets.iter().zip(&means) {
            println!("  {name:10} {tps:>10.0} {lat:>12.3}");
        }
        let proxy = means[1].0;
        println!("  pgcutover/direct    = {:.2}", proxy / means[0].0);
        if means.len() > 2 {
            println!("  pgcutover/pgbouncer = {:.2}", proxy / means[2].0);
            println!("  pgbouncer/direct    = {:.2}", means[2].0 / means[0].0);
        }
    }
    Ok(())
}
