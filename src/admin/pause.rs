//! PAUSE [duration] and RESUME.

use std::sync::Arc;

use super::ResultSet;
use crate::gate::{self, PauseError};
use crate::protocol::{sqlstate, PgError};
use crate::server::Proxy;

fn refused(e: PauseError) -> PgError {
    PgError::error(sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE, e.to_string())
}

/// PAUSE waits for the drain up to its duration, or `drain_timeout` without one
/// (then `on_drain_timeout` applies); the gate reopens by itself at `max_pause`,
/// and the answer says when.
pub async fn pause(proxy: &Arc<Proxy>, timeout: Option<std::time::Duration>) -> Result<ResultSet, PgError> {
    let config = proxy.config();
    let bound = timeout.unwrap_or(config.cutover.drain_timeout);
    let reopens = std::time::SystemTime::now() + config.cutover.max_pause;
    let report = gate::pause(proxy, Some(bound), config.cutover.on_drain_timeout).await.map_err(refused)?;
    let mut rs = ResultSet::new(&["status", "drain_ms", "waited_for", "cancelled", "reopens_by_itself_at"]);
    rs.row(vec![
        Some("paused".into()),
        Some(format!("{:.3}", report.drain.as_secs_f64() * 1000.0)),
        Some(report.waited_for.to_string()),
        Some(report.cancelled.len().to_string()),
        Some(humantime::format_rfc3339_millis(reopens).to_string()),
    ]);
    Ok(rs.tag("PAUSE"))
}

/// RESUME opens the gate; after a pause that already ended by itself at
/// max_pause, it changes nothing and says so.
pub fn resume(proxy: &Arc<Proxy>) -> Result<ResultSet, PgError> {
    let mut rs = ResultSet::new(&["status", "paused_ms", "note"]);
    match proxy.gate().resume() {
        Ok(paused) => {
            tracing::info!(paused_ms = paused.as_secs_f64() * 1000.0, "resumed");
            rs.row(vec![Some("resumed".into()), Some(format!("{:.3}", paused.as_secs_f64() * 1000.0)), Some(String::new())]);
        }
        Err(PauseError::NotPaused) if proxy.gate().reopened_by_itself().is_some() => {
            let at = proxy.gate().reopened_by_itself().map(|t| humantime::format_rfc3339_millis(t).to_string()).unwrap_or_default();
            let max_pause = humantime::format_duration(proxy.config().cutover.max_pause);
            rs.row(vec![Some("already open".into()), None, Some(format!("the pause reached max_pause ({max_pause}) and the gate reopened by itself at {at}; nothing to resume"))]);
        }
        Err(e) => return Err(refused(e)),
    }
    Ok(rs.tag("RESUME"))
}
