//! A fleet of proxies that cut over together, coordinated through etcd.
//!
//! Everything lives under `[fleet] prefix` (default `/pgcutover`):
//! - `members/<name>`: each instance's record, kept alive by its own lease (the
//!   fleet is whoever is alive);
//! - `lock`: the cutover running now and its leader, held by a lease of its own
//!   (one cutover at a time; a dead leader's lock goes when its lease does);
//! - `active`: the fleet's active backend, written in the same transaction as a
//!   commit decision and read by every instance before it serves;
//! - `cutovers/<id>/.plan`, `.pause`, `.journal`, `.decision`, `.undone`: the
//!   leader's side of one cutover (see [`crate::cutover`]);
//! - `cutovers/<id>/<member>`: each member's progress and outcome;
//! - `census/<id>`, `census/<id>/<member>`: a member asking the others which of the
//!   source's backends are theirs, and their answers (see [`census`]).
//!
//! One watch over the prefix keeps a [`View`] of all of it current. The cutover, the
//! console and the cancel routing read the view; writes are single puts or
//! transactions. etcd's client is the `etcd-client` crate; every request is bounded.

pub mod census;
pub mod etcd;
mod view;

use std::sync::atomic::{AtomicI64, AtomicU16, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::FleetConfig;
use crate::server::Proxy;
pub use view::{Board, View};

/// How long one etcd request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// An instance's record under `members/<name>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Member {
    pub name: String,
    /// Random per process: tells a restarted instance from the one it replaces.
    pub instance: String,
    /// Where clients (and forwarded cancel requests) reach it.
    pub address: String,
    pub admin_socket: Option<String>,
    pub version: String,
    pub active: String,
    pub sessions: usize,
    /// The top bits of the process ids this instance mints: cancel keys route here.
    pub tag: u16,
    pub started_at: String,
}

/// The leader's plan of one cutover, under `cutovers/<id>/.plan`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Plan {
    pub id: String,
    pub leader: String,
    pub source: String,
    pub target: String,
    /// The members that take part: those alive when the plan was made.
    pub members: Vec<String>,
    pub rehearse: bool,
}

/// The one decision of a cutover, under `cutovers/<id>/.decision`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Decision {
    pub commit: bool,
    /// The backend every member serves on from now.
    pub active: String,
    pub reason: Option<String>,
    /// Who wrote it.
    pub by: String,
    /// An abort that ends a rehearsal: every member rolled back on purpose.
    #[serde(default)]
    pub rehearsal: bool,
}

/// How far a member got, under `cutovers/<id>/<member>`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Progress {
    /// It has the plan; its backends on the source are listed (the preflight
    /// does not count them as sessions bypassing the fleet).
    Joined,
    /// Its sessions' target connections are ready.
    Prepared,
    /// Its gate is closed; no new transaction starts on the source.
    Closed,
    /// Nothing of it runs on the source any more.
    Drained,
    /// It could not go on: the cutover aborts.
    Failed,
    /// It applied the decision.
    Done,
}

/// A member's report, rewritten whole at each step.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Report {
    pub progress: Option<Progress>,
    pub reason: Option<String>,
    pub sessions_prepared: usize,
    /// The databases its sessions use: the leader cuts over each.
    pub databases: Vec<String>,
    /// Its sessions' backends on the source, and the local ports of its backend
    /// connections: the fence never counts them as sessions bypassing the fleet.
    pub pids: Vec<i32>,
    pub ports: Vec<i32>,
    /// Wall-clock microseconds since the epoch.
    pub gate_closed_at: Option<u64>,
    pub gate_opened_at: Option<u64>,
    pub drain_ms: f64,
    pub cancelled: usize,
    pub held_requests: u64,
    pub longest_hold_ms: f64,
    pub sessions_moved: usize,
    /// "committed", "rolled back", "rehearsed".
    pub outcome: Option<String>,
}

pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// The holder of the cutover lock, under `lock`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Lock {
    pub leader: String,
    pub id: String,
}

