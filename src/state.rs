//! Where the active backend is recorded, so that a restart after a cutover comes up
//! on the new database: a one-line file holding the backend's name, replaced
//! atomically (written aside, then renamed).

use std::path::{Path, PathBuf};

/// The state file for a configuration: `[cutover] state_file`, or the configuration
/// file's path with `.state` appended.
pub fn path(config: &crate::config::Config, config_path: Option<&Path>) -> Option<PathBuf> {
    config.cutover.state_file.clone().or_else(|| config_path.map(|p| {
        let mut s = p.as_os_str().to_owned();
        s.push(".state");
        PathBuf::from(s)
    }))
}

pub fn load(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let name = text.trim();
    (!name.is_empty()).then(|| name.to_string())
}

pub fn save(path: &Path, backend: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("state.tmp");
    std::fs::write(&tmp, format!("{backend}\n"))?;
    std::fs::rename(&tmp, path)
}
