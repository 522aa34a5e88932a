//! The running proxy: its shared state and its start.
//!
//! Sessions read the configuration, users, TLS and the active backend through the
//! `ArcSwap`s here: a reload or a repoint is one atomic store, and a session that
//! already started keeps what it loaded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use arc_swap::{ArcSwap, ArcSwapOption};
use rand::RngCore;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::auth::Users;
use crate::backend::BackendTarget;
use crate::config::Config;
use crate::protocol::startup::CancelKey;
use crate::session::registry::Registry;
use crate::tls::ServerTls;

pub struct Proxy {
    config: ArcSwap<Config>,
    users: ArcSwap<Users>,
    backends: ArcSwap<HashMap<String, Arc<BackendTarget>>>,
    active: ArcSwap<BackendTarget>,
    client_tls: ArcSwapOption<ServerTls>,
    client_slots: Arc<Semaphore>,
    pub sessions: Arc<Registry>,
    gate: Arc<crate::gate::Gate>,
    mock_secret: [u8; 32],
    started: Instant,
    /// The file RELOAD and SIGHUP read again.
    config_path: Mutex<Option<PathBuf>>,
    listen_addr: Mutex<Option<SocketAddr>>,
    /// What `client_slots` was sized for, to resize it on reload.
    max_clients: AtomicUsize,
    shutting_down: AtomicBool,
    /// Where new sessions log in while a cutover's pause runs (its target: the
    /// source is being fenced); None otherwise.
    logins: ArcSwapOption<BackendTarget>,
    /// The cutover controller: its lock, its state, its last report.
    pub cutover: crate::cutover::Controller,
    /// This instance's seat in a fleet (`[fleet]`), once it has joined.
    fleet: std::sync::OnceLock<Arc<crate::fleet::Fleet>>,
    /// The event loops client connections run on, once started.
    shards: std::sync::OnceLock<crate::shards::Shards>,
    /// The runtime that started the proxy: the control plane (a cutover) runs
    /// there, not on an event loop that relays sessions.
    control: std::sync::OnceLock<tokio::runtime::Handle>,
}

fn build_backends(config: &Config) -> anyhow::Result<HashMap<String, Arc<BackendTarget>>> {
    config
        .backends
        .iter()
        .map(|(name, b)| Ok((name.clone(), Arc::new(BackendTarget::new(name, b).with_context(|| format!("backend {name}"))?))))
        .collect()
}

fn build_tls(config: &Config) -> anyhow::Result<Option<Arc<ServerTls>>> {
    match (&config.proxy.tls_cert, &config.proxy.tls_key) {
        (Some(cert), Some(key)) => Ok(Some(Arc::new(crate::tls::server_tls(cert, key)?))),
        _ => Ok(None),
    }
}