/// This instance's seat in the fleet.
pub struct Fleet {
    client: Client,
    pub config: FleetConfig,
    pub name: String,
    instance: String,
    tag: AtomicU16,
    lease: AtomicI64,
    view: watch::Sender<View>,
    proxy: OnceLock<Weak<Proxy>>,
}

impl Fleet {
    pub fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.config.prefix)
    }

    fn cutover_key(&self, id: &str, leaf: &str) -> String {
        self.key(&format!("cutovers/{id}/{leaf}"))
    }

    /// The top bits of the pids this instance mints (0 before it joins).
    pub fn tag(&self) -> u16 {
        self.tag.load(Ordering::SeqCst)
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// What the watch has seen so far.
    pub fn view(&self) -> View {
        self.view.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<View> {
        self.view.subscribe()
    }

    /// Connects to etcd and reads the fleet's keys once, bounded: an instance
    /// learns the active backend (and waits for a cutover running now) before it
    /// serves.
    pub async fn connect(config: &FleetConfig) -> anyhow::Result<Arc<Fleet>> {
        let client = etcd::connect(config).await?;
        let name = config.member_name();
        let (view, _) = watch::channel(View::default());
        let fleet = Arc::new(Fleet {
            client,
            config: config.clone(),
            name,
            instance: format!("{:016x}", rand::random::<u64>()),
            tag: AtomicU16::new(0),
            lease: AtomicI64::new(0),
            view,
            proxy: OnceLock::new(),
        });
        let snapshot = view::load(&fleet).await?;
        fleet.view.send_replace(snapshot);
        Ok(fleet)
    }

    /// The backend the fleet serves on, as etcd says. A cutover running now is
    /// waited for (bounded): an instance must not start serving on a source that is
    /// being fenced.
    pub async fn settled_active(self: &Arc<Self>, bound: Duration) -> anyhow::Result<Option<String>> {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let v = view::load(self).await?;
            let running = v.lock.clone();
            self.view.send_replace(v.clone());
            match running {
                None => return Ok(v.active.clone()),
                Some(l) => {
                    if v.cutovers.get(&l.id).and_then(|b| b.decision.as_ref()).is_some() {
                        return Ok(v.active.clone());
                    }
                    if tokio::time::Instant::now() >= deadline {
                        anyhow::bail!("cutover {} led by {} is still running in the fleet; start again when it has ended", l.id, l.leader);
                    }
                    tracing::info!(leader = %l.leader, id = %l.id, "a fleet cutover is running: waiting for its decision before serving");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Records `active` as the fleet's active backend unless another instance
    /// recorded one first; returns the one that stands.
    pub async fn init_active(&self, active: &str) -> anyhow::Result<String> {
        let key = self.key("active");
        let txn = Txn::new().when([Compare::version(key.clone(), CompareOp::Equal, 0)]).and_then([TxnOp::put(key.clone(), active, None)]).or_else([TxnOp::get(key, None)]);
        let mut client = self.client();
        let r = tokio::time::timeout(REQUEST_TIMEOUT, client.txn(txn)).await.context("etcd did not answer")?.context("etcd: cannot record the active backend")?;
        if r.succeeded() {
            return Ok(active.into());
        }
        let standing = r.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().and_then(|kv| kv.value_str().ok().map(str::to_string)),
            _ => None,
        });
        Ok(standing.unwrap_or_else(|| active.into()))
    }

    /// Joins the fleet with the running proxy: its member record, kept alive by a
    /// lease, and the watch that follows cutovers led elsewhere.
    pub async fn join(self: Arc<Self>, proxy: &Arc<Proxy>) -> anyhow::Result<Arc<Fleet>> {
        // A tag no live member uses.
        let taken: Vec<u16> = self.view().members.values().filter(|m| m.name != self.name).map(|m| m.tag).collect();
        let tag = loop {
            let t = rand::random::<u16>() & crate::session::registry::TAG_MASK;
            if t != 0 && !taken.contains(&t) {
                break t;
            }
        };
        self.tag.store(tag, Ordering::SeqCst);
        proxy.sessions.set_tag(tag);
        let _ = self.proxy.set(Arc::downgrade(proxy));
        self.register().await?;
        proxy.set_fleet(self.clone());
        tokio::spawn(view::watch(self.clone()));
        tokio::spawn(keep_alive(self.clone()));
        tracing::info!(name = %self.name, tag, members = self.view().members.len(), "joined the fleet");
        Ok(self)
    }

    /// Leaves the fleet at once (a clean shutdown): the membership lease is revoked
    /// rather than left to expire.
    pub async fn leave(&self) {
        let lease = self.lease.swap(0, Ordering::SeqCst);
        let mut client = self.client();
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, client.lease_revoke(lease)).await;
    }

    fn proxy(&self) -> Option<Arc<Proxy>> {
        self.proxy.get().and_then(Weak::upgrade)
    }

    fn record(&self) -> Member {
        let proxy = self.proxy();
        let address = self
            .config
            .advertise
            .map(|a| a.to_string())
            .or_else(|| proxy.as_ref().and_then(|p| p.listen_addr()).map(|a| a.to_string()))
            .unwrap_or_default();
        let admin_socket = proxy.as_ref().and_then(|p| p.listen_addr().and_then(|a| p.config().socket_path(a.port()))).map(|p| p.display().to_string());
        Member {
            name: self.name.clone(),
            instance: self.instance.clone(),
            address,
            admin_socket,
            version: env!("CARGO_PKG_VERSION").into(),
            active: proxy.as_ref().map(|p| p.active_backend().name.clone()).unwrap_or_default(),
            sessions: proxy.as_ref().map(|p| p.sessions.len()).unwrap_or(0),
            tag: self.tag(),
            started_at: humantime::format_rfc3339_seconds(SystemTime::now() - proxy.as_ref().map(|p| p.uptime()).unwrap_or_default()).to_string(),
        }
    }

    /// Writes this instance's record under a fresh lease. Another live instance of
    /// the same name is waited out for one lease (a restart finds its predecessor's
    /// record until that lease expires), then refused.
    async fn register(&self) -> anyhow::Result<()> {
        let mut client = self.client();
        let key = self.key(&format!("members/{}", self.name));
        let ttl = self.config.lease_ttl.as_secs().max(1) as i64;
        let deadline = tokio::time::Instant::now() + self.config.lease_ttl + Duration::from_secs(2);
        loop {
            let lease = client.lease_grant(ttl, None).await.context("etcd: cannot grant the membership lease")?.id();
            let value = serde_json::to_vec(&self.record())?;
            let txn = Txn::new()
                .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.clone(), value, Some(PutOptions::new().with_lease(lease)))])
                .or_else([TxnOp::get(key.clone(), None)]);
            let r = client.txn(txn).await.context("etcd: cannot register this member")?;
            if r.succeeded() {
                self.lease.store(lease, Ordering::SeqCst);
                return Ok(());
            }
            let _ = client.lease_revoke(lease).await;
            let other = first_value::<Member>(r.op_responses());
            if other.as_ref().is_some_and(|m| m.instance == self.instance) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "another instance named {:?} is alive in the fleet (at {}): give this one another [fleet] name",
                    self.name,
                    other.map(|m| m.address).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Takes the fleet's cutover lock for `id` under a lease of its own, kept
    /// alive until the returned guard is dropped. Held by another cutover: refused
    /// with its leader's name.
    pub async fn lock(self: &Arc<Self>, id: &str) -> Result<LockGuard, String> {
        let mut client = self.client();
        let ttl = self.config.lease_ttl.as_secs().max(1) as i64;
        let lease = client.lease_grant(ttl, None).await.map_err(|e| etcd::unreachable(&self.config, &e))?.id();
        let key = self.key("lock");
        let value = serde_json::to_string(&Lock { leader: self.name.clone(), id: id.into() }).unwrap_or_default();
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), value.clone(), Some(PutOptions::new().with_lease(lease)))])
            .or_else([TxnOp::get(key.clone(), None)]);
        let r = client.txn(txn).await.map_err(|e| etcd::unreachable(&self.config, &e))?;
        if !r.succeeded() {
            let _ = client.lease_revoke(lease).await;
            let holder = first_value::<Lock>(r.op_responses());
            return Err(match holder {
                Some(l) => format!("a fleet cutover is already running: {} leads cutover {}", l.leader, l.id),
                None => "a fleet cutover is already running".into(),
            });
        }
        let keeper = tokio::spawn(keep_lease(self.clone(), lease));
        Ok(LockGuard { fleet: self.clone(), lease, value, keeper })
    }

    async fn put(&self, key: String, value: Vec<u8>) -> anyhow::Result<()> {
        let mut client = self.client();
        tokio::time::timeout(REQUEST_TIMEOUT, client.put(key.clone(), value, None)).await.context("etcd did not answer")?.with_context(|| format!("etcd: cannot write {key}"))?;
        Ok(())
    }

    pub async fn publish_plan(&self, plan: &Plan) -> anyhow::Result<()> {
        self.put(self.cutover_key(&plan.id, ".plan"), serde_json::to_vec(plan)?).await
    }

    pub async fn publish_pause(&self, id: &str) -> anyhow::Result<()> {
        self.put(self.cutover_key(id, ".pause"), b"1".to_vec()).await
    }

    pub async fn publish_journal(&self, id: &str, entries: &[crate::cutover::journal::Entry]) -> anyhow::Result<()> {
        self.put(self.cutover_key(id, ".journal"), serde_json::to_vec(entries)?).await
    }

    pub async fn publish_undone(&self, id: &str) -> anyhow::Result<()> {
        self.put(self.cutover_key(id, ".undone"), b"1".to_vec()).await
    }

    pub async fn report(&self, id: &str, report: &Report) -> anyhow::Result<()> {
        self.put(self.cutover_key(id, &self.name), serde_json::to_vec(report)?).await
    }

    /// The commit decision, with the active backend, in one transaction; taken
    /// only while `lock` is still this leader's and nobody decided before.
    /// Returns the decision that stands (an abort someone wrote first, say).
    pub async fn commit(&self, id: &str, lock: &LockGuard, target: &str) -> anyhow::Result<Decision> {
        let decision = Decision { commit: true, active: target.into(), reason: None, by: self.name.clone(), rehearsal: false };
        let key = self.cutover_key(id, ".decision");
        let txn = Txn::new()
            .when([Compare::value(self.key("lock"), CompareOp::Equal, lock.value.clone()), Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), serde_json::to_vec(&decision)?, None), TxnOp::put(self.key("active"), target, None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let mut client = self.client();
        let r = tokio::time::timeout(REQUEST_TIMEOUT, client.txn(txn)).await.context("etcd did not answer")?.context("etcd: cannot write the decision")?;
        if r.succeeded() {
            return Ok(decision);
        }
        match first_value::<Decision>(r.op_responses()) {
            Some(d) => Ok(d),
            None => Ok(Decision { commit: false, active: String::new(), reason: Some("the leader's lock expired before the decision".into()), by: self.name.clone(), rehearsal: false }),
        }
    }

    /// Aborts `id` unless it is decided already; returns the decision that stands.
    pub async fn abort(&self, id: &str, source: &str, reason: &str, rehearsal: bool) -> anyhow::Result<Decision> {
        let decision = Decision { commit: false, active: source.into(), reason: Some(reason.into()), by: self.name.clone(), rehearsal };
        let key = self.cutover_key(id, ".decision");
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), serde_json::to_vec(&decision)?, None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let mut client = self.client();
        let r = tokio::time::timeout(REQUEST_TIMEOUT, client.txn(txn)).await.context("etcd did not answer")?.context("etcd: cannot write the decision")?;
        if r.succeeded() {
            return Ok(decision);
        }
        first_value::<Decision>(r.op_responses()).context("etcd: the decision vanished")
    }

    /// Removes the keys of every cutover but `keep`.
    pub async fn prune(&self, keep: &str) {
        let ids: Vec<String> = self.view().cutovers.keys().filter(|id| id.as_str() != keep).cloned().collect();
        let mut client = self.client();
        for id in ids {
            let _ = client.delete(self.key(&format!("cutovers/{id}/")), Some(etcd_client::DeleteOptions::new().with_prefix())).await;
        }
    }

    /// Waits until `ready` says the view is what the caller waits for (Ok) or can
    /// no longer be (Err), or `bound` passes.
    pub async fn wait<T>(&self, bound: Duration, what: &str, mut ready: impl FnMut(&View) -> Option<Result<T, String>>) -> Result<T, String> {
        let mut rx = self.subscribe();
        let wait = async {
            loop {
                if let Some(r) = ready(&rx.borrow_and_update()) {
                    return r;
                }
                if rx.changed().await.is_err() {
                    return Err("the fleet's watch ended".into());
                }
            }
        };
        match tokio::time::timeout(bound, wait).await {
            Ok(r) => r,
            Err(_) => Err(format!("{what}: not within {bound:?}")),
        }
    }

    /// Where a cancel key minted by another member goes: that member's address.
    pub fn owner_of(&self, pid: i32) -> Option<String> {
        let tag = crate::session::registry::tag_of(pid);
        if tag == self.tag() {
            return None;
        }
        self.view.borrow().members.values().find(|m| m.tag == tag && m.name != self.name).map(|m| m.address.clone())
    }
}

