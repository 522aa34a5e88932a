//! SHOW STATUS: the proxy at a glance.

use std::sync::Arc;

use super::ResultSet;
use crate::server::Proxy;

pub fn show(proxy: &Arc<Proxy>) -> ResultSet {
    let config = proxy.config();
    let gate = proxy.gate();
    let paused_for = gate.paused_for();
    let mut rows = vec![
        ("version", env!("CARGO_PKG_VERSION").to_string()),
        ("uptime_s", proxy.uptime().as_secs().to_string()),
        ("active_backend", proxy.active_backend().name.clone()),
        ("target_backend", config.cutover.target.clone().unwrap_or_default()),
        ("paused", paused_for.is_some().to_string()),
        ("paused_for_ms", paused_for.map(|d| d.as_millis().to_string()).unwrap_or_default()),
        ("held_sessions", gate.held_now().to_string()),
        ("sessions", proxy.sessions.len().to_string()),
        ("max_client_connections", config.proxy.max_client_connections.to_string()),
        ("listen", proxy.listen_addr().map(|a| a.to_string()).unwrap_or_default()),
        ("shutting_down", proxy.is_shutting_down().to_string()),
    ];
    if let Some(fleet) = proxy.fleet() {
        let view = fleet.view();
        rows.push(("fleet_member", fleet.name.clone()));
        rows.push(("fleet_etcd", if view.connected { "connected" } else { "unreachable" }.to_string()));
        rows.push(("fleet_active", view.active.clone().unwrap_or_default()));
        rows.push(("fleet_members", serde_json::to_string(&view.members.values().collect::<Vec<_>>()).unwrap_or_default()));
    }
    ResultSet::key_values(rows)
}
