//! A census: which of the source's backends belong to the fleet, asked outside a
//! cutover (`pgcutover check` on one member must not take the other members'
//! sessions for sessions that bypass the fleet).
//!
//! The asker writes `census/<id>` under a short lease of its own; every other live
//! member answers under `census/<id>/<member>` with that lease, so all of it goes
//! when the asker revokes the lease, or dies and the lease expires.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use etcd_client::PutOptions;
use serde::{Deserialize, Serialize};

use super::{Fleet, REQUEST_TIMEOUT};

/// A request, under `census/<id>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Request {
    pub by: String,
    /// The backend whose connections are counted.
    pub source: String,
    /// The asker's lease: answers are written under it.
    pub lease: i64,
}

/// One member's answer, under `census/<id>/<member>`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Answer {
    /// Its sessions' backends on the source.
    pub pids: Vec<i32>,
    /// The local ports of its backend connections, those logging in or out too.
    pub ports: Vec<i32>,
}

/// One census's keys.
#[derive(Debug, Clone, Default)]
pub struct Board {
    pub request: Option<Request>,
    pub answers: BTreeMap<String, Answer>,
}

/// What the other members said.
#[derive(Debug, Default)]
pub struct Census {
    pub pids: Vec<i32>,
    pub ports: Vec<i32>,
    /// Live members that did not answer in time: their connections may be
    /// counted as anyone's.
    pub missing: Vec<String>,
}

/// How far back a member's answer reaches for ports it gave up: the asker looked at
/// pg_stat_activity before it asked, and a server process outlives its socket a
/// little.
const RECENT: Duration = Duration::from_secs(5);

impl Fleet {
    /// Asks every other live member for its connections to `source`, waiting at
    /// most `bound` for the answers.
    pub async fn census(&self, source: &str, bound: Duration) -> anyhow::Result<Census> {
        let mut client = self.client();
        let ttl = (bound + Duration::from_secs(5)).as_secs() as i64;
        let lease = tokio::time::timeout(REQUEST_TIMEOUT, client.lease_grant(ttl, None)).await.context("etcd did not answer")?.context("etcd: cannot grant the census lease")?.id();
        let id = format!("{}-{:08x}", self.name, rand::random::<u32>());
        let request = Request { by: self.name.clone(), source: source.into(), lease };
        let key = self.key(&format!("census/{id}"));
        let put = client.put(key, serde_json::to_vec(&request)?, Some(PutOptions::new().with_lease(lease)));
        let asked = tokio::time::timeout(REQUEST_TIMEOUT, put).await.context("etcd did not answer").and_then(|r| r.context("etcd: cannot ask for the census"));
        let answers = match asked {
            Ok(_) => {
                let others = |v: &super::View| -> Vec<String> { v.members.keys().filter(|m| **m != self.name).cloned().collect() };
                let all = self
                    .wait(bound, "every member's census", |v| {
                        let answers = &v.census.get(&id)?.answers;
                        others(v).iter().all(|m| answers.contains_key(m)).then(|| Ok(answers.clone()))
                    })
                    .await;
                all.unwrap_or_else(|_| self.view().census.get(&id).map(|b| b.answers.clone()).unwrap_or_default())
            }
            Err(e) => {
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, client.lease_revoke(lease)).await;
                return Err(e);
            }
        };
        // The request and every answer go with the lease.
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, client.lease_revoke(lease)).await;
        let view = self.view();
        let mut census = Census::default();
        for m in view.members.keys().filter(|m| **m != self.name) {
            match answers.get(m) {
                Some(a) => {
                    census.pids.extend(&a.pids);
                    census.ports.extend(&a.ports);
                }
                None => census.missing.push(m.clone()),
            }
        }
        Ok(census)
    }

    /// Answers census `id` with this instance's connections to the backend it names.
    pub(super) async fn answer_census(self: Arc<Self>, id: String, request: Request) {
        let Some(proxy) = self.proxy() else { return };
        let pids = proxy.sessions.pids_on(&request.source);
        let since = Instant::now().checked_sub(RECENT).unwrap_or_else(Instant::now);
        let answer = Answer { pids, ports: crate::backend::ports::ours_since(since) };
        let Ok(value) = serde_json::to_vec(&answer) else { return };
        let key = self.key(&format!("census/{id}/{}", self.name));
        let mut client = self.client();
        let put = client.put(key, value, Some(PutOptions::new().with_lease(request.lease)));
        match tokio::time::timeout(REQUEST_TIMEOUT, put).await {
            Ok(Ok(_)) => {}
            // The asker gave up (its lease is gone) or etcd is away: it counts this
            // member as not answering.
            Ok(Err(e)) => tracing::debug!(error = %e, census = %id, "could not answer a census"),
            Err(_) => tracing::debug!(census = %id, "etcd did not take a census answer in time"),
        }
    }
}
