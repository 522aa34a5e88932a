//! SHOW SESSIONS: one row per client session.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use super::ResultSet;
use crate::server::Proxy;

fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

pub fn show(proxy: &Arc<Proxy>) -> ResultSet {
    let mut rs = ResultSet::new(&[
        "id", "user", "database", "application_name", "client_addr", "state", "backend", "connected_at", "held_since", "bytes_in", "bytes_out",
    ]);
    for s in proxy.sessions.list() {
        let state = if s.held_since().is_some() {
            "held".to_string()
        } else if s.running() {
            "active".to_string()
        } else {
            s.tx_state().as_str().to_string()
        };
        rs.row(vec![
            Some(s.id.to_string()),
            Some(s.user.clone()),
            Some(s.database.clone()),
            Some(s.application_name.clone()),
            Some(s.client_addr.clone()),
            Some(state),
            Some(s.backend().target.name.clone()),
            Some(timestamp(s.connected_at)),
            s.held_since().map(timestamp),
            Some(s.bytes_in.load(Ordering::Relaxed).to_string()),
            Some(s.bytes_out.load(Ordering::Relaxed).to_string()),
        ]);
    }
    rs
}
