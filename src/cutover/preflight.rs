//! Preflight: the conditions a cutover needs, checked before anything pauses, and
//! on their own by `pgcutover check`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;

use super::catchup::Subscription;
use crate::server::Proxy;

/// How long a check waits for the other fleet members' census answers.
const CENSUS_BOUND: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    /// A failed check that guards data refuses the cutover even with --force.
    pub guards_data: bool,
    pub detail: String,
}

impl Check {
    pub fn new(name: impl Into<String>, guards_data: bool, problem: Option<String>) -> Check {
        Check { name: name.into(), ok: problem.is_none(), guards_data, detail: problem.unwrap_or_default() }
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = if self.ok { "ok" } else if self.guards_data { "FAIL" } else { "WARN" };
        if self.detail.is_empty() {
            write!(f, "{mark}: {}", self.name)
        } else {
            write!(f, "{mark}: {}: {}", self.name, self.detail)
        }
    }
}

fn list(rows: Vec<tokio_postgres::Row>) -> Option<String> {
    let items: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
    (!items.is_empty()).then(|| items.join(", "))
}

/// What the checks compare against, from the configuration.
pub struct Settings {
    pub admin_user: String,
    pub drain_timeout: Duration,
    pub max_lag: u64,
    pub other_subscriptions: Vec<String>,
    /// Other fleet members' backends on the source: pids, and local ports of
    /// connections logging in or out. Theirs are no bypass.
    pub members_pids: Vec<i32>,
    pub members_ports: Vec<i32>,
    /// This proxy's sessions on the source that a pause holds without waiting for
    /// them (a quiet batch's implicit transaction looks open on the server).
    pub quiescent_pids: Vec<i32>,
    /// Outside a cutover, in a fleet: ask the other members (a census) which of
    /// the source's backends, by the source backend's name, are theirs.
    pub census: Option<(Arc<crate::fleet::Fleet>, String)>,
}

impl Settings {
    pub fn of(config: &crate::config::Config, admin_user: &str) -> Settings {
        Settings {
            admin_user: admin_user.into(),
            drain_timeout: config.cutover.drain_timeout,
            max_lag: config.cutover.max_lag_bytes,
            other_subscriptions: config.cutover.other_subscriptions.clone(),
            members_pids: Vec::new(),
            members_ports: Vec::new(),
            quiescent_pids: Vec::new(),
            census: None,
        }
    }
}

/// The checks of one database that every kind of cutover needs: configuration
/// files a reload can apply on both sides, the source's sessions that bypass the
/// proxy, and transactions longer than the drain.
pub async fn check_common(db: &str, src: &Client, dst: &Client, our_pids: &[i32], settings: &Settings) -> anyhow::Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (side, c) in [("source", src), ("target", dst)] {
        let errors = super::fence::config_errors(c).await?;
        checks.push(Check::new(
            format!("{db}: the {side}'s configuration files have no errors (a reload must be able to apply)"),
            true,
            errors,
        ));
    }
    let since = std::time::Instant::now();
    let mut our_pids: Vec<i32> = our_pids.iter().chain(&settings.members_pids).copied().collect();
    let rows = src
        .query(
            "SELECT pid, coalesce(client_port, -1), usename::text || ' from ' || coalesce(client_addr::text, 'local') || ' (pid ' || pid || ')' FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND datname = current_database() AND pid <> pg_backend_pid() AND usename <> $1",
            &[&settings.admin_user],
        )
        .await?;
    // The proxy's own connections, logging in or out included (see backend::ports).
    let mut ours = crate::backend::ports::ours_since(since);
    ours.extend(&settings.members_ports);
    // The other members answer after the look above: whatever it saw of theirs is
    // in their answers (a session's pid, or the port of one that has ended since).
    if let Some((fleet, source)) = &settings.census {
        let missing = match fleet.census(source, CENSUS_BOUND).await {
            Ok(census) => {
                our_pids.extend(census.pids);
                ours.extend(census.ports);
                (!census.missing.is_empty()).then(|| format!("no answer within {CENSUS_BOUND:?} from {}: their sessions may be listed as bypassing", census.missing.join(", ")))
            }
            Err(e) => Some(format!("{e:#}: other members' sessions may be listed as bypassing")),
        };
        checks.push(Check::new(format!("{db}: every fleet member said which of the source's sessions are its own"), false, missing));
    }
    let strangers: Vec<String> = rows.iter().filter(|r| !our_pids.contains(&r.get::<_, i32>(0)) && !ours.contains(&r.get::<_, i32>(1))).map(|r| r.get(2)).collect();
    let strangers = (!strangers.is_empty()).then(|| strangers.join(", "));
    checks.push(Check::new(format!("{db}: no sessions on the source bypassing the proxy"), false, strangers));
    let secs = settings.drain_timeout.as_secs_f64();
    let long = src
        .query(
            "SELECT 'pid ' || pid || ' open for ' || round(extract(epoch FROM now() - xact_start)::numeric, 1) || ' s' FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND datname = current_database() AND xact_start < now() - make_interval(secs => $1) AND pid <> pg_backend_pid() \
             AND pid <> ALL($2)",
            &[&secs, &settings.quiescent_pids],
        )
        .await?;
    checks.push(Check::new(format!("{db}: no transaction open longer than drain_timeout"), false, list(long)));
    Ok(checks)
}

