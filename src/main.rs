//! The `pgcutover` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "pgcutover", version, about = "PostgreSQL proxy that moves live applications between databases")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy in the foreground.
    Serve {
        /// The proxy's configuration file.
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
    },
    /// Close the gate and wait until in-flight transactions finish.
    Pause {
        /// The proxy's configuration file.
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
        /// Bound the drain (e.g. 500ms, 2s); at the deadline `on_drain_timeout` applies.
        #[arg(long)]
        timeout: Option<String>,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Open the gate: held requests run.
    Resume {
        /// The proxy's configuration file.
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the running proxy's status.
    Status {
        /// The proxy's configuration file.
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move every session to another backend (default: [cutover] target).
    Cutover(CutoverArgs),
    /// Run the cutover's preflight checks only.
    Check(CheckArgs),
    /// Drop what pgcutover made and no longer needs, on every backend: the way
    /// back's publications, slots and subscriptions of earlier cutovers, and forward
    /// subscriptions a cutover disabled, with their slots. Lists them first.
    Cleanup {
        /// The proxy's configuration file.
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
        /// Only list what would be dropped.
        #[arg(long)]
        dry_run: bool,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run transactions through the proxy and report the latencies clients feel,
    /// optionally with a cutover in the middle.
    Loadtest {
        /// Where to connect (normally the proxy), e.g. postgres://app:secret@127.0.0.1:6432/shop
        #[arg(long)]
        url: String,
        /// Another place to connect (another instance of a fleet); clients are
        /// spread over --url and these, round robin. Repeatable.
        #[arg(long)]
        also_url: Vec<String>,
        /// How many clients run transactions at once.
        #[arg(long, default_value_t = 16)]
        clients: u32,
        /// How long to run, e.g. 30s.
        #[arg(long, default_value = "10s")]
        duration: String,
        /// The query protocol the clients use.
        #[arg(long, value_enum, default_value = "prepared")]
        mode: pgcutover::loadtest::Mode,
        /// tpcb, select, or a SQL file.
        #[arg(long, default_value = "tpcb")]
        workload: String,
        /// Ask the proxy for a cutover this long into the run (needs --config).
        #[arg(long)]
        cutover_at: Option<String>,
        /// The proxy's configuration (its admin socket), for --cutover-at.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// With --cutover-at: rehearse the cutover (every phase, then rolled back).
        #[arg(long)]
        rehearse: bool,
        /// Create the built-in workload's tables if they are missing (with --config,
        /// on every backend, and the subscriptions refreshed).
        #[arg(long)]
        init: bool,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
        /// Write an SVG of latency and throughput over time, cutover phases shaded.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Start throwaway clusters, put the proxy in front, and run a load through it.
    Demo {
        /// Seconds of load (the cutover comes halfway).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Where to write the plot.
        #[arg(long, default_value = "pgcutover-demo.svg")]
        plot: PathBuf,
        /// Where the proxy's log goes (the terminal shows only the report).
        #[arg(long, default_value = "pgcutover-demo.log")]
        log: PathBuf,
        /// Rehearse the cutover instead: every phase, then rolled back on purpose.
        #[arg(long)]
        rehearse: bool,
        /// Run a fleet of this many instances (coordinated through a throwaway
        /// etcd) with the load spread over them, and cut them over together.
        #[arg(long, default_value_t = 1)]
        fleet: usize,
    },
}

async fn console(config: &std::path::Path, command: &str, json: bool) -> anyhow::Result<()> {
    let rows = pgcutover::cli::admin_command(config, command).await?;
    pgcutover::cli::print_rows(&rows, json);
    Ok(())
}

/// CUTOVER and CHECK: print the answer; succeed only on a committed cutover or a
/// preflight with nothing blocking.
async fn cutover(verb: &str, a: CheckArgs, rehearse: bool) -> anyhow::Result<()> {
    let config = a.config.as_path();
    let mut command = verb.to_string();
    if let Some(to) = a.to {
        command.push_str(&format!(" \"{}\"", to.replace('"', "\"\"")));
    }
    if a.force {
        command.push_str(" FORCE");
    }
    if rehearse {
        if verb != "CUTOVER" {
            anyhow::bail!("--rehearse is for cutover");
        }
        command.push_str(" REHEARSE");
    }
    let json = a.json;
    let rows = pgcutover::cli::admin_command(config, &command).await?;
    let value = |name: &str| rows.iter().find(|r| r.first().and_then(|c| c.1.as_deref()) == Some(name)).and_then(|r| r.get(1)).and_then(|c| c.1.clone());
    if verb == "CUTOVER" {
        if json {
            println!("{}", value("json").unwrap_or_default());
        } else {
            let readable: Vec<_> = rows.iter().filter(|r| r.first().and_then(|c| c.1.as_deref()) != Some("json")).cloned().collect();
            pgcutover::cli::print_rows(&readable, false);
        }
        match value("outcome").as_deref() {
            Some("committed") => Ok(()),
            Some("rehearsed") if rehearse => Ok(()),
            other => anyhow::bail!("cutover {}: {}", other.unwrap_or("failed"), value("reason").unwrap_or_default()),
        }
    } else {
        pgcutover::cli::print_rows(&rows, json);
        let failed = rows.iter().filter(|r| r.get(1).and_then(|c| c.1.as_deref()) == Some("fail")).count();
        if failed > 0 {
            anyhow::bail!("{failed} check(s) failed");
        }
        Ok(())
    }
}

async fn cleanup(config: &std::path::Path, dry_run: bool, json: bool) -> anyhow::Result<()> {
    let config = pgcutover::config::Config::load(config)?;
    let found = pgcutover::cutover::cleanup::run(&config, dry_run).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&found)?);
    } else if found.is_empty() {
        println!("nothing to clean up: no backend holds anything pgcutover made and no longer needs");
    } else {
        for l in &found {
            let retains = l.retains.as_deref().map(|r| format!(", retains {r} of WAL")).unwrap_or_default();
            println!("{:<12} {:<8} {:<12} {:<40} {}{retains}", l.outcome, l.backend, l.kind.as_str(), format!("{}.{}", l.database, l.name), l.why);
        }
    }
    let failed = found.iter().filter(|l| l.outcome.starts_with("not dropped")).count();
    if failed > 0 {
        anyhow::bail!("{failed} item(s) could not be dropped (see above); run cleanup again once the cause is fixed");
    }
    Ok(())
}

/// What CHECK and CUTOVER share.
#[derive(clap::Args)]
struct CheckArgs {
    /// The proxy's configuration (its admin socket).
    #[arg(long, short, default_value = "proxy.toml")]
    config: PathBuf,
    /// The backend to move to (default: [cutover] target).
    #[arg(long)]
    to: Option<String>,
    /// Let the preflight checks that do not guard data pass (they are reported).
    #[arg(long)]
    force: bool,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct CutoverArgs {
    #[command(flatten)]
    check: CheckArgs,
    /// Run every phase up to the point of no return, then roll back on purpose and
    /// report what the real cutover would have cost.
    #[arg(long)]
    rehearse: bool,
}

/// Logs go to stderr, or to `file` (the demo: its terminal shows only the report).
fn init_logging(file: Option<&std::path::Path>) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGCUTOVER_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match file {
        Some(path) => {
            let f = std::fs::File::create(path).map_err(|e| anyhow::anyhow!("cannot write the log {}: {e}", path.display()))?;
            tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_writer(std::sync::Mutex::new(f)).init();
        }
        // Colour only on a terminal: a log file gets plain text.
        None => tracing_subscriber::fmt().with_env_filter(filter).with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).with_writer(std::io::stderr).init(),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_file = match &cli.command {
        Command::Demo { log, .. } => Some(log.clone()),
        _ => None,
    };
    if let Err(e) = init_logging(log_file.as_deref()) {
        eprintln!("pgcutover: {e:#}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgcutover: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { config } => pgcutover::cli::serve(&config).await,
            Command::Pause { config, timeout, json } => {
                let command = match timeout {
                    Some(t) => format!("PAUSE '{}'", t.replace('\'', "")),
                    None => "PAUSE".to_string(),
                };
                console(&config, &command, json).await
            }
            Command::Resume { config, json } => console(&config, "RESUME", json).await,
            Command::Status { config, json } => console(&config, "SHOW STATUS", json).await,
            Command::Cutover(a) => cutover("CUTOVER", a.check, a.rehearse).await,
            Command::Check(a) => cutover("CHECK", a, false).await,
            Command::Cleanup { config, dry_run, json } => cleanup(&config, dry_run, json).await,
            Command::Demo { seconds, plot, log, rehearse, fleet } => pgcutover::demo::run(std::time::Duration::from_secs(seconds), &plot, &log, rehearse, fleet).await,
            Command::Loadtest { url, also_url, clients, duration, mode, workload, cutover_at, config, rehearse, init, json, plot } => {
                let parse = |d: &str| pgcutover::admin::command::parse_duration(d).map_err(|e| anyhow::anyhow!("{e}"));
                let opts = pgcutover::loadtest::Options {
                    url,
                    spread: also_url,
                    clients,
                    duration: parse(&duration)?,
                    mode,
                    workload: pgcutover::loadtest::Workload::parse(&workload)?,
                    cutover_at: cutover_at.as_deref().map(parse).transpose()?,
                    config,
                    rehearse,
                    plot,
                    init,
                    progress: !json,
                };
                let report = pgcutover::loadtest::run(opts).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    report.print();
                }
                let lost = report.lost_writes.as_ref().is_some_and(|l| !l.ok);
                let failed_cutover = !report.cutover_succeeded();
                if lost || failed_cutover {
                    anyhow::bail!("{}", if lost { "writes were lost" } else if report.rehearsal { "the rehearsal did not complete" } else { "the cutover did not commit" });
                }
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgcutover: {e:#}");
            ExitCode::FAILURE
        }
    }
}
