//! The fleet as etcd holds it, kept current by one watch over the prefix.
//!
//! The watcher also acts on what it sees: it starts this instance's part of a
//! cutover another member leads, and brings an instance that missed a decision (it
//! was partitioned, say) onto the fleet's active backend.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};

use super::{Decision, Fleet, Lock, Member, Plan, Report};
use crate::cutover::journal::Entry;

#[derive(Debug, Clone, Default)]
pub struct View {
    /// The watch is running (false while etcd is unreachable).
    pub connected: bool,
    pub members: BTreeMap<String, Member>,
    pub lock: Option<Lock>,
    pub active: Option<String>,
    pub cutovers: BTreeMap<String, Board>,
    pub census: BTreeMap<String, super::census::Board>,
}

/// One cutover's keys.
#[derive(Debug, Clone, Default)]
pub struct Board {
    pub plan: Option<Plan>,
    pub paused: bool,
    pub journal: Vec<Entry>,
    pub decision: Option<Decision>,
    /// The fence is undone after an abort.
    pub undone: bool,
    pub reports: BTreeMap<String, Report>,
}

impl View {
    pub fn board(&self, id: &str) -> Option<&Board> {
        self.cutovers.get(id)
    }

    /// The leader of cutover `id` holds the lock no more (its lease expired).
    pub fn leader_gone(&self, id: &str) -> bool {
        self.connected && self.lock.as_ref().is_none_or(|l| l.id != id)
    }

    pub(super) fn apply(&mut self, prefix: &str, key: &[u8], value: Option<&[u8]>) {
        let Ok(key) = std::str::from_utf8(key) else { return };
        let Some(rest) = key.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')) else { return };
        match rest.split('/').collect::<Vec<_>>().as_slice() {
            ["members", name] => match value.and_then(json) {
                Some(m) => {
                    self.members.insert(name.to_string(), m);
                }
                None => {
                    self.members.remove(*name);
                }
            },
            ["lock"] => self.lock = value.and_then(json),
            ["active"] => self.active = value.and_then(|v| std::str::from_utf8(v).ok()).map(str::to_string),
            ["cutovers", id, leaf] => {
                if value.is_none() && leaf.is_empty() {
                    return;
                }
                let board = self.cutovers.entry(id.to_string()).or_default();
                match *leaf {
                    ".plan" => board.plan = value.and_then(json),
                    ".pause" => board.paused = value.is_some(),
                    ".journal" => board.journal = value.and_then(json).unwrap_or_default(),
                    ".decision" => board.decision = value.and_then(json),
                    ".undone" => board.undone = value.is_some(),
                    member => match value.and_then(json) {
                        Some(r) => {
                            board.reports.insert(member.to_string(), r);
                        }
                        None => {
                            board.reports.remove(member);
                        }
                    },
                }
                if value.is_none() && board.plan.is_none() && board.reports.is_empty() && board.decision.is_none() {
                    self.cutovers.remove(*id);
                }
            }
            ["census", id] => {
                let board = self.census.entry(id.to_string()).or_default();
                board.request = value.and_then(json);
                if board.request.is_none() && board.answers.is_empty() {
                    self.census.remove(*id);
                }
            }
            ["census", id, member] => {
                let board = self.census.entry(id.to_string()).or_default();
                match value.and_then(json) {
                    Some(a) => {
                        board.answers.insert(member.to_string(), a);
                    }
                    None => {
                        board.answers.remove(*member);
                    }
                }
                if board.request.is_none() && board.answers.is_empty() {
                    self.census.remove(*id);
                }
            }
            _ => {}
        }
    }
}

fn json<T: serde::de::DeserializeOwned>(v: &[u8]) -> Option<T> {
    serde_json::from_slice(v).ok()
}

