//! Fencing the source: no write may land there any more.
//!
//! `default_transaction_read_only` (ALTER SYSTEM + reload) makes existing sessions
//! fail on their next transaction; a session could undo that with SET, so the
//! application roles also lose LOGIN and their remaining client backends that did
//! not come through the proxy are terminated (never the walsender). A transaction
//! already running keeps its read-write state until it ends, so the fence may run
//! while the drain does.
//!
//! Where the admin user may not ALTER SYSTEM (a managed service: no superuser, no
//! reload), the fence is role-level: each application role is made read-only in
//! every database the cutover covers (`ALTER ROLE … IN DATABASE … SET`, for its new
//! sessions), loses LOGIN, and its sessions that bypass the proxy are terminated;
//! the proxy's own are held at the gate. Roles nobody listed are not covered:
//! preflight names those that could still write.
//!
//! Each step is journaled before it is made; [`undo`] reverses what the journal
//! holds, exactly: the roles that had LOGIN get it back, postgresql.auto.conf and
//! the roles' settings get back the values they held.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::hooks::Hooks;
use super::journal::{Entry, Journal, RoleSetting};
use super::CutoverError;
use crate::session::migrate::{quote_ident, quote_literal};

/// Which fence a source gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FenceKind {
    /// `default_transaction_read_only` server-wide (ALTER SYSTEM and a reload),
    /// LOGIN taken, bypassing sessions terminated.
    #[default]
    ServerWide,
    /// The admin may not ALTER SYSTEM: the application roles made read-only one by
    /// one, LOGIN taken, bypassing sessions terminated.
    RoleLevel,
}

impl FenceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FenceKind::ServerWide => "server-wide",
            FenceKind::RoleLevel => "role-level",
        }
    }

    /// The fence the admin user of `c` can make: server-wide only as a superuser
    /// (ALTER SYSTEM, pg_reload_conf and pg_file_settings all need it by default).
    pub async fn of(c: &Client) -> Result<FenceKind, tokio_postgres::Error> {
        let superuser: bool = c.query_one("SELECT current_setting('is_superuser') = 'on'", &[]).await?.get(0);
        Ok(if superuser { FenceKind::ServerWide } else { FenceKind::RoleLevel })
    }
}

/// What a fence did, for the report.
#[derive(Debug, Default)]
pub struct Fenced {
    pub roles: Vec<String>,
    pub terminated: usize,
    pub kind: FenceKind,
}

/// The role-level read-only settings `roles` hold now in `databases`.
async fn role_settings(c: &Client, roles: &[String], databases: &[String]) -> Result<Vec<RoleSetting>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT r.rolname::text, d.datname::text, \
                    (SELECT substr(s, length('default_transaction_read_only=') + 1) FROM pg_db_role_setting x, unnest(x.setconfig) s \
                      WHERE x.setrole = r.oid AND x.setdatabase = d.oid AND s LIKE 'default_transaction_read_only=%') \
             FROM pg_roles r, pg_database d WHERE r.rolname = ANY($1) AND d.datname = ANY($2) ORDER BY 1, 2",
            &[&roles, &databases],
        )
        .await?;
    Ok(rows.iter().map(|r| RoleSetting { role: r.get(0), database: r.get(1), previous: r.get(2) }).collect())
}

/// Sets each role's read-only setting in its database to `value` (None: RESET), in
/// one round trip.
async fn set_role_settings<'a>(c: &Client, settings: impl IntoIterator<Item = (&'a RoleSetting, Option<&'a str>)>) -> Result<(), tokio_postgres::Error> {
    let sql: String = settings
        .into_iter()
        .map(|(s, value)| {
            let head = format!("ALTER ROLE {} IN DATABASE {}", quote_ident(&s.role), quote_ident(&s.database));
            match value {
                Some(v) => format!("{head} SET default_transaction_read_only = {};", quote_literal(v)),
                None => format!("{head} RESET default_transaction_read_only;"),
            }
        })
        .collect();
    if !sql.is_empty() {
        c.batch_execute(&sql).await?;
    }
    Ok(())
}

/// Errors in the server's configuration files: a reload cannot apply while there
/// are any (`pg_conf_load_time()` then never changes), so a fence would never take
/// effect and its ALTER SYSTEM would wait for the next good reload.
pub async fn config_errors(c: &Client) -> Result<Option<String>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT coalesce(sourcefile, '?') || ':' || coalesce(sourceline::text, '?') || ': ' || error FROM pg_file_settings WHERE error IS NOT NULL ORDER BY seqno",
            &[],
        )
        .await?;
    let errors: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    Ok((!errors.is_empty()).then(|| errors.join("; ")))
}

