//! The journal of a cutover's side effects on databases.
//!
//! Every change the cutover makes to someone else's database (ALTER SYSTEM, ALTER
//! ROLE, the repoint and the subscription changes that follow it) is written here
//! and fsynced *before* it is made. Whatever ends the cutover — an error, a timeout,
//! a dropped future, SIGTERM, a crash — the journal says what to undo: a rollback
//! undoes what it holds, and a proxy that starts and finds an unfinished journal
//! finishes it before it serves (back, or forward if the repoint was recorded).
//!
//! One JSON object per line, next to the state file: `<state file>.journal`.
//! Without a state file (a proxy started without a configuration file) the journal
//! lives in memory only and protects everything but a crash.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entry {
    /// A cutover started. Its control connections carry `application_name`, so that
    /// a successor can end their orphaned statements before undoing anything.
    Begin { id: String, source: String, target: String, application_name: String },
    /// About to `ALTER SYSTEM SET default_transaction_read_only = on` on the source;
    /// `previous` is what postgresql.auto.conf held for it (None: nothing).
    ReadOnly { database: String, previous: Option<String> },
    /// About to take LOGIN from these roles on the source (each had it).
    NoLogin { database: String, roles: Vec<String> },
    /// About to `ALTER ROLE … IN DATABASE … SET default_transaction_read_only = on`
    /// on the source (the role-level fence, where ALTER SYSTEM is not allowed);
    /// each with what it held before.
    RoleReadOnly {
        database: String,
        settings: Vec<RoleSetting>,
    },
    /// About to reset the role-level read-only settings an earlier fence left on
    /// the target (a cutover back); each with what it held.
    TargetRoleWritable {
        database: String,
        settings: Vec<RoleSetting>,
    },
    /// About to `ALTER SYSTEM RESET default_transaction_read_only` on the target (a
    /// former source, fenced by an earlier cutover); `previous` is what
    /// postgresql.auto.conf held.
    TargetWritable { database: String, previous: String },
    /// About to give LOGIN back to these roles on the target (each lacked it).
    TargetLogin { database: String, roles: Vec<String> },
    /// About to create this publication on the target (the way back).
    ReversePublication { database: String, name: String },
    /// About to create this logical slot on the target (the way back).
    ReverseSlot { database: String, name: String },
    /// The point of no return: the active backend becomes `target`; after it, the
    /// target's subscriptions from the source are disabled (database, subscription)
    /// and the source subscribes to the target through each `reverse` slot.
    Repoint {
        target: String,
        subscriptions: Vec<(String, String)>,
        #[serde(default)]
        reverse: Vec<super::reverse::Reverse>,
    },
    /// The point of no return of a switchover, before `pg_promote()` on the target:
    /// after it the target becomes the primary, and `roles` (whose NOLOGIN the
    /// fence wrote on the source and replication carried there) get LOGIN back on it.
    Promote { target: String, roles: Vec<String> },
    /// This cutover leads a fleet: its decision is `cutovers/<id>/.decision` in
    /// etcd, and a restart reads it there (forward if it says commit, back if not).
    Fleet { id: String },
    /// The cutover ended, committed or rolled back, with nothing left to do.
    Finished { outcome: String },
}

/// A role's `default_transaction_read_only` in one database, as
/// `pg_db_role_setting` held it (None: not set there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleSetting {
    pub role: String,
    pub database: String,
    pub previous: Option<String>,
}

impl Entry {
    /// The database a step was made through, for the steps made in one.
    pub fn database(&self) -> Option<&str> {
        match self {
            Entry::ReadOnly { database, .. }
            | Entry::NoLogin { database, .. }
            | Entry::RoleReadOnly { database, .. }
            | Entry::TargetRoleWritable { database, .. }
            | Entry::TargetWritable { database, .. }
            | Entry::TargetLogin { database, .. }
            | Entry::ReversePublication { database, .. }
            | Entry::ReverseSlot { database, .. } => Some(database),
            Entry::Begin { .. } | Entry::Repoint { .. } | Entry::Promote { .. } | Entry::Fleet { .. } | Entry::Finished { .. } => None,
        }
    }
}

/// Where the journal of a configuration lives, if it has a state file.
pub fn path_for(state_file: &Path) -> PathBuf {
    let mut s = state_file.as_os_str().to_owned();
    s.push(".journal");
    PathBuf::from(s)
}

