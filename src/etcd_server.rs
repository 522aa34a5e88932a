//! A throwaway local etcd for the tests, the benchmarks and the demo: Debian's
//! `etcd` on free ports in a temporary directory, stopped and removed at the end
//! (a watchdog sees to it if this process dies first), as [`crate::cluster`] does
//! for PostgreSQL.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub struct Etcd {
    /// `http://127.0.0.1:<port>`
    pub endpoint: String,
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    watchdog: Option<Child>,
}

fn program() -> anyhow::Result<PathBuf> {
    for p in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if std::path::Path::new(p).exists() {
            return Ok(p.into());
        }
    }
    bail!("etcd not found: install Debian's etcd-server package (the README's setup does)")
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub fn start() -> anyhow::Result<Etcd> {
        let program = program()?;
        // In memory where the machine has it: a throwaway store need not wait for a
        // disk's fsync at every write (a production etcd does, on its own disk).
        let shm = std::path::PathBuf::from("/dev/shm");
        let builder = tempfile::Builder::new().prefix("pgcutover-etcd-").tempdir_in(if shm.is_dir() { shm } else { std::env::temp_dir() });
        let dir = builder.or_else(|_| tempfile::Builder::new().prefix("pgcutover-etcd-").tempdir())?.keep();
        let port = crate::cluster::free_port()?;
        let peer = crate::cluster::free_port()?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.join("etcd.log"))?;
        let child = Command::new(program)
            .args(["--name", "pgcutover-test", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-cluster", &format!("pgcutover-test=http://127.0.0.1:{peer}")])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("cannot start etcd")?;
        let script = format!("while kill -0 {me} 2>/dev/null; do sleep 0.5; done; kill -9 {etcd} 2>/dev/null; rm -rf '{dir}'", me = std::process::id(), etcd = child.id(), dir = dir.display());
        let watchdog = Command::new("sh").args(["-c", &script]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).process_group(0).spawn().ok();
        let mut etcd = Etcd { endpoint, port, dir, child: Some(child), watchdog };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = etcd.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("etcd exited ({status}): {}", etcd.log());
            }
            if Instant::now() >= deadline {
                bail!("etcd did not listen within 20s: {}", etcd.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(etcd)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    /// Stops etcd (its data stays until the end).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}
