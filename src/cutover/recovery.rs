//! Undoing a cutover's side effects from its journal: after a failure (the
//! rollback) and after a crash (at the next start, before anything is served).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::journal::{self, Entry};
use super::{control, fence, physical, reverse, CutoverError, UNDO_TIMEOUT};
use crate::config::{BackendConfig, Config};

/// Undoes what `entries` hold on fresh connections, retried until `bound`: the
/// source's fence first (held sessions wait on it), then on the target the way
/// back's slot and publication and the opening of a target fenced earlier. On each
/// side it first ends any statement a control connection of the same cutover still
/// runs (a predecessor that crashed, or this run's abandoned step).
pub(super) async fn undo(source: &BackendConfig, target: Option<&BackendConfig>, entries: &[Entry], bound: Duration) -> Result<(), CutoverError> {
    let deadline = Instant::now() + bound;
    let on_source = |e: &Entry| matches!(e, Entry::ReadOnly { .. } | Entry::NoLogin { .. } | Entry::RoleReadOnly { .. });
    if let Some(database) = entries.iter().find(|e| on_source(e)).and_then(Entry::database) {
        undo_side(source, database, Side::Source, entries, deadline).await?;
    }
    let Some(target) = target else { return Ok(()) };
    let on_target: Vec<&Entry> = entries.iter().filter(|e| !on_source(e)).collect();
    let databases: BTreeSet<&str> = on_target.iter().filter_map(|e| e.database()).collect();
    for database in databases {
        let these: Vec<Entry> = entries.iter().filter(|e| matches!(e, Entry::Begin { .. }) || (!on_source(e) && e.database() == Some(database))).cloned().collect();
        undo_side(target, database, Side::Target, &these, deadline).await?;
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Side {
    Source,
    Target,
}

async fn undo_side(backend: &BackendConfig, database: &str, side: Side, entries: &[Entry], deadline: Instant) -> Result<(), CutoverError> {
    let orphans = entries.iter().find_map(|e| match e {
        Entry::Begin { application_name, .. } => Some(application_name.clone()),
        _ => None,
    });
    let what = match side {
        Side::Source => "undoing the fence on the source",
        Side::Target => "undoing the cutover's changes on the target",
    };
    let bound = deadline.saturating_duration_since(Instant::now());
    loop {
        let attempt = async {
            let c = control::connect(backend, database, "pgcutover undo").await?;
            if let Some(name) = &orphans {
                c.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()", &[name]).await?;
            }
            match side {
                Side::Source => fence::undo(&c, entries).await,
                Side::Target => {
                    reverse::undo(&c, entries).await?;
                    fence::undo_target(&c, entries).await
                }
            }
        };
        let last = match tokio::time::timeout(deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1)), attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => CutoverError::Timeout { what: what.into(), bound },
        };
        if Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Finishes a cutover that a previous run of the proxy left unfinished (it crashed
/// or was killed mid-cutover), before anything is served: back to the source if
/// the repoint was not recorded, forward to the target if it was. Returns the
/// backend to serve on.
///
/// A fleet leader's journal names its cutover: the decision in etcd says which way
/// (no decision yet: this writes the abort, as a surviving member would).
pub async fn recover(config: &Config, path: &std::path::Path, fleet: Option<&std::sync::Arc<crate::fleet::Fleet>>) -> anyhow::Result<Option<String>> {
    let Some(entries) = journal::unfinished(path)? else { return Ok(None) };
    let Some((source, target)) = entries.iter().find_map(|e| match e {
        Entry::Begin { source, target, .. } => Some((source.clone(), target.clone())),
        _ => None,
    }) else {
        journal::remove(path)?;
        return Ok(None);
    };
    let promoted = entries.iter().find_map(|e| match e {
        Entry::Promote { roles, .. } => Some(roles.clone()),
        _ => None,
    });
    if let Some(roles) = promoted {
        tracing::warn!(journal = %path.display(), %target, "an unfinished switchover had passed its point of no return: finishing the promotion");
        let b = config.backends.get(&target).ok_or_else(|| anyhow::anyhow!("the journal names backend {target:?}, which the configuration no longer has"))?;
        let database = entries.iter().find_map(Entry::database).unwrap_or("postgres");
        let c = control::connect(b, database, "pgcutover recover").await?;
        if physical::in_recovery(&c).await? {
            physical::promote(&c, UNDO_TIMEOUT).await.map_err(|e| anyhow::anyhow!("cannot promote {target}: {e}; the journal {} stays", path.display()))?;
        }
        fence::give_login(&c, &roles, &entries).await.map_err(|e| anyhow::anyhow!("cannot give LOGIN back on {target}: {e}; the journal {} stays", path.display()))?;
        journal::remove(path)?;
        return Ok(Some(target));
    }
    let mut repointed = entries.iter().find_map(|e| match e {
        Entry::Repoint { subscriptions, reverse, .. } => Some((subscriptions.clone(), reverse.clone())),
        _ => None,
    });
    let fleet_id = entries.iter().find_map(|e| match e {
        Entry::Fleet { id } => Some(id.clone()),
        _ => None,
    });
    if let Some(id) = &fleet_id {
        let fleet = fleet.ok_or_else(|| anyhow::anyhow!("the journal {} is a fleet cutover's ({id}): only etcd knows its decision, and [fleet] is not configured", path.display()))?;
        let decision = fleet.abort(id, &source, "the leader stopped before it decided", false).await.map_err(|e| anyhow::anyhow!("cannot read the decision of fleet cutover {id}: {e:#}; the journal {} stays", path.display()))?;
        tracing::warn!(id, commit = decision.commit, by = %decision.by, "the fleet's decision on this instance's unfinished cutover");
        if !decision.commit {
            repointed = None;
        }
    }
    match repointed {
        Some((subscriptions, reversed)) => {
            tracing::warn!(journal = %path.display(), %target, "an unfinished cutover had passed its repoint: finishing it forward");
            if let Some(b) = config.backends.get(&target) {
                for (db, sub) in subscriptions {
                    let c = control::connect(b, &db, "pgcutover recover").await?;
                    c.batch_execute(&format!("ALTER SUBSCRIPTION {} DISABLE", crate::session::migrate::quote_ident(&sub))).await?;
                }
                if let Some(s) = config.backends.get(&source) {
                    for r in reversed {
                        let c = control::connect(s, &r.database, "pgcutover recover").await?;
                        let conninfo = reverse::conninfo(b, config.cutover.reverse_conninfo.as_deref(), &r.database);
                        reverse::subscribe(&c, &r, &conninfo).await.map_err(|e| anyhow::anyhow!("cannot create the reverse subscription {} on {source}: {e}; the journal {} stays", r.name, path.display()))?;
                    }
                }
            }
            journal::remove(path)?;
            Ok(Some(target))
        }
        None => {
            tracing::warn!(journal = %path.display(), %source, "an unfinished cutover had not reached its repoint: undoing its fence on the source");
            let b = config.backends.get(&source).ok_or_else(|| anyhow::anyhow!("the journal names backend {source:?}, which the configuration no longer has"))?;
            undo(b, config.backends.get(&target), &entries, UNDO_TIMEOUT).await.map_err(|e| anyhow::anyhow!("cannot undo the unfinished cutover's fence on {source}: {e}; the journal {} stays", path.display()))?;
            if let (Some(id), Some(fleet)) = (&fleet_id, fleet) {
                let _ = fleet.publish_undone(id).await;
            }
            journal::remove(path)?;
            Ok(Some(source))
        }
    }
}