/// A second copy of the journal somewhere others can read it (a fleet's leader
/// keeps one in etcd, so that a surviving member can undo its fence).
pub type Mirror = Box<dyn Fn(Vec<Entry>) -> futures::future::BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

pub struct Journal {
    file: Option<(PathBuf, File)>,
    entries: Vec<Entry>,
    mirror: Option<Mirror>,
}

impl Journal {
    /// Starts a journal. An unfinished one in the same place refuses: it must be
    /// finished first (see [`unfinished`]).
    pub fn create(path: Option<PathBuf>, begin: Entry) -> std::io::Result<Journal> {
        let file = match path {
            Some(path) => {
                if let Some(entries) = unfinished(&path)? {
                    return Err(std::io::Error::other(format!("{} holds an unfinished cutover ({} entries): it is finished at the next start", path.display(), entries.len())));
                }
                let file = OpenOptions::new().create(true).write(true).truncate(true).open(&path)?;
                // The file's own name must survive a crash too.
                if let Some(dir) = path.parent() {
                    File::open(if dir.as_os_str().is_empty() { Path::new(".") } else { dir })?.sync_all()?;
                }
                Some((path, file))
            }
            None => None,
        };
        let mut journal = Journal { file, entries: Vec::new(), mirror: None };
        journal.write(begin)?;
        Ok(journal)
    }

    /// A journal that records nothing more (what is left of one that was finished
    /// or handed over).
    pub fn detached() -> Journal {
        Journal { file: None, entries: Vec::new(), mirror: None }
    }

    /// From now on every entry is also written to `mirror` before `record`
    /// returns; what is recorded so far is written there now.
    pub async fn mirror_to(&mut self, mirror: Mirror) -> std::io::Result<()> {
        mirror(self.entries.clone()).await.map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        self.mirror = Some(mirror);
        Ok(())
    }

    /// Writes `entry` durably (and to the mirror, if there is one); the side
    /// effect it announces may be made after this returns, not before.
    pub async fn record(&mut self, entry: Entry) -> std::io::Result<()> {
        self.write(entry)?;
        if let Some(mirror) = &self.mirror {
            mirror(self.entries.clone()).await.map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        }
        Ok(())
    }

    fn write(&mut self, entry: Entry) -> std::io::Result<()> {
        if let Some((_, file)) = &mut self.file {
            let mut line = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
            line.push(b'\n');
            file.write_all(&line)?;
            file.sync_data()?;
        }
        self.entries.push(entry);
        Ok(())
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The cutover is over and nothing is left to undo: the journal goes.
    pub fn finish(mut self, outcome: &str) -> std::io::Result<()> {
        self.write(Entry::Finished { outcome: outcome.into() })?;
        if let Some((path, _)) = self.file.take() {
            std::fs::remove_file(path)?;
        }
        Ok(())
    }
}

/// The entries of an unfinished journal at `path`, if there is one. A torn last
/// line (a crash while writing it) is ignored: its side effect was not made.
pub fn unfinished(path: &Path) -> std::io::Result<Option<Vec<Entry>>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut entries = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        match serde_json::from_str::<Entry>(&line?) {
            Ok(e) => entries.push(e),
            Err(_) => break,
        }
    }
    if entries.is_empty() || entries.iter().any(|e| matches!(e, Entry::Finished { .. })) {
        std::fs::remove_file(path)?;
        return Ok(None);
    }
    Ok(Some(entries))
}

/// Removes a journal whose every entry has been dealt with.
pub fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unfinished_journal_is_read_back_and_a_finished_one_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.state.journal");
        let begin = Entry::Begin { id: "1".into(), source: "blue".into(), target: "green".into(), application_name: "x".into() };
        let mut j = Journal::create(Some(path.clone()), begin.clone()).unwrap();
        j.write(Entry::ReadOnly { database: "postgres".into(), previous: None }).unwrap();
        // A torn line after a crash.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"no_login\":{\"datab").unwrap();
        let left = unfinished(&path).unwrap().unwrap();
        assert_eq!(left, vec![begin.clone(), Entry::ReadOnly { database: "postgres".into(), previous: None }]);
        assert!(Journal::create(Some(path.clone()), begin.clone()).is_err(), "an unfinished journal is never overwritten");
        remove(&path).unwrap();
        let j = Journal::create(Some(path.clone()), begin).unwrap();
        j.finish("committed").unwrap();
        assert!(!path.exists());
        assert!(unfinished(&path).unwrap().is_none());

    }
}
