//! `pgcutover serve` as a child process, for the tests that need the real binary
//! (signals, the CLI, restarts).

use std::path::PathBuf;
use std::process::Stdio;

use super::fixture;

/// `pgcutover serve` as a child process, on a file of its own.
pub struct Served {
    pub child: tokio::process::Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl Served {
    pub async fn start(edit: impl FnOnce(String) -> String) -> Served {
        Served::start_env(edit, &[]).await
    }

    /// As `start`, with extra environment variables for the process.
    pub async fn start_env(edit: impl FnOnce(String) -> String, env: &[(&str, &str)]) -> Served {
        let f = fixture();
        let dir = tempfile::Builder::new().prefix("pgcutover-served-").tempdir().unwrap();
        let port = pgcutover::cluster::free_port().unwrap();
        let text = edit(f.config_text(&dir.path().join("sock"), &format!("127.0.0.1:{port}")));
        std::fs::write(dir.path().join("proxy.toml"), text).unwrap();
        Served::run_env(dir, port, env).await
    }

    /// Starts the binary on a configuration of the test's own, written for its
    /// socket directory and listen address.
    pub async fn start_text(text: impl FnOnce(&std::path::Path, &str) -> String, env: &[(&str, &str)]) -> Served {
        let dir = tempfile::Builder::new().prefix("pgcutover-served-").tempdir().unwrap();
        let port = pgcutover::cluster::free_port().unwrap();
        std::fs::write(dir.path().join("proxy.toml"), text(&dir.path().join("sock"), &format!("127.0.0.1:{port}"))).unwrap();
        Served::run_env(dir, port, env).await
    }

    /// Starts the binary on the file already in `dir`.
    pub async fn run(dir: tempfile::TempDir, port: u16) -> Served {
        Served::run_env(dir, port, &[]).await
    }

    pub async fn run_env(dir: tempfile::TempDir, port: u16, env: &[(&str, &str)]) -> Served {
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgcutover"))
            .envs(env.iter().copied())
            .args(["serve", "--config"])
            .arg(dir.path().join("proxy.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(dir.path().join("log")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let served = Served { child, dir, port };
        assert!(super::eventually(10, || async { tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() }).await, "serve did not start: {}", served.log());
        served
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("proxy.toml")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        let pid = self.child.id().unwrap() as i32;
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    pub async fn connect(&self, user: &str, password: &str, db: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (c, conn) = tokio_postgres::connect(&format!("host=127.0.0.1 port={} user={user} password='{password}' dbname={db}", self.port), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(c)
    }

    pub async fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgcutover")).args(args).arg("--config").arg(self.config_path()).output().await.unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    pub async fn psql_console(&self, commands: &[&str]) -> (bool, String, String) {
        let mut args: Vec<String> = vec!["-X".into(), "-h".into(), self.socket_dir().display().to_string(), "-p".into(), self.port.to_string(), "-d".into(), "pgcutover".into()];
        for c in commands {
            args.push("-c".into());
            args.push(c.to_string());
        }
        let out = tokio::process::Command::new(super::pg_program("psql")).args(&args).output().await.unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// Waits for the process to end on its own (it crashed, say) and gives back its
    /// directory, to start again.
    pub async fn exited(mut self) -> (tempfile::TempDir, u16) {
        let status = tokio::time::timeout(std::time::Duration::from_secs(30), self.child.wait()).await;
        assert!(matches!(status, Ok(Ok(_))), "the process did not end: {}", self.log());
        (self.dir, self.port)
    }

    /// Stops the process (SIGTERM) and gives back its directory, to start again.
    pub async fn stop(mut self) -> (tempfile::TempDir, u16) {
        self.signal(libc::SIGTERM);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), self.child.wait()).await;
        (self.dir, self.port)
    }
}
