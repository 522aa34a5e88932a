//! SHOW STATS: pauses, drains and held requests, with latency percentiles.

use std::sync::Arc;

use hdrhistogram::Histogram;

use super::ResultSet;
use crate::server::Proxy;

fn ms(h: &Histogram<u64>, q: f64) -> String {
    if h.is_empty() {
        String::new()
    } else {
        format!("{:.3}", h.value_at_quantile(q) as f64 / 1000.0)
    }
}

fn max_ms(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        String::new()
    } else {
        format!("{:.3}", h.max() as f64 / 1000.0)
    }
}

pub fn show(proxy: &Arc<Proxy>) -> ResultSet {
    let s = proxy.gate().stats();
    let mut pairs: Vec<(String, String)> = vec![
        ("pauses".into(), s.pauses.to_string()),
        ("max_pause_expired".into(), s.max_pause_expired.to_string()),
        ("drain_timeouts".into(), s.drain_timeouts.to_string()),
        ("cancelled_for_pause".into(), s.cancelled_for_pause.to_string()),
        ("held_requests".into(), s.held_requests.to_string()),
        ("sessions".into(), proxy.sessions.len().to_string()),
        ("express_sessions".into(), proxy.shards().map_or(0, |s| s.express()).to_string()),
    ];
    for (name, h) in [("pause", &s.pause_us), ("drain", &s.drain_us), ("hold", &s.hold_us)] {
        pairs.push((format!("{name}_ms_p50"), ms(h, 0.5)));
        pairs.push((format!("{name}_ms_p90"), ms(h, 0.9)));
        pairs.push((format!("{name}_ms_p99"), ms(h, 0.99)));
        pairs.push((format!("{name}_ms_max"), max_ms(h)));
    }
    ResultSet::key_values(pairs)
}
