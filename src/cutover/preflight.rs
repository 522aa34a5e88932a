//! Preflight: the conditions a cutover needs, checked before anything pauses, and
//! on their own by `pgcutover check`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
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
        let mark = if self.ok && self.detail.starts_with("note: ") {
            "NOTE"
        } else if self.ok {
            "ok"
        } else if self.guards_data {
            "FAIL"
        } else {
            "WARN"
        };
        if self.detail.is_empty() {
            write!(f, "{mark}: {}", self.name)
        } else {
            write!(f, "{mark}: {}: {}", self.name, self.detail)
        }
    }
}

/// The admin user lacks a privilege (42501).
fn is_denied(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
}

/// A check the admin user has no right to make: a note that says why and what
/// would allow it (it refuses nothing); the other checks go on.
fn not_checked(name: String, why: &str) -> Check {
    Check { name, ok: true, guards_data: false, detail: format!("note: not checked: {why}") }
}

/// Which fence the source gets, the rights it needs, and (for a role-level fence)
/// the roles it would not cover that could still write. (The way back's rights:
/// `reverse::check`.)
async fn rights(db: &str, src: &Client, settings: &Settings) -> anyhow::Result<Vec<Check>> {
    let mut checks = Vec::new();
    let kind = super::fence::FenceKind::of(src).await?;
    if settings.fence {
        // CREATEROLE for ALTER ROLE (and ADMIN OPTION on each role from 16 on),
        // pg_signal_backend to end sessions that bypass the proxy.
        let row = src
            .query_one(
                "SELECT current_setting('server_version_num')::int, \
                        (SELECT rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = current_user), \
                        pg_has_role(current_user, 'pg_signal_backend', 'MEMBER'), \
                        (SELECT coalesce(array_agg(rolname::text ORDER BY rolname), '{}') FROM pg_roles r WHERE r.rolname = ANY($1) AND r.rolname <> current_user \
                           AND NOT r.rolsuper AND NOT pg_has_role(current_user, r.oid, 'MEMBER WITH ADMIN OPTION'))",
                &[&settings.fence_roles],
            )
            .await?;
        let (version, createrole, signal, no_admin): (i32, bool, bool, Vec<String>) = (row.get(0), row.get(1), row.get(2), row.get(3));
        let mut missing = Vec::new();
        if kind == super::fence::FenceKind::RoleLevel {
            if !createrole {
                missing.push("CREATEROLE, to take LOGIN from the application roles (ALTER ROLE <admin> CREATEROLE)".to_string());
            }
            if version >= 160000 && !no_admin.is_empty() {
                missing.push(format!("ADMIN OPTION on {} (PostgreSQL 16+: GRANT {} TO <admin> WITH ADMIN OPTION)", no_admin.join(", "), no_admin.join(", ")));
            }
            if !signal {
                missing.push("pg_signal_backend, to end sessions that bypass the proxy (GRANT pg_signal_backend TO <admin>)".to_string());
            }
        }
        checks.push(Check::new(format!("{db}: the admin user may fence the source ({} fence)", kind.as_str()), true, (!missing.is_empty()).then(|| format!("missing: {}", missing.join("; ")))));
        if kind == super::fence::FenceKind::RoleLevel {
            // Roles outside the fence that can log in and write a published table
            // (oids materialized first: a privilege test by name stumbles on
            // pg_toast before PostgreSQL 15).
            let writers = src
                .query(
                    "WITH t AS MATERIALIZED (SELECT DISTINCT format('%I.%I', schemaname, tablename)::regclass::oid AS rel FROM pg_publication_tables) \
                     SELECT DISTINCT r.rolname::text, r.rolsuper FROM pg_roles r, t \
                     WHERE r.rolcanlogin AND NOT r.rolname = ANY($1) AND r.rolname <> current_user \
                       AND has_table_privilege(r.oid, t.rel, 'INSERT, UPDATE, DELETE, TRUNCATE') ORDER BY 1",
                    &[&settings.fence_roles],
                )
                .await?;
            let (supers, others): (Vec<_>, Vec<_>) = writers.iter().partition(|r| r.get::<_, bool>(1));
            let names = |rows: &[&tokio_postgres::Row]| rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>().join(", ");
            checks.push(Check::new(
                format!("{db}: no role outside the fence can write on the source (the admin user cannot ALTER SYSTEM: the fence is role-level)"),
                false,
                (!others.is_empty()).then(|| format!("{} can log in and write published tables after the fence; list them in [cutover] fence_roles", names(&others))),
            ));
            if !supers.is_empty() {
                checks.push(Check {
                    name: format!("{db}: superusers can still write on the source"),
                    ok: true,
                    guards_data: false,
                    detail: format!("note: {} (the provider's own): no fence covers a superuser", names(&supers)),
                });
            }
        }
    }
    Ok(checks)
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
    /// The roles the fence covers: the proxy's users and `fence_roles`.
    pub fence_roles: Vec<String>,
    /// The fence runs (`fence_source`).
    pub fence: bool,
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
            fence_roles: {
                let mut roles: Vec<String> = config.auth.users.iter().map(|u| u.name.clone()).chain(config.cutover.fence_roles.iter().cloned()).collect();
                roles.sort();
                roles.dedup();
                roles
            },
            fence: config.cutover.fence_source,
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
        let name = format!("{db}: the {side}'s configuration files have no errors (a reload must be able to apply)");
        match super::fence::config_errors(c).await {
            Ok(errors) => checks.push(Check::new(name, true, errors)),
            Err(e) if is_denied(&e) => checks.push(not_checked(
                name,
                "pg_file_settings is readable by superusers only; on a managed service the provider validates settings, and the fence there is role-level (no reload)",
            )),
            Err(e) => return Err(e.into()),
        }
    }
    checks.extend(rights(db, src, settings).await?);
    // Slots nobody reads pin the source's WAL until its disk is full.
    let idle = src
        .query(
            "SELECT slot_name::text || ' (' || slot_type || coalesce(', database ' || database::text, '') || ', ' || \
                    coalesce(pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)), 'no WAL') || ' retained)' \
             FROM pg_replication_slots WHERE NOT active ORDER BY 1",
            &[],
        )
        .await?;
    if let Some(l) = list(idle) {
        checks.push(Check {
            name: format!("{db}: no inactive replication slot retains WAL on the source"),
            ok: true,
            guards_data: false,
            detail: format!("note: {l}: nothing reads them; drop those nobody needs (pg_drop_replication_slot), or `pgcutover cleanup` for pgcutover's own"),
        });
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
    // By oid, never through pg_subscription.oid (a non-superuser may not read it
    // before PostgreSQL 15).
    let working: Vec<u32> = dst
        .query("SELECT DISTINCT subid FROM pg_stat_subscription WHERE subid = ANY($1) AND relid IS NULL AND pid IS NOT NULL", &[&oids])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let no_worker: Vec<&str> = from_source.iter().filter(|s| !working.contains(&s.oid)).map(|s| s.name.as_str()).collect();
    checks.push(Check::new(format!("{db}: subscription workers running"), true, (!no_worker.is_empty()).then(|| format!("no apply worker for {}", no_worker.join(", ")))));
    let names: Vec<&str> = from_source.iter().map(|s| s.name.as_str()).collect();
    let not_ready = dst
        .query(
            "SELECT s.name || ': ' || srrelid::regclass::text || ' (' || srsubstate::text || ')' FROM pg_subscription_rel r JOIN unnest($1::oid[], $2::text[]) s(oid, name) ON s.oid = r.srsubid WHERE srsubstate <> 'r'",
            &[&oids, &names],
        )
        .await?;
    checks.push(Check::new(format!("{db}: every table synchronised (state r)"), true, list(not_ready)));
    // pg_stat_subscription_stats exists from PostgreSQL 15 on.
    let version: i32 = dst.query_one("SELECT current_setting('server_version_num')::int", &[]).await?.get(0);
    if version >= 150000 {
        // The counts only grow (resetting them needs a superuser): an error a
        // worker has since recovered from (a retry at its start, a restart of the
        // publisher) is a note; the catch-up still waits for everything to be
        // applied. Errors of a subscription whose worker is not running refuse.
        let errors = dst
            .query(
                "SELECT e.subname::text || ': ' || e.apply_error_count || ' apply, ' || e.sync_error_count || ' sync errors', \
                        EXISTS (SELECT 1 FROM pg_stat_subscription w WHERE w.subid = e.subid AND w.relid IS NULL AND w.pid IS NOT NULL) \
                 FROM pg_stat_subscription_stats e WHERE e.subid = ANY($1) AND (e.apply_error_count > 0 OR e.sync_error_count > 0)",
                &[&oids],
            )
            .await?;
        let (recovered, failing): (Vec<_>, Vec<_>) = errors.iter().partition(|r| r.get::<_, bool>(1));
        let names = |rows: &[&tokio_postgres::Row]| rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>().join(", ");
        checks.push(Check::new(format!("{db}: no replication errors"), true, (!failing.is_empty()).then(|| format!("{} (no worker running: see the target's server log)", names(&failing)))));
        if !recovered.is_empty() {
            checks.push(Check {
                name: format!("{db}: replication errors since the statistics were reset"),
                ok: true,
                guards_data: false,
                detail: format!("note: {}: their workers run again now (the server log says what happened; pg_stat_reset_subscription_stats clears the counts)", names(&recovered)),
            });
        }
    } else {
        checks.push(not_checked(format!("{db}: no replication errors"), "the target's PostgreSQL before 15 counts no replication errors (pg_stat_subscription_stats); its server log has them"));
    }
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

/// The databases of the target whose subscriptions have their slot on the source
/// (slot name and database match; pg_subscription is shared by all databases).
async fn subscribed_databases(source: &crate::config::BackendConfig, target: &crate::config::BackendConfig) -> anyhow::Result<Vec<String>> {
    let dst = super::control::connect(target, "postgres", "pgcutover check").await?;
    let subs = dst
        .query("SELECT d.datname::text, s.subslotname::text FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid WHERE s.subslotname IS NOT NULL", &[])
        .await
        .context("cannot list the target's subscriptions")?;
    if subs.is_empty() {
        return Ok(Vec::new());
    }
    let src = super::control::connect(source, "postgres", "pgcutover check").await?;
    let slots = src
        .query("SELECT coalesce(database::text, ''), slot_name::text FROM pg_replication_slots WHERE slot_type = 'logical'", &[])
        .await
        .context("cannot list the source's replication slots")?;
    let on_source: BTreeSet<(String, String)> = slots.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut found: Vec<String> = subs.iter().map(|r| (r.get::<_, String>(0), r.get::<_, String>(1))).filter(|k| on_source.contains(k)).map(|(d, _)| d).collect();
    found.sort();
    found.dedup();
    Ok(found)
}

/// Preflight on its own (`pgcutover check`): every check for every database served.
pub async fn check(proxy: &Arc<Proxy>, to: Option<&str>) -> anyhow::Result<Vec<Check>> {
    let config = proxy.config();
    let source = proxy.active_backend();
    let name = to.map(str::to_owned).or_else(|| config.cutover.target.clone()).unwrap_or_default();
    let known: Vec<String> = config.backends.keys().cloned().collect();
    let target = proxy.backend(&name).ok_or_else(|| anyhow::anyhow!("{}", super::error::no_backend(&name, &known)))?;
    let mut names: BTreeSet<String> = config.cutover.databases.iter().cloned().collect();
    names.extend(proxy.sessions.list().iter().map(|s| s.database.clone()));
    if names.is_empty() {
        // No session open and none configured: every database whose subscription
        // on the target streams from the source.
        names.extend(subscribed_databases(&source.config, &target.config).await?);
    }
    if names.is_empty() {
        anyhow::bail!("no database to check: no session is open, [cutover] databases is empty, and no subscription on {} streams from {}", target.name, source.name);
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
