//! `pgcutover cleanup`: what pgcutover made on the backends and the current
//! direction no longer needs — listed first, then dropped (unless a dry run).
//!
//! What counts (every configured backend, every database that takes connections):
//! - a subscription that is disabled and either is one of pgcutover's own (the way
//!   back, `pgcutover_back_*`) or has its slot on another configured backend (a
//!   forward subscription a cutover disabled and could not drop);
//! - a logical slot named `pgcutover_back_*` that is inactive and that no enabled
//!   subscription on a configured backend uses, and the slots of the subscriptions
//!   above;
//! - a publication named `pgcutover_back_*` that no subscription on another
//!   configured backend reads.
//!
//! The live way back (the enabled subscription, its slot and publication) is never
//! touched, nor anything pgcutover did not make or disable. Each drop is one
//! statement on a fresh control connection; a failure is reported and the rest goes
//! on, so running it again finishes the job.

use std::collections::BTreeSet;

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::Config;
use crate::session::migrate::quote_ident;

const PREFIX: &str = "pgcutover_back_";

/// What a leftover is, in the order cleanup drops them (subscriptions hold slots).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Subscription,
    Slot,
    Publication,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Subscription => "subscription",
            Kind::Slot => "slot",
            Kind::Publication => "publication",
        }
    }
}

/// One thing cleanup removes (or would).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Leftover {
    pub backend: String,
    pub database: String,
    pub kind: Kind,
    pub name: String,
    /// Why it is not needed.
    pub why: String,
    /// WAL it retains (slots).
    pub retains: Option<String>,
    /// After the run: "dropped", "would drop" (dry run) or the error.
    pub outcome: String,
}

struct Sub {
    database: String,
    name: String,
    enabled: bool,
    slot: Option<String>,
    publications: Vec<String>,
}

struct Slot {
    database: String,
    name: String,
    active: bool,
    retains: Option<String>,
}

struct Seen {
    backend: String,
    subs: Vec<Sub>,
    slots: Vec<Slot>,
    /// (database, publication) of pgcutover's own.
    publications: Vec<(String, String)>,
}

async fn look(name: &str, b: &crate::config::BackendConfig) -> anyhow::Result<Seen> {
    let c = super::control::connect(b, "postgres", "pgcutover cleanup").await?;
    let databases: Vec<String> = c.query("SELECT datname::text FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1", &[]).await?.iter().map(|r| r.get(0)).collect();
    let subs = c
        .query(
            "SELECT d.datname::text, s.subname::text, s.subenabled, s.subslotname::text, s.subpublications::text[] FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid ORDER BY 1, 2",
            &[],
        )
        .await?
        .iter()
        .map(|r| Sub { database: r.get(0), name: r.get(1), enabled: r.get(2), slot: r.get(3), publications: r.get(4) })
        .collect();
    let slots = c
        .query(
            "SELECT coalesce(database::text, ''), slot_name::text, active, pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)) FROM pg_replication_slots WHERE slot_type = 'logical' ORDER BY 2",
            &[],
        )
        .await?
        .iter()
        .map(|r| Slot { database: r.get(0), name: r.get(1), active: r.get(2), retains: r.get(3) })
        .collect();
    let mut publications = Vec::new();
    for db in &databases {
        let d = super::control::connect(b, db, "pgcutover cleanup").await?;
        for r in d.query("SELECT pubname::text FROM pg_publication WHERE pubname LIKE 'pgcutover\\_back\\_%' ORDER BY 1", &[]).await? {
            publications.push((db.clone(), r.get(0)));
        }
    }
    Ok(Seen { backend: name.to_string(), subs, slots, publications })
}