fn config_errors_refusal(errors: &str) -> CutoverError {
    CutoverError::Refused(format!("the source's configuration files have errors, so a reload cannot apply there (fix them first): {errors}"))
}

async fn refuse_config_errors(c: &Client) -> Result<(), CutoverError> {
    match config_errors(c).await? {
        Some(e) => Err(config_errors_refusal(&e)),
        None => Ok(()),
    }
}

/// What postgresql.auto.conf holds for default_transaction_read_only now.
async fn auto_conf_value(c: &Client) -> Result<Option<String>, tokio_postgres::Error> {
    let row = c
        .query_opt(
            "SELECT setting FROM pg_file_settings WHERE name = 'default_transaction_read_only' AND sourcefile LIKE '%/postgresql.auto.conf' ORDER BY seqno DESC LIMIT 1",
            &[],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

async fn load_time(c: &Client) -> Result<String, tokio_postgres::Error> {
    Ok(c.query_one("SELECT pg_conf_load_time()::text", &[]).await?.get(0))
}

/// Waits (bounded) until this backend has reloaded since `before`: from then on no
/// backend runs a command under the old settings. `pg_conf_load_time()` changes on
/// our next command only after the postmaster has re-read the files and signalled
/// every child.
async fn reloaded(c: &Client, before: &str, bound: Duration) -> Result<(), CutoverError> {
    let deadline = Instant::now() + bound;
    loop {
        if load_time(c).await? != before {
            return Ok(());
        }
        if Instant::now() >= deadline {
            refuse_config_errors(c).await?;
            return Err(CutoverError::Timeout { what: "the configuration reload".into(), bound });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// `ALTER ROLE … <option>` for every role, in one round trip (a multi-statement
/// query is one transaction).
async fn alter_roles(c: &Client, roles: &[String], option: &str) -> Result<(), tokio_postgres::Error> {
    let sql: String = roles.iter().map(|r| format!("ALTER ROLE {} {option};", quote_ident(r))).collect();
    if !sql.is_empty() {
        c.batch_execute(&sql).await?;
    }
    Ok(())
}

/// Gives LOGIN back to `roles` and their read-only settings back what they held
/// before a role-level fence (`entries`: the journal) — a promoted standby, whose
/// catalog came from the fenced source.
pub async fn give_login(c: &Client, roles: &[String], entries: &[Entry]) -> Result<(), CutoverError> {
    c.batch_execute("SET default_transaction_read_only = off").await?;
    alter_roles(c, roles, "LOGIN").await?;
    let settings: Vec<&RoleSetting> = entries.iter().filter_map(|e| match e {
        Entry::RoleReadOnly { settings, .. } => Some(settings),
        _ => None,
    }).flatten().collect();
    set_role_settings(c, settings.into_iter().map(|s| (s, s.previous.as_deref()))).await?;
    Ok(())
}

/// The parts of a fence.
pub struct Plan<'a> {
    pub database: &'a str,
    /// Roles whose logins stop (the application's; never the admin user).
    pub roles: &'a [String],
    /// Backends of the proxy's own sessions: never terminated.
    pub keep_pids: &'a [i32],
    /// Local ports of other fleet members' backend connections (logging in or
    /// out): theirs, never terminated.
    pub also_ours: &'a [i32],
    pub admin_user: &'a str,
    /// The databases the cutover covers (a role-level fence sets each role
    /// read-only in each of them).
    pub databases: &'a [String],
}

/// Fences the source through `src`, journaling each side effect before making it.
///
/// Cancellation safety: dropping the future between two steps leaves the journal
/// describing every step that may have been made; [`undo`] reverses them.
pub async fn fence(src: &Client, plan: &Plan<'_>, journal: &mut Journal, hooks: &Hooks) -> Result<Fenced, CutoverError> {
    let kind = FenceKind::of(src).await?;
    let (roles, terminated) = match kind {
        FenceKind::ServerWide => server_wide(src, plan, journal, hooks).await?,
        FenceKind::RoleLevel => role_level(src, plan, journal, hooks).await?,
    };
    Ok(Fenced { roles, terminated, kind })
}

/// The role-level fence: no ALTER SYSTEM, no reload.
async fn role_level(src: &Client, plan: &Plan<'_>, journal: &mut Journal, hooks: &Hooks) -> Result<(Vec<String>, usize), CutoverError> {
    let started = Instant::now();
    let row = src
        .query_one(
            "SELECT (SELECT coalesce(array_agg(rolname::text ORDER BY rolname), '{}') FROM pg_roles WHERE rolname = ANY($1) AND rolcanlogin AND rolname <> $2), \
                    (SELECT coalesce(array_agg(rolname::text ORDER BY rolname), '{}') FROM pg_roles WHERE rolname = ANY($1) AND rolname <> $2), \
                    set_config('default_transaction_read_only', 'off', false)",
            &[&plan.roles, &plan.admin_user],
        )
        .await?;
    let can_login: Vec<String> = row.get(0);
    let existing: Vec<String> = row.get(1);
    let settings = role_settings(src, &existing, plan.databases).await?;
    journal.record(Entry::RoleReadOnly { database: plan.database.into(), settings: settings.clone() }).await.map_err(|e| CutoverError::Journal(e.to_string()))?;
    set_role_settings(src, settings.iter().map(|s| (s, Some("on")))).await?;
    hooks.at("fence.read_only").await?;
    let terminated = no_login_and_terminate(src, plan, &can_login, &existing, started, journal, hooks).await?;
    Ok((can_login, terminated))
}

/// The server-wide fence (a superuser admin).
async fn server_wide(src: &Client, plan: &Plan<'_>, journal: &mut Journal, hooks: &Hooks) -> Result<(Vec<String>, usize), CutoverError> {
    let started = Instant::now();
    // One round trip: the files' errors, postgresql.auto.conf's value, the roles
    // that can log in now, and this session writable whatever the fence does.
    let row = src
        .query_one(
            "SELECT (SELECT string_agg(coalesce(sourcefile, '?') || ':' || coalesce(sourceline::text, '?') || ': ' || error, '; ' ORDER BY seqno) FROM pg_file_settings WHERE error IS NOT NULL), \
                    (SELECT setting FROM pg_file_settings WHERE name = 'default_transaction_read_only' AND sourcefile LIKE '%/postgresql.auto.conf' ORDER BY seqno DESC LIMIT 1), \
                    (SELECT coalesce(array_agg(rolname::text ORDER BY rolname), '{}') FROM pg_roles WHERE rolname = ANY($1) AND rolcanlogin AND rolname <> $2), \
                    set_config('default_transaction_read_only', 'off', false)",
            &[&plan.roles, &plan.admin_user],
        )
        .await?;
    if let Some(e) = row.get::<_, Option<String>>(0) {
        return Err(config_errors_refusal(&e));
    }
    let previous: Option<String> = row.get(1);
    let roles: Vec<String> = row.get(2);
    // postgresql.auto.conf first; it takes effect with the reload below.
    journal.record(Entry::ReadOnly { database: plan.database.into(), previous }).await.map_err(|e| CutoverError::Journal(e.to_string()))?;
    src.batch_execute("ALTER SYSTEM SET default_transaction_read_only = on").await?;
    hooks.at("fence.read_only").await?;
    let terminated = no_login_and_terminate(src, plan, &roles, &roles, started, journal, hooks).await?;
    Ok((roles, terminated))
}

/// The steps both fences share: LOGIN taken from `roles` (journaled), then the
/// client backends of `terminate` that did not come through the proxy ended.
async fn no_login_and_terminate(src: &Client, plan: &Plan<'_>, roles: &[String], terminate: &[String], started: Instant, journal: &mut Journal, hooks: &Hooks) -> Result<usize, CutoverError> {
    if !roles.is_empty() {
        journal.record(Entry::NoLogin { database: plan.database.into(), roles: roles.to_vec() }).await.map_err(|e| CutoverError::Journal(e.to_string()))?;
        alter_roles(src, roles, "NOLOGIN").await?;
    }
    hooks.at("fence.no_login").await?;

    // What is left of the application's logins on the source and did not come
    // through the proxy: its own backends are known by pid and, logging in or out,
    // by their local port. Looked at before the reload: the reload's signal wakes
    // every backend of the server at once, and a scan in that storm takes several
    // times as long. The scan reads the status accessors, not pg_stat_activity:
    // that view builds thirty columns for every backend (milliseconds with a
    // thousand sessions). Every backend with a client port (-1 on a Unix socket)
    // is a client backend or a walsender; the few candidates are confirmed as
    // client backends by pid when they are terminated, so a walsender never is.
    let rows = src
        .query(
            "SELECT pid, port FROM (SELECT pg_stat_get_backend_pid(i) AS pid, pg_stat_get_backend_userid(i) AS userid, pg_stat_get_backend_client_port(i) AS port \
                                    FROM pg_stat_get_backend_idset() i) b \
             WHERE port IS NOT NULL AND userid IN (SELECT oid FROM pg_roles WHERE rolname = ANY($1)) \
               AND pid <> pg_backend_pid() AND NOT (pid = ANY($2))",
            &[&terminate, &plan.keep_pids],
        )
        .await?;
    let mut ours = crate::backend::ports::ours_since(started);
    ours.extend_from_slice(plan.also_ours);
    let candidates: Vec<i32> = rows.iter().filter(|r| !ours.contains(&r.get::<_, i32>(1))).map(|r| r.get(0)).collect();
    let mut strangers = 0;
    if !candidates.is_empty() {
        let row = src
            .query_one(
                "SELECT count(pg_terminate_backend(a.pid)) FROM unnest($1::int4[]) p, pg_stat_get_activity(p) a WHERE a.backend_type = 'client backend'",
                &[&candidates],
            )
            .await?;
        strangers = usize::try_from(row.get::<_, i64>(0)).unwrap_or(0);
    }
    hooks.at("fence.terminate").await?;
    Ok(strangers)
}

/// The fence's last step: the source reloads its configuration and is read-only
/// from then on. Only once the drain is done (every member's, in a fleet): a
/// backend applies a reload before the next message it reads, so a request that
/// passed the gate before it closed but still waited in its backend's socket (a
/// pipeline behind a long statement, a busy machine) would start a read-only
/// transaction and fail with 25006.
pub async fn reload(src: &Client, bound: Duration, hooks: &Hooks) -> Result<(), CutoverError> {
    // One round trip: this backend's load time only changes when it handles the
    // reload's signal, at its next command, so reading it with the reload is safe.
    let before: String = src.query_one("SELECT pg_conf_load_time()::text, pg_reload_conf()", &[]).await?.get(0);
    hooks.at("fence.reload").await?;
    reloaded(src, &before, bound).await?;
    hooks.at("fence.reloaded").await?;
    Ok(())
}

/// Opens the target to the application before a cutover moves there. A target
/// that an earlier cutover fenced (the old database, when a cutover goes back) is
/// read-only and its roles cannot log in; it becomes as writable as the source
/// was, each step journaled so that a rollback fences it again.
pub async fn open_target(dst: &Client, database: &str, roles: &[String], admin_user: &str, journal: &mut Journal, bound: Duration) -> Result<Vec<String>, CutoverError> {
    let mut done = Vec::new();
    dst.batch_execute("SET default_transaction_read_only = off").await?;
    let rows = dst
        .query("SELECT rolname::text FROM pg_roles WHERE rolname = ANY($1) AND NOT rolcanlogin AND rolname <> $2 ORDER BY 1", &[&roles, &admin_user])
        .await?;
    let locked: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    if !locked.is_empty() {
        journal.record(Entry::TargetLogin { database: database.into(), roles: locked.clone() }).await.map_err(|e| CutoverError::Journal(e.to_string()))?;
        alter_roles(dst, &locked, "LOGIN").await?;
        done.push(format!("LOGIN given back to {}", locked.join(", ")));
    }
    // A role-level fence an earlier cutover left, in any database.
    let all: Vec<String> = dst.query("SELECT datname::text FROM pg_database WHERE datallowconn", &[]).await?.iter().map(|r| r.get(0)).collect();
    let fenced: Vec<RoleSetting> = role_settings(dst, roles, &all).await?.into_iter().filter(|s| s.previous.as_deref().is_some_and(is_on)).collect();
    if !fenced.is_empty() {
        journal.record(Entry::TargetRoleWritable { database: database.into(), settings: fenced.clone() }).await.map_err(|e| CutoverError::Journal(e.to_string()))?;
        set_role_settings(dst, fenced.iter().map(|s| (s, None))).await?;
        done.push(format!("read-only settings reset for {}", fenced.iter().map(|s| format!("{} in {}", s.role, s.database)).collect::<Vec<_>>().join(", ")));
    }
    // Only a superuser reads postgresql.auto.conf (pg_file_settings) and could
    // have written it.
    if FenceKind::of(dst).await? == FenceKind::RoleLevel {
        return Ok(done);
    }
    let previous = auto_conf_value(dst).await?;
    if let Some(previous) = previous.filter(|v| is_on(v)) {
        journal.record(Entry::TargetWritable { database: database.into(), previous }).await.map_err(|e| CutoverError::Journal(e.to_string()))?;
        let before = load_time(dst).await?;
        // ALTER SYSTEM refuses to run in a (multi-statement) transaction block.
        dst.batch_execute("ALTER SYSTEM RESET default_transaction_read_only").await?;
        dst.batch_execute("SELECT pg_reload_conf()").await?;
        reloaded(dst, &before, bound).await?;
        done.push("default_transaction_read_only reset in postgresql.auto.conf".into());
    }
    Ok(done)
}

fn is_on(v: &str) -> bool {
    ["on", "true", "yes", "1"].contains(&v.to_ascii_lowercase().as_str())
}

/// Fences the target again as the journal says it was (a rollback of a cutover
/// that had opened it).
pub async fn undo_target(dst: &Client, entries: &[Entry]) -> Result<(), CutoverError> {
    dst.batch_execute("SET default_transaction_read_only = off").await?;
    let opened: Vec<String> = entries.iter().filter_map(|e| match e {
        Entry::TargetLogin { roles, .. } => Some(roles.clone()),
        _ => None,
    }).flatten().collect();
    alter_roles(dst, &opened, "NOLOGIN").await?;
    let reset: Vec<RoleSetting> = entries.iter().filter_map(|e| match e {
        Entry::TargetRoleWritable { settings, .. } => Some(settings.clone()),
        _ => None,
    }).flatten().collect();
    set_role_settings(dst, reset.iter().map(|s| (s, s.previous.as_deref()))).await?;
    if let Some(previous) = entries.iter().find_map(|e| match e {
        Entry::TargetWritable { previous, .. } => Some(previous.clone()),
        _ => None,
    }) {
        let before = load_time(dst).await?;
        dst.batch_execute(&format!("ALTER SYSTEM SET default_transaction_read_only = {}", quote_literal(&previous))).await?;
        dst.batch_execute("SELECT pg_reload_conf()").await?;
        reloaded(dst, &before, Duration::from_secs(5)).await?;
    }
    Ok(())
}

/// Reverses the fence steps in `entries` through `src`: LOGIN back for the roles
/// that had it, postgresql.auto.conf as it was, and a reload so that held sessions
/// write again. Safe to run twice, and on steps that were journaled but not made.
pub async fn undo(src: &Client, entries: &[Entry]) -> Result<(), CutoverError> {
    src.batch_execute("SET default_transaction_read_only = off").await?;
    let fenced: Vec<String> = entries.iter().filter_map(|e| match e {
        Entry::NoLogin { roles, .. } => Some(roles.clone()),
        _ => None,
    }).flatten().collect();
    alter_roles(src, &fenced, "LOGIN").await?;
    // The first entry of a role's setting holds what was there before any fence.
    let mut restored: Vec<&RoleSetting> = Vec::new();
    for e in entries {
        if let Entry::RoleReadOnly { settings, .. } = e {
            for s in settings {
                if !restored.iter().any(|r| r.role == s.role && r.database == s.database) {
                    restored.push(s);
                }
            }
        }
    }
    set_role_settings(src, restored.iter().map(|s| (*s, s.previous.as_deref()))).await?;
    // The first ReadOnly entry holds what was there before any fence step.
    let Some(previous) = entries.iter().find_map(|e| match e {
        Entry::ReadOnly { previous, .. } => Some(previous.clone()),
        _ => None,
    }) else {
        return Ok(());
    };
    match previous {
        Some(v) => src.batch_execute(&format!("ALTER SYSTEM SET default_transaction_read_only = {}", quote_literal(&v))).await?,
        None => src.batch_execute("ALTER SYSTEM RESET default_transaction_read_only").await?,
    }
    let before = load_time(src).await?;
    src.batch_execute("SELECT pg_reload_conf()").await?;
    match reloaded(src, &before, Duration::from_secs(5)).await {
        // postgresql.auto.conf is as it was; with broken files no reload applies,
        // so the fence never took effect either.
        Err(CutoverError::Refused(why)) => {
            tracing::warn!(%why, "the fence is undone in postgresql.auto.conf; the server cannot reload until its files are fixed");
            Ok(())
        }
        other => other,
    }
}
