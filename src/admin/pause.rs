//! PAUSE [duration] and RESUME.

use std::sync::Arc;

use super::ResultSet;
use crate::gate::{self, PauseError};
use crate::protocol::{sqlstate, PgError};
use crate::server::Proxy;

fn refused(e: PauseError) -> PgError {
    PgError::error(sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE, e.to_string())
}

pub async fn pause(proxy: &Arc<Proxy>, timeout: Option<std::time::Duration>) -> Result<ResultSet, PgError> {
    let on_timeout = proxy.config().cutover.on_drain_timeout;
    let report = gate::pause(proxy, timeout, on_timeout).await.map_err(refused)?;
    let mut rs = ResultSet::new(&["status", "drain_ms", "waited_for", "cancelled"]);
    rs.row(vec![
        Some("paused".into()),
        Some(format!("{:.3}", report.drain.as_secs_f64() * 1000.0)),
        Some(report.waited_for.to_string()),
        Some(report.cancelled.len().to_string()),
    ]);
    Ok(rs.tag("PAUSE"))
}

pub fn resume(proxy: &Arc<Proxy>) -> Result<ResultSet, PgError> {
    let paused = proxy.gate().resume().map_err(refused)?;
    tracing::info!(?paused, "resumed");
    let mut rs = ResultSet::new(&["status", "paused_ms"]);
    rs.row(vec![Some("resumed".into()), Some(format!("{:.3}", paused.as_secs_f64() * 1000.0))]);
    Ok(rs.tag("RESUME"))
}
