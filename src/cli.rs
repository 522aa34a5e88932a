//! The subcommands: `serve` runs the proxy in the foreground; `pause`, `resume` and
//! `status` talk to a running proxy through its admin socket.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;

pub async fn serve(path: &Path) -> anyhow::Result<()> {
    let mut config = Config::load(path)?;
    // A cutover recorded its new active backend: come up there.
    if let Some(state) = crate::state::path(&config, Some(path)) {
        if let Some(name) = crate::state::load(&state) {
            if config.backends.contains_key(&name) {
                if name != config.cutover.active {
                    tracing::info!(file = %state.display(), active = %name, "active backend from the state file");
                }
                config.cutover.active = name;
            } else {
                tracing::warn!(file = %state.display(), backend = %name, "the state file names no configured backend; ignored");
            }
        }
    }
    // In a fleet, etcd knows the active backend, and decided any cutover this
    // instance led and left unfinished.
    let fleet = match &config.fleet {
        Some(f) => Some(crate::fleet::Fleet::connect(f).await.context("[fleet]: cannot join")?),
        None => None,
    };
    // A cutover this proxy left unfinished (killed mid-cutover) is finished before
    // anything is served: its fence undone, or its repoint completed.
    if let Some(journal) = crate::cutover::journal_path(&config, Some(path.to_owned())) {
        if let Some(active) = crate::cutover::recover(&config, &journal, fleet.as_ref()).await? {
            if let Some(state) = crate::state::path(&config, Some(path)) {
                crate::state::save(&state, &active).with_context(|| format!("cannot record the active backend in {}", state.display()))?;
            }
            config.cutover.active = active;
        }
    }
    if let Some(fleet) = &fleet {
        let bound = config.cutover.max_pause + fleet.config.lease_ttl * 2;
        match fleet.settled_active(bound).await? {
            Some(active) if config.backends.contains_key(&active) => {
                if active != config.cutover.active {
                    tracing::info!(%active, "active backend from the fleet");
                    if let Some(state) = crate::state::path(&config, Some(path)) {
                        crate::state::save(&state, &active).with_context(|| format!("cannot record the active backend in {}", state.display()))?;
                    }
                }
                config.cutover.active = active;
            }
            Some(active) => anyhow::bail!("the fleet serves on backend {active:?}, which this configuration does not have"),
            // The first instance of a fleet says where it serves.
            None => {
                let active = fleet.init_active(&config.cutover.active).await?;
                if !config.backends.contains_key(&active) {
                    anyhow::bail!("the fleet serves on backend {active:?}, which this configuration does not have");
                }
                config.cutover.active = active;
            }
        }
    }
    let mut handle = crate::server::start(config).await?;
    handle.proxy.set_config_path(path);
    if let Some(fleet) = fleet {
        fleet.join(&handle.proxy).await?;
    }
    handle.proxy.cutover.set_hook(crate::cutover::hooks::from_env());
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = usr1.recv() => {
                let proxy = handle.proxy.clone();
                tokio::spawn(async move {
                    let report = crate::cutover::run(&proxy, crate::cutover::Options::default()).await;
                    tracing::info!(outcome = report.outcome.as_str(), reason = report.reason.as_deref().unwrap_or(""), "SIGUSR1: cutover finished");
                });
            }
            _ = hup.recv() => {
                if let Err(e) = handle.proxy.reload().await {
                    tracing::error!("SIGHUP: reload rejected, the running configuration stays: {e:#}");
                }
            }
        }
    }
    handle.stop_accepting().await;
    handle.proxy.shutdown(handle.proxy.config().proxy.shutdown_grace).await;
    if let Some(fleet) = handle.proxy.fleet() {
        fleet.leave().await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// One row of a console answer, as (column, value) pairs.
type Row = Vec<(String, Option<String>)>;

/// Runs one console command against the proxy that `config` describes.
pub async fn admin_command(config_path: &Path, command: &str) -> anyhow::Result<Vec<Row>> {
    let config = Config::load(config_path)?;
    let dir = config.proxy.socket_dir.as_ref().context("the admin console needs [proxy] socket_dir")?;
    let user = std::env::var("USER").unwrap_or_else(|_| "pgcutover".into());
    let mut pg = tokio_postgres::Config::new();
    pg.host_path(dir).port(config.proxy.listen.port()).dbname(crate::admin::DATABASE).user(&user).application_name("pgcutover-cli");
    pg.connect_timeout(Duration::from_secs(5));
    let (client, conn) = pg.connect(tokio_postgres::NoTls).await.with_context(|| {
        format!("cannot reach the admin console at {}/.s.PGSQL.{} (is `pgcutover serve` running?)", dir.display(), config.proxy.listen.port())
    })?;
    tokio::spawn(conn);
    let messages = match client.simple_query(command).await {
        Ok(m) => m,
        Err(e) => match e.as_db_error() {
            Some(db) => bail!("{}", db.message()),
            None => bail!("{e}"),
        },
    };
    Ok(messages
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some(r.columns().iter().enumerate().map(|(i, c)| (c.name().to_string(), r.get(i).map(str::to_owned))).collect())
            }
            _ => None,
        })
        .collect())
}

