//! SHOW BACKENDS: the configured backends, which one is active, who uses each.

use std::collections::HashMap;
use std::sync::Arc;

use super::ResultSet;
use crate::server::Proxy;

pub fn show(proxy: &Arc<Proxy>) -> ResultSet {
    let config = proxy.config();
    let active = proxy.active_backend().name.clone();
    let mut used: HashMap<String, usize> = HashMap::new();
    for s in proxy.sessions.list() {
        *used.entry(s.backend().target.name.clone()).or_default() += 1;
    }
    let mut rs = ResultSet::new(&["name", "host", "port", "tls", "role", "sessions"]);
    for (name, b) in &config.backends {
        let role = if *name == active {
            "active"
        } else if config.cutover.target.as_deref() == Some(name) {
            "target"
        } else {
            ""
        };
        rs.row(vec![
            Some(name.clone()),
            Some(b.host.clone()),
            Some(b.port.to_string()),
            Some(format!("{:?}", b.tls).to_lowercase()),
            Some(role.to_string()),
            Some(used.get(name).copied().unwrap_or(0).to_string()),
        ]);
    }
    rs
}
