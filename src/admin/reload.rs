//! RELOAD: read proxy.toml again (as SIGHUP does).

use std::sync::Arc;

use super::ResultSet;
use crate::protocol::{sqlstate, PgError};
use crate::server::Proxy;

pub async fn reload(proxy: &Arc<Proxy>) -> Result<ResultSet, PgError> {
    match proxy.reload().await {
        Ok(path) => {
            let mut rs = ResultSet::new(&["status", "file"]);
            rs.row(vec![Some("reloaded".into()), Some(path.display().to_string())]);
            Ok(rs.tag("RELOAD"))
        }
        Err(e) => Err(PgError::error(sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE, format!("reload failed, the running configuration stays: {e:#}"))),
    }
}