/// Checks one database for a logical cutover. `subs` are the target's subscriptions in it; `our_pids`
/// the source backends of the proxy's own sessions.
pub async fn check_database(
    db: &str,
    src: &Client,
    dst: &Client,
    subs: &[Subscription],
    our_pids: &[i32],
    settings: &Settings,
    lag_seen: Option<&std::sync::Mutex<std::collections::BTreeMap<String, i64>>>,
) -> anyhow::Result<Vec<Check>> {
    let mut checks = Vec::new();
    let from_source: Vec<&Subscription> = subs.iter().filter(|s| s.from_source).collect();
    let elsewhere: Vec<String> = subs.iter().filter(|s| !s.from_source && !settings.other_subscriptions.contains(&s.name)).map(|s| s.name.clone()).collect();
    checks.push(Check::new(
        format!("{db}: a subscription on the target streams from the source"),
        true,
        from_source.is_empty().then(|| "no subscription in this database on the target has its slot on the source".to_string()),
    ));
    checks.push(Check::new(
        format!("{db}: every subscription on the target streams from the source (or is listed in other_subscriptions)"),
        true,
        (!elsewhere.is_empty()).then(|| format!("{} subscribe(s) elsewhere: its slot is not on the source", elsewhere.join(", "))),
    ));
    let disabled: Vec<String> = from_source.iter().filter(|s| !s.enabled).map(|s| format!("subscription {} is disabled", s.name)).collect();
    checks.push(Check::new(format!("{db}: subscriptions enabled"), true, (!disabled.is_empty()).then(|| disabled.join(", "))));
    let oids: Vec<u32> = from_source.iter().map(|s| s.oid).collect();
    let no_worker = dst
        .query(
            "SELECT s.subname::text FROM pg_subscription s WHERE s.oid = ANY($1) AND NOT EXISTS (SELECT 1 FROM pg_stat_subscription w WHERE w.subid = s.oid AND w.relid IS NULL AND w.pid IS NOT NULL)",
            &[&oids],
        )
        .await?;
    checks.push(Check::new(format!("{db}: subscription workers running"), true, list(no_worker).map(|l| format!("no apply worker for {l}"))));
    let not_ready = dst
        .query("SELECT s.subname || ': ' || srrelid::regclass::text || ' (' || srsubstate::text || ')' FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid WHERE s.oid = ANY($1) AND srsubstate <> 'r'", &[&oids])
        .await?;
    checks.push(Check::new(format!("{db}: every table synchronised (state r)"), true, list(not_ready)));
    let errors = dst
        .query(
            "SELECT subname::text || ': ' || apply_error_count || ' apply, ' || sync_error_count || ' sync errors' FROM pg_stat_subscription_stats WHERE subid = ANY($1) AND (apply_error_count > 0 OR sync_error_count > 0)",
            &[&oids],
        )
        .await?;
    checks.push(Check::new(format!("{db}: no replication errors"), true, list(errors)));
    let prepared = src.query("SELECT gid || ' (' || owner || ')' FROM pg_prepared_xacts WHERE database = current_database()", &[]).await?;
    checks.push(Check::new(
        format!("{db}: no prepared (two-phase) transactions on the source"),
        true,
        list(prepared).map(|l| format!("{l}: they would commit or roll back on the source after the switch; finish them first")),
    ));
    let unreadable = src
        .query("SELECT format('%I.%I', schemaname, sequencename) FROM pg_sequences WHERE NOT has_sequence_privilege(format('%I.%I', schemaname, sequencename), 'SELECT')", &[])
        .await?;
    checks.push(Check::new(format!("{db}: every sequence readable by the admin user"), true, list(unreadable)));
    let no_identity = src
        .query(
            "SELECT format('%I.%I', c.relnamespace::regnamespace, c.relname) FROM pg_publication_tables pt \
             JOIN pg_class c ON c.oid = format('%I.%I', pt.schemaname, pt.tablename)::regclass \
             WHERE c.relreplident = 'n' OR (c.relreplident = 'd' AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)) \
             OR (c.relreplident = 'i' AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident))",
            &[],
        )
        .await?;
    checks.push(Check::new(format!("{db}: replica identity on every published table"), true, list(no_identity)));
    let lobs: bool = src.query_one("SELECT EXISTS (SELECT 1 FROM pg_largeobject_metadata)", &[]).await?.get(0);
    checks.push(Check::new(format!("{db}: no large objects"), true, lobs.then(|| "large objects do not replicate".to_string())));
    let unlogged = src.query("SELECT format('%I.%I', relnamespace::regnamespace, relname) FROM pg_class WHERE relpersistence = 'u' AND relkind IN ('r', 'p')", &[]).await?;
    checks.push(Check::new(format!("{db}: no unlogged tables"), true, list(unlogged)));
    let columns = "SELECT format('%I.%I.%I %s', table_schema, table_name, column_name, data_type) FROM information_schema.columns \
                   WHERE table_schema NOT IN ('pg_catalog', 'information_schema') AND table_schema NOT LIKE 'pg_toast%' ORDER BY 1";
    let a: Vec<String> = src.query(columns, &[]).await?.iter().map(|r| r.get(0)).collect();
    let b: Vec<String> = dst.query(columns, &[]).await?.iter().map(|r| r.get(0)).collect();
    let only_src: Vec<&String> = a.iter().filter(|c| !b.contains(c)).collect();
    let only_dst: Vec<&String> = b.iter().filter(|c| !a.contains(c)).collect();
    let schema_diff = (!only_src.is_empty() || !only_dst.is_empty()).then(|| {
        format!("only on the source: {only_src:?}; only on the target: {only_dst:?}")
    });
    checks.push(Check::new(format!("{db}: same tables and columns on both sides"), true, schema_diff));
    let walsenders: Vec<i32> = from_source.iter().filter_map(|s| s.walsender).collect();
    let lag: Option<i64> = src
        .query_one("SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn))::int8 FROM pg_stat_replication WHERE pid = ANY($1)", &[&walsenders])
        .await?
        .get(0);
    if let (Some(l), Some(seen)) = (lag, lag_seen) {
        seen.lock().unwrap_or_else(|p| p.into_inner()).insert(db.to_string(), l);
    }
    let max_lag = settings.max_lag;
    checks.push(Check::new(
        format!("{db}: replication lag under {max_lag} bytes"),
        false,
        match lag {
            _ if walsenders.len() < from_source.len() => Some("a subscription's walsender is not connected".into()),
            None => Some("the subscription's walsender is not connected".into()),
            Some(l) if l as u64 > max_lag => Some(format!("{l} bytes behind")),
            _ => None,
        },
    ));
    checks.extend(check_common(db, src, dst, our_pids, settings).await?);
    Ok(checks)
}