/// Reads every key of the fleet once; returns the view and its revision.
async fn read(fleet: &Fleet) -> anyhow::Result<(View, i64)> {
    let mut client = fleet.client();
    let r = tokio::time::timeout(super::REQUEST_TIMEOUT, client.get(fleet.config.prefix.clone() + "/", Some(GetOptions::new().with_prefix())))
        .await
        .map_err(|_| anyhow::anyhow!("etcd at {} did not answer", fleet.config.etcd.join(",")))?
        .map_err(|e| anyhow::anyhow!("{}", super::etcd::unreachable(&fleet.config, &e)))?;
    let mut view = View { connected: true, ..View::default() };
    for kv in r.kvs() {
        view.apply(&fleet.config.prefix, kv.key(), Some(kv.value()));
    }
    let revision = r.header().map(|h| h.revision()).unwrap_or(0);
    Ok((view, revision))
}

pub(super) async fn load(fleet: &Fleet) -> anyhow::Result<View> {
    Ok(read(fleet).await?.0)
}

/// Follows the prefix for as long as the proxy runs: a full read, then a watch
/// from the revision after it; on any error, marks the view disconnected and
/// starts over.
pub(super) async fn watch(fleet: Arc<Fleet>) {
    let mut started: BTreeSet<String> = BTreeSet::new();
    loop {
        if fleet.proxy().is_none() {
            return;
        }
        if let Err(e) = follow(&fleet, &mut started).await {
            tracing::warn!(error = %e, "the fleet's watch failed; reconnecting");
        }
        fleet.view.send_modify(|v| v.connected = false);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn follow(fleet: &Arc<Fleet>, started: &mut BTreeSet<String>) -> anyhow::Result<()> {
    let (view, revision) = read(fleet).await?;
    fleet.view.send_replace(view);
    react(fleet, started);
    let mut client = fleet.client();
    let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
    let mut stream = client.watch(fleet.config.prefix.clone() + "/", Some(options)).await?;
    let prefix = fleet.config.prefix.clone();
    loop {
        let Some(resp) = stream.message().await? else { anyhow::bail!("etcd ended the watch") };
        if resp.canceled() {
            anyhow::bail!("etcd cancelled the watch (compacted at {})", resp.compact_revision());
        }
        if resp.events().is_empty() {
            continue;
        }
        fleet.view.send_modify(|v| {
            v.connected = true;
            for e in resp.events() {
                let Some(kv) = e.kv() else { continue };
                let value = (e.event_type() == EventType::Put).then(|| kv.value());
                v.apply(&prefix, kv.key(), value);
            }
        });
        react(fleet, started);
    }
}

/// Acts on the view: joins a cutover another member plans with this one in it,
/// and converges on the fleet's active backend when no cutover runs here.
fn react(fleet: &Arc<Fleet>, started: &mut BTreeSet<String>) {
    let Some(proxy) = fleet.proxy() else { return };
    let view = fleet.view();
    for (id, board) in &view.cutovers {
        let Some(plan) = &board.plan else { continue };
        if plan.leader == fleet.name || !plan.members.contains(&fleet.name) || board.decision.is_some() || started.contains(id) {
            continue;
        }
        started.insert(id.clone());
        let (proxy, plan) = (proxy.clone(), plan.clone());
        tokio::spawn(async move {
            let report = crate::cutover::follow(&proxy, plan).await;
            tracing::info!(outcome = report.outcome.as_str(), reason = report.reason.as_deref().unwrap_or(""), "fleet cutover: this member's part ended");
        });
    }
    for (id, board) in &view.census {
        let Some(request) = &board.request else { continue };
        let key = format!("census/{id}");
        if request.by == fleet.name || board.answers.contains_key(&fleet.name) || started.contains(&key) {
            continue;
        }
        started.insert(key);
        tokio::spawn(fleet.clone().answer_census(id.clone(), request.clone()));
    }
    started.retain(|k| k.strip_prefix("census/").is_none_or(|id| view.census.contains_key(id)));
    let Some(active) = &view.active else { return };
    if proxy.cutover.running() || proxy.active_backend().name == *active {
        return;
    }
    let Some(target) = proxy.backend(active) else {
        tracing::error!(backend = %active, "the fleet's active backend is not in this instance's configuration");
        return;
    };
    tracing::warn!(from = %proxy.active_backend().name, to = %active, "the fleet decided on another active backend: converging");
    proxy.set_active(target);
    if let Some(path) = crate::state::path(&proxy.config(), proxy.config_path().as_deref()) {
        if let Err(e) = crate::state::save(&path, active) {
            tracing::error!(file = %path.display(), error = %e, "could not record the active backend");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_under_the_prefix_build_the_view_and_deletes_take_them_back() {
        let mut v = View::default();
        let member = serde_json::to_vec(&Member {
            name: "a".into(),
            instance: "1".into(),
            address: "127.0.0.1:6432".into(),
            admin_socket: None,
            version: "0".into(),
            active: "blue".into(),
            sessions: 3,
            tag: 7,
            started_at: String::new(),
        })
        .unwrap();
        v.apply("/p", b"/p/members/a", Some(&member));
        v.apply("/p", b"/p/active", Some(b"blue"));
        v.apply("/p", b"/p/lock", Some(br#"{"leader":"a","id":"a-1"}"#));
        v.apply("/p", b"/p/cutovers/a-1/.pause", Some(b"1"));
        v.apply("/p", b"/p/cutovers/a-1/b", Some(br#"{"progress":"closed","pids":[5]}"#));
        // Not ours: another prefix, and a key that only starts like ours.
        v.apply("/p", b"/q/members/z", Some(&member));
        v.apply("/p", b"/px/members/z", Some(&member));
        assert_eq!(v.members.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(v.active.as_deref(), Some("blue"));
        assert!(!v.leader_gone("a-1") || !v.connected);
        let b = v.board("a-1").unwrap();
        assert!(b.paused);
        assert_eq!(b.reports["b"].progress, Some(super::super::Progress::Closed));
        assert_eq!(b.reports["b"].pids, [5]);
        v.connected = true;
        v.apply("/p", b"/p/lock", None);
        assert!(v.leader_gone("a-1"), "a deleted lock (its lease expired) means the leader is gone");
        v.apply("/p", b"/p/members/a", None);
        assert!(v.members.is_empty());
        v.apply("/p", b"/p/cutovers/a-1/b", None);
        v.apply("/p", b"/p/cutovers/a-1/.pause", None);
        assert!(v.board("a-1").is_none(), "a cutover whose keys are all gone (pruned) leaves the view");
    }

    #[test]
    fn a_census_and_its_answers_come_and_go_with_their_keys() {
        let mut v = View::default();
        v.apply("/p", b"/p/census/a-1", Some(br#"{"by":"a","source":"blue","lease":7}"#));
        v.apply("/p", b"/p/census/a-1/b", Some(br#"{"pids":[11],"ports":[40000]}"#));
        let board = &v.census["a-1"];
        assert_eq!(board.request.as_ref().map(|r| (r.by.as_str(), r.source.as_str(), r.lease)), Some(("a", "blue", 7)));
        assert_eq!(board.answers["b"].pids, [11]);
        // The lease's end deletes them all, in any order.
        v.apply("/p", b"/p/census/a-1", None);
        assert!(v.census.contains_key("a-1"), "an answer is still there");
        v.apply("/p", b"/p/census/a-1/b", None);
        assert!(v.census.is_empty());
    }

    #[test]
    fn a_decision_written_before_rehearsals_were_marked_reads_as_no_rehearsal() {
        let mut v = View::default();
        v.apply("/p", b"/p/cutovers/a-1/.decision", Some(br#"{"commit":false,"active":"blue","reason":"x","by":"a"}"#));
        let d = v.board("a-1").and_then(|b| b.decision.clone()).unwrap();
        assert!(!d.commit && !d.rehearsal);
        v.apply("/p", b"/p/cutovers/a-1/.decision", Some(br#"{"commit":false,"active":"blue","reason":"x","by":"a","rehearsal":true}"#));
        assert!(v.board("a-1").and_then(|b| b.decision.clone()).unwrap().rehearsal);
    }
}
