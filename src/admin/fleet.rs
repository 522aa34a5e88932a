//! SHOW FLEET: the members of this instance's fleet, as etcd lists them.

use std::sync::Arc;

use super::ResultSet;
use crate::server::Proxy;

pub fn show(proxy: &Arc<Proxy>) -> ResultSet {
    let mut rs = ResultSet::new(&["name", "address", "admin_socket", "version", "active", "sessions", "started_at", "this"]);
    let Some(fleet) = proxy.fleet() else { return rs };
    for m in fleet.view().members.values() {
        rs.row(vec![
            Some(m.name.clone()),
            Some(m.address.clone()),
            m.admin_socket.clone(),
            Some(m.version.clone()),
            Some(m.active.clone()),
            Some(m.sessions.to_string()),
            Some(m.started_at.clone()),
            Some((m.name == fleet.name).to_string()),
        ]);
    }
    rs
}