impl Proxy {
    pub fn new(config: Config) -> anyhow::Result<Proxy> {
        let backends = build_backends(&config)?;
        let active = backends
            .get(&config.cutover.active)
            .cloned()
            .with_context(|| format!("no backend named {}", config.cutover.active))?;
        let max_clients = config.proxy.max_client_connections;
        let mut mock_secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut mock_secret);
        Ok(Proxy {
            users: ArcSwap::from_pointee(Users::from_config(&config.auth)),
            client_tls: ArcSwapOption::new(build_tls(&config)?),
            client_slots: Arc::new(Semaphore::new(config.proxy.max_client_connections)),
            backends: ArcSwap::from_pointee(backends),
            active: ArcSwap::new(active),
            config: ArcSwap::from_pointee(config),
            sessions: Arc::new(Registry::default()),
            gate: Arc::new(crate::gate::Gate::new()),
            mock_secret,
            started: Instant::now(),
            config_path: Mutex::new(None),
            listen_addr: Mutex::new(None),
            max_clients: AtomicUsize::new(max_clients),
            shutting_down: AtomicBool::new(false),
            logins: ArcSwapOption::empty(),
            cutover: crate::cutover::Controller::default(),
            fleet: std::sync::OnceLock::new(),
            shards: std::sync::OnceLock::new(),
            control: std::sync::OnceLock::new(),
        })
    }

    /// Spawns `task` on the control plane's runtime (the one that started the
    /// proxy), or here before [`start`].
    pub fn spawn_control<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self.control.get() {
            Some(h) => h.spawn(task),
            None => tokio::spawn(task),
        }
    }

    /// The event loops client connections run on (None before [`start`]).
    pub fn shards(&self) -> Option<&crate::shards::Shards> {
        self.shards.get()
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn users(&self) -> Arc<Users> {
        self.users.load_full()
    }

    pub fn client_tls(&self) -> Option<Arc<ServerTls>> {
        self.client_tls.load_full()
    }

    pub fn client_slots(&self) -> Arc<Semaphore> {
        self.client_slots.clone()
    }

    pub fn active_backend(&self) -> Arc<BackendTarget> {
        self.active.load_full()
    }

    pub fn backend(&self, name: &str) -> Option<Arc<BackendTarget>> {
        self.backends.load().get(name).cloned()
    }

    pub fn gate(&self) -> &Arc<crate::gate::Gate> {
        &self.gate
    }

    pub fn mock_secret(&self) -> &[u8] {
        &self.mock_secret
    }

    /// Where a new session logs in now.
    pub fn login_backend(&self) -> Arc<BackendTarget> {
        match self.logins.load_full() {
            Some(t) => t,
            None => self.active_backend(),
        }
    }

    /// A cutover's pause sends new logins to its target.
    pub(crate) fn logins_redirected(&self) -> bool {
        self.logins.load().is_some()
    }

    pub(crate) fn set_logins(&self, target: Option<Arc<BackendTarget>>) {
        self.logins.store(target);
    }

    /// Repoints the proxy: new sessions go to `target`, and every session looks at
    /// it before its next request (the route is bumped after the store).
    pub(crate) fn set_active(&self, target: Arc<BackendTarget>) {
        self.active.store(target);
        self.gate.reroute();
    }

    pub fn fleet(&self) -> Option<Arc<crate::fleet::Fleet>> {
        self.fleet.get().cloned()
    }

    pub(crate) fn set_fleet(&self, fleet: Arc<crate::fleet::Fleet>) {
        let _ = self.fleet.set(fleet);
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn listen_addr(&self) -> Option<SocketAddr> {
        *self.listen_addr.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn config_path(&self) -> Option<PathBuf> {
        self.config_path.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_config_path(&self, path: &Path) {
        *self.config_path.lock().unwrap_or_else(|p| p.into_inner()) = Some(path.to_owned());
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Reads the configuration file again and applies what can change at run time:
    /// users, backends (new connections use the new settings), client TLS, limits
    /// and timeouts. An invalid file changes nothing. The listen address and socket
    /// directory need a restart; the active backend is run-time state and stays.
    pub async fn reload(&self) -> anyhow::Result<PathBuf> {
        let path = self.config_path.lock().unwrap_or_else(|p| p.into_inner()).clone().context("this proxy was not started from a configuration file")?;
        let config = Config::load(&path)?;
        let current = self.config();
        if config.proxy.listen != current.proxy.listen || config.proxy.socket_dir != current.proxy.socket_dir {
            tracing::warn!("listen and socket_dir changes take effect at the next restart");
        }
        let active = self.active_backend().name.clone();
        let backends = build_backends(&config)?;
        if !backends.contains_key(&active) {
            anyhow::bail!("the active backend {active:?} is missing from the new file");
        }
        let tls = build_tls(&config)?;
        let auth = config.auth.clone();
        // Deriving SCRAM verifiers stretches keys: off the I/O threads.
        let users = tokio::task::spawn_blocking(move || Users::from_config(&auth)).await?;

        let max = config.proxy.max_client_connections;
        let before = self.max_clients.swap(max, Ordering::SeqCst);
        if max > before {
            self.client_slots.add_permits(max - before);
        } else {
            self.client_slots.forget_permits(before - max);
        }
        self.users.store(Arc::new(users));
        self.client_tls.store(tls);
        // The active backend keeps its name, whatever a cutover did meanwhile: the
        // swap reads the current one, never one read before the file was parsed.
        let backends = Arc::new(backends);
        self.active.rcu(|current| backends.get(&current.name).cloned().unwrap_or_else(|| current.clone()));
        self.backends.store(backends);
        self.config.store(Arc::new(config));
        tracing::info!(file = %path.display(), "configuration reloaded");
        Ok(path)
    }

    /// Ends every session at its next idle point (its open transaction may
    /// finish); after `grace`, ends the rest.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutting_down.store(true, Ordering::SeqCst);
        // A cutover that has not reached its repoint rolls back first: the source
        // must not stay fenced behind a proxy that exits.
        self.cutover.stop(self.config().cutover.max_pause + Duration::from_secs(20)).await;
        for s in self.sessions.list() {
            s.control(crate::session::registry::Control::Shutdown);
        }
        let deadline = Instant::now() + grace;
        while !self.sessions.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.sessions.list();
        if !left.is_empty() {
            tracing::warn!(sessions = left.len(), ?grace, "shutdown grace over: closing the remaining sessions");
            for s in &left {
                s.control(crate::session::registry::Control::Kill);
            }
            let deadline = Instant::now() + Duration::from_secs(2);
            while !self.sessions.is_empty() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Forwards a client's CancelRequest to wherever its session runs now. A key
    /// that matches no session cancels nothing, silently, as in PostgreSQL.
    ///
    /// In a fleet, a load balancer may bring the request to another instance than
    /// the session's: a key minted by another member (its tag is in the pid's top
    /// bits) is passed on to that member, once; it checks the key as its own.
    ///
    /// A request held at the closed gate has not reached any backend: the session
    /// answers it as cancelled itself. Returns once the cancel was delivered.
    pub async fn cancel(&self, key: CancelKey) {
        if let Some(session) = self.sessions.lookup_cancel(key) {
            if session.held_since().is_some() {
                let (tx, rx) = tokio::sync::oneshot::channel();
                // Cancellation safety: if the session ends or lets the request go
                // meanwhile, the reply says so (or never comes) and the cancel goes
                // to the backend, where the request now runs.
                if session.control(crate::session::registry::Control::CancelHeld(tx))
                    && matches!(tokio::time::timeout(Duration::from_secs(2), rx).await, Ok(Ok(true)))
                {
                    return;
                }
            }
            let link = session.backend();
            return link.target.cancel(link.key).await;
        }
        if let Some(owner) = self.fleet().and_then(|f| f.owner_of(key.pid)) {
            tracing::info!(pid = key.pid, %owner, "cancel request for a session of another member: passed on");
            let bytes = crate::protocol::startup::encode_cancel(key);
            let send = async {
                use tokio::io::AsyncWriteExt;
                let mut s = tokio::net::TcpStream::connect(&owner).await?;
                s.write_all(&bytes).await?;
                s.shutdown().await
            };
            if let Err(e) = tokio::time::timeout(Duration::from_secs(2), send).await.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())) {
                tracing::warn!(%owner, error = %e, "could not pass a cancel request on to its member");
            }
            return;
        }
        tracing::info!(pid = key.pid, "cancel request with an unknown key ignored");
    }
}

/// A started proxy: where it listens, and how to stop it.
pub struct ProxyHandle {
    pub proxy: Arc<Proxy>,
    pub tcp_addr: SocketAddr,
    /// Where `/metrics` is served, if it is.
    pub metrics_addr: Option<SocketAddr>,
    pub socket_path: Option<PathBuf>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl ProxyHandle {
    /// Stops accepting connections (sessions already running go on).
    pub async fn stop_accepting(&mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
        if let Some(path) = &self.socket_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The admin console on the Unix socket asks for no password: whoever can reach
/// the socket is trusted. So its directory must be this user's own, and no symbolic
/// link someone planted; it is not taken over by a chmod.
fn own_directory(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir).with_context(|| format!("cannot inspect {}", dir.display()))?;
    if meta.file_type().is_symlink() {
        anyhow::bail!("socket_dir {} is a symbolic link: the admin console needs a directory of its own", dir.display());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        anyhow::bail!(
            "socket_dir {} belongs to uid {}, not to this process (uid {me}): the admin console would be reachable through it; remove it or choose another directory",
            dir.display(),
            meta.uid()
        );
    }
    Ok(())
}

/// Binds the listeners and starts accepting.
pub async fn start(config: Config) -> anyhow::Result<ProxyHandle> {
    let listen = config.proxy.listen;
    let threads = config.proxy.threads;
    let proxy = Arc::new(Proxy::new(config)?);
    let _ = proxy.shards.set(crate::shards::Shards::start(threads).context("cannot start the event loops")?);
    let _ = proxy.control.set(tokio::runtime::Handle::current());
    let tcp = TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let tcp_addr = tcp.local_addr()?;
    *proxy.listen_addr.lock().unwrap_or_else(|p| p.into_inner()) = Some(tcp_addr);
    let (shutdown, rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tasks.spawn(crate::client::listener::accept_tcp(proxy.clone(), tcp, rx.clone()));

    let socket_path = proxy.config().socket_path(tcp_addr.port());
    if let Some(path) = &socket_path {
        let dir = path.parent().context("socket path has no directory")?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        own_directory(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict {}", dir.display()))?;
        // A socket file left by a previous run that crashed would block the bind.
        if path.exists() {
            std::fs::remove_file(path).with_context(|| format!("cannot remove stale {}", path.display()))?;
        }
        let unix = UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
        tasks.spawn(crate::client::listener::accept_unix(proxy.clone(), unix, rx.clone()));
    }
    let mut metrics_addr = None;
    if let Some(addr) = proxy.config().proxy.metrics_listen {
        let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} for metrics"))?;
        metrics_addr = Some(listener.local_addr()?);
        if let Some(metrics) = metrics_addr {
            tracing::info!(%metrics, "serving /metrics");
        }
        tasks.spawn(crate::metrics::serve(proxy.clone(), listener, rx.clone()));
    }
    let socket = socket_path.as_ref().map_or_else(|| "none".to_string(), |p| p.display().to_string());
    tracing::info!(%tcp_addr, %socket, active = %proxy.active_backend().name, "pgcutover listening");
    Ok(ProxyHandle { proxy, tcp_addr, metrics_addr, socket_path, shutdown, tasks })
}