fn first_value<T: serde::de::DeserializeOwned>(responses: Vec<TxnOpResponse>) -> Option<T> {
    responses.into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g.kvs().first().and_then(|kv| serde_json::from_slice(kv.value()).ok()),
        _ => None,
    })
}

/// The cutover lock, held while this lives.
pub struct LockGuard {
    fleet: Arc<Fleet>,
    lease: i64,
    value: String,
    keeper: tokio::task::JoinHandle<()>,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.keeper.abort();
        let (mut client, lease) = (self.fleet.client(), self.lease);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, client.lease_revoke(lease)).await;
        });
    }
}

/// Keeps a lease alive (a third of its TTL between beats) until aborted or lost.
async fn keep_lease(fleet: Arc<Fleet>, lease: i64) {
    let beat = fleet.config.lease_ttl / 3;
    let mut client = fleet.client();
    let Ok((mut keeper, mut stream)) = client.lease_keep_alive(lease).await else { return };
    loop {
        if keeper.keep_alive().await.is_err() {
            return;
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, stream.message()).await {
            Ok(Ok(Some(r))) if r.ttl() > 0 => {}
            _ => return,
        }
        tokio::time::sleep(beat).await;
    }
}

/// Keeps this instance's membership alive and its record current; a lost lease (a
/// partition longer than the TTL) is replaced by a new one.
async fn keep_alive(fleet: Arc<Fleet>) {
    let beat = fleet.config.lease_ttl / 3;
    let mut client = fleet.client();
    let key = fleet.key(&format!("members/{}", fleet.name));
    loop {
        tokio::time::sleep(beat).await;
        if fleet.proxy().is_none() {
            return;
        }
        let lease = fleet.lease.load(Ordering::SeqCst);
        if lease == 0 {
            return; // left the fleet
        }
        let alive = async {
            let r = client.lease_keep_alive(lease).await;
            let (mut keeper, mut stream) = r.ok()?;
            keeper.keep_alive().await.ok()?;
            let r = stream.message().await.ok()??;
            (r.ttl() > 0).then_some(())
        };
        let ok = matches!(tokio::time::timeout(REQUEST_TIMEOUT, alive).await, Ok(Some(())));
        if ok {
            let record = fleet.record();
            let value = serde_json::to_vec(&record).unwrap_or_default();
            let current = fleet.view.borrow().members.get(&fleet.name).cloned();
            if current.as_ref() != Some(&record) {
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, client.put(key.clone(), value, Some(PutOptions::new().with_lease(lease)))).await;
            }
        } else if let Ok(Ok(l)) = tokio::time::timeout(REQUEST_TIMEOUT, client.lease_grant(fleet.config.lease_ttl.as_secs().max(1) as i64, None)).await {
            tracing::warn!(name = %fleet.name, "the membership lease was lost: joining again");
            fleet.lease.store(l.id(), Ordering::SeqCst);
            let value = serde_json::to_vec(&fleet.record()).unwrap_or_default();
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, client.put(key.clone(), value, Some(PutOptions::new().with_lease(l.id())))).await;
        }
    }
}