/// A console value as JSON of its own type: a boolean, a number, null for nothing
/// (NULL or empty), an embedded JSON document as itself, else a string.
fn typed(v: Option<&str>) -> serde_json::Value {
    use serde_json::Value;
    let Some(v) = v.filter(|v| !v.is_empty()) else { return Value::Null };
    match v {
        "true" => return Value::Bool(true),
        "false" => return Value::Bool(false),
        _ => {}
    }
    if let Ok(n) = v.parse::<i64>() {
        return Value::from(n);
    }
    if let Some(n) = v.parse::<f64>().ok().filter(|n| n.is_finite()).and_then(serde_json::Number::from_f64) {
        return Value::Number(n);
    }
    if v.starts_with('{') || v.starts_with('[') {
        if let Ok(doc) = serde_json::from_str(v) {
            return doc;
        }
    }
    Value::String(v.to_string())
}

/// Prints rows for a person, or as JSON. Two-column `name | value` answers become one
/// object / one aligned block.
pub fn print_rows(rows: &[Row], json: bool) {
    let key_value = rows.first().is_some_and(|r| r.len() == 2 && r[0].0 == "name" && r[1].0 == "value");
    if json {
        let value = if key_value {
            serde_json::Value::Object(rows.iter().map(|r| (r[0].1.clone().unwrap_or_default(), typed(r[1].1.as_deref()))).collect())
        } else {
            serde_json::Value::Array(rows.iter().map(|r| serde_json::Value::Object(r.iter().map(|(k, v)| (k.clone(), typed(v.as_deref()))).collect())).collect())
        };
        println!("{value}");
        return;
    }
    let key_width = rows.iter().map(|r| r[0].1.as_deref().map_or(0, str::len)).max().unwrap_or(0);
    for r in rows {
        if key_value {
            println!("{:key_width$}  {}", r[0].1.as_deref().unwrap_or(""), r[1].1.as_deref().unwrap_or(""));
        } else {
            let line: Vec<String> = r.iter().map(|(k, v)| format!("{k}={}", v.as_deref().unwrap_or(""))).collect();
            println!("{}", line.join("  "));
        }
    }
}

#[cfg(test)]
mod tests {
    /// `status --json` gave every value as a string (`"paused":"false"`,
    /// `"paused_for_ms":""`): values keep their JSON types.
    #[test]
    fn console_values_become_json_of_their_own_type() {
        use serde_json::json;
        assert_eq!(super::typed(Some("false")), json!(false));
        assert_eq!(super::typed(Some("")), json!(null));
        assert_eq!(super::typed(None), json!(null));
        assert_eq!(super::typed(Some("42")), json!(42));
        assert_eq!(super::typed(Some("12.500")), json!(12.5));
        assert_eq!(super::typed(Some("blue")), json!("blue"));
        assert_eq!(super::typed(Some("{\"a\":1}")), json!({"a": 1}));
        assert_eq!(super::typed(Some("0.1.0")), json!("0.1.0"));
    }
}