/// What cleanup would remove, from what every backend holds.
fn leftovers(seen: &[Seen]) -> Vec<Leftover> {
    let mut out = Vec::new();
    let item = |s: &Seen, database: &str, kind: Kind, name: &str, why: String, retains: Option<String>| Leftover {
        backend: s.backend.clone(),
        database: database.to_string(),
        kind,
        name: name.to_string(),
        why,
        retains,
        outcome: String::new(),
    };
    // Slots some enabled subscription reads, anywhere; publications some
    // subscription on another backend reads.
    let read: BTreeSet<&str> = seen.iter().flat_map(|s| s.subs.iter()).filter(|x| x.enabled).filter_map(|x| x.slot.as_deref()).collect();
    let mut doomed_slots: BTreeSet<(String, String)> = BTreeSet::new();
    for s in seen {
        for sub in &s.subs {
            if sub.enabled {
                continue;
            }
            let slot_elsewhere = sub.slot.as_deref().and_then(|slot| seen.iter().filter(|o| o.backend != s.backend).find(|o| o.slots.iter().any(|x| x.name == slot && x.database == sub.database)));
            let ours = sub.name.starts_with(PREFIX);
            if !ours && slot_elsewhere.is_none() {
                continue;
            }
            let why = if ours { "the way back of an earlier cutover, disabled".to_string() } else { "disabled by a cutover: the forward subscription of an earlier direction".to_string() };
            out.push(item(s, &sub.database, Kind::Subscription, &sub.name, why, None));
            if let (Some(slot), Some(o)) = (&sub.slot, slot_elsewhere) {
                doomed_slots.insert((o.backend.clone(), slot.clone()));
            }
        }
    }
    for s in seen {
        for slot in &s.slots {
            let doomed = doomed_slots.contains(&(s.backend.clone(), slot.name.clone()));
            let idle_ours = slot.name.starts_with(PREFIX) && !slot.active && !read.contains(slot.name.as_str());
            if doomed || idle_ours {
                let why = if doomed { "the slot of a subscription cleanup drops" } else { "the way back's slot of an earlier cutover, read by no subscription" };
                out.push(item(s, &slot.database, Kind::Slot, &slot.name, why.to_string(), slot.retains.clone()));
            }
        }
        for (db, publication) in &s.publications {
            let read_elsewhere = seen
                .iter()
                .filter(|o| o.backend != s.backend)
                .flat_map(|o| o.subs.iter())
                .any(|x| x.database == *db && x.enabled && x.publications.iter().any(|p| p == publication));
            if !read_elsewhere {
                out.push(item(s, db, Kind::Publication, publication, "the way back's publication of an earlier cutover, read by no subscription".to_string(), None));
            }
        }
    }
    out
}

async fn drop_one(c: &Client, l: &Leftover) -> Result<(), tokio_postgres::Error> {
    c.batch_execute("SET default_transaction_read_only = off").await?;
    match l.kind {
        // Its slot is dropped on its own backend (it may be gone or unreachable).
        Kind::Subscription => super::reverse::drop_subscription(c, &l.name).await,
        Kind::Slot => c.query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active", &[&l.name]).await.map(drop),
        Kind::Publication => c.batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(&l.name))).await,
    }
}

/// Lists what pgcutover made and no longer needs on every backend of `config`, and
/// drops it unless `dry_run`. Subscriptions go first (they hold slots).
pub async fn run(config: &Config, dry_run: bool) -> anyhow::Result<Vec<Leftover>> {
    let mut seen = Vec::new();
    for (name, b) in &config.backends {
        seen.push(look(name, b).await.map_err(|e| anyhow::anyhow!("backend {name}: {e:#}"))?);
    }
    let mut found = leftovers(&seen);
    found.sort_by_key(|l| l.kind);
    for l in &mut found {
        if dry_run {
            l.outcome = "would drop".into();
            continue;
        }
        let Some(b) = config.backends.get(&l.backend) else { continue };
        let database = if l.database.is_empty() { "postgres" } else { &l.database };
        l.outcome = match super::control::connect(b, database, "pgcutover cleanup").await {
            Ok(c) => match drop_one(&c, l).await {
                Ok(()) => "dropped".into(),
                Err(e) => format!("not dropped: {}", super::control::describe(&e)),
            },
            Err(e) => format!("not dropped: {e:#}"),
        };
    }
    Ok(found)
}