/// Preflight on its own (`pgcutover check`): every check for every database served.
pub async fn check(proxy: &Arc<Proxy>, to: Option<&str>) -> anyhow::Result<Vec<Check>> {
    let config = proxy.config();
    let source = proxy.active_backend();
    let name = to.map(str::to_owned).or_else(|| config.cutover.target.clone()).unwrap_or_default();
    let target = proxy.backend(&name).ok_or_else(|| anyhow::anyhow!("no backend named {name:?} (set --to or [cutover] target)"))?;
    let mut names: BTreeSet<String> = config.cutover.databases.iter().cloned().collect();
    names.extend(proxy.sessions.list().iter().map(|s| s.database.clone()));
    if names.is_empty() {
        anyhow::bail!("no database to check: no session is open and [cutover] databases is empty");
    }
    let our_pids = proxy.sessions.pids_on(&source.name);
    let mut settings = Settings::of(&config, &source.config.admin_user);
    settings.quiescent_pids = proxy.sessions.quiescent_pids_on(&source.name);
    settings.census = proxy.fleet().map(|f| (f, source.name.clone()));
    let mut all = Vec::new();
    for (i, db) in names.into_iter().enumerate() {
        let src = super::control::connect(&source.config, &db, "pgcutover check").await?;
        let dst = super::control::connect(&target.config, &db, "pgcutover check").await?;
        if super::physical::physical_mode(&source.name, &target.name, &target.config, &dst).await.map_err(|e| anyhow::anyhow!("{e}"))? {
            if i == 0 {
                all.extend(super::physical::check(&target.name, &src, &dst, settings.max_lag).await?.0);
            }
            all.extend(check_common(&db, &src, &dst, &our_pids, &settings).await?);
            all.push(super::physical::unlogged(&db, &src).await?);
            continue;
        }
        let subs = super::catchup::subscriptions(&src, &dst).await?;
        all.extend(check_database(&db, &src, &dst, &subs, &our_pids, &settings, Some(&proxy.cutover.lag)).await?);
        if config.cutover.reverse_replication {
            let oids: Vec<u32> = subs.iter().filter(|s| s.from_source).map(|s| s.oid).collect();
            let tables = super::reverse::tables(&dst, &oids).await?;
            all.extend(super::reverse::check(&db, &src, &dst, &tables).await?);
        }
    }
    Ok(all)
}
