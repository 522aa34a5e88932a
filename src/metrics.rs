//! `/metrics` in the Prometheus text format: connections, traffic, pauses and
//! cutovers. Names follow pgbouncer_exporter where a counterpart exists, with the
//! prefix `pgcutover_`.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::server::Proxy;

/// Histogram bucket bounds, seconds.
const BUCKETS: [f64; 13] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP pgcutover_{name} {help}\n# TYPE pgcutover_{name} {kind}");
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram<u64>) {
    metric(out, name, "histogram", help);
    for le in BUCKETS {
        let count = h.count_between(0, (le * 1e6) as u64);
        let _ = writeln!(out, "pgcutover_{name}_bucket{{le=\"{le}\"}} {count}");
    }
    let _ = writeln!(out, "pgcutover_{name}_bucket{{le=\"+Inf\"}} {}", h.len());
    let _ = writeln!(out, "pgcutover_{name}_sum {}", h.mean() * h.len() as f64 / 1e6);
    let _ = writeln!(out, "pgcutover_{name}_count {}", h.len());
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The whole exposition.
pub fn render(proxy: &Proxy) -> String {
    let mut out = String::with_capacity(4096);
    let sessions = proxy.sessions.list();
    let (mut active, mut idle, mut in_tx, mut held) = (0, 0, 0, 0);
    let mut per_backend = std::collections::BTreeMap::<String, u64>::new();
    let ended = &proxy.sessions.ended;
    let mut bytes_in = ended.bytes_in.load(Ordering::Relaxed);
    let mut bytes_out = ended.bytes_out.load(Ordering::Relaxed);
    let mut queries = ended.queries.load(Ordering::Relaxed);
    let mut xacts = ended.xacts.load(Ordering::Relaxed);
    for s in &sessions {
        if s.held_since().is_some() {
            held += 1;
        } else if s.running() {
            active += 1;
        } else if s.tx_state() == crate::session::registry::TxState::Idle {
            idle += 1;
        } else {
            in_tx += 1;
        }
        *per_backend.entry(s.backend().target.name.clone()).or_default() += 1;
        bytes_in += s.bytes_in.load(Ordering::Relaxed);
        bytes_out += s.bytes_out.load(Ordering::Relaxed);
        queries += s.queries.load(Ordering::Relaxed);
        xacts += s.xacts.load(Ordering::Relaxed);
    }
    metric(&mut out, "up", "gauge", "1 while the proxy runs.");
    let _ = writeln!(out, "pgcutover_up 1");
    metric(&mut out, "client_connections", "gauge", "Client sessions by state.");
    for (state, n) in [("active", active), ("idle", idle), ("idle_in_transaction", in_tx), ("held", held)] {
        let _ = writeln!(out, "pgcutover_client_connections{{state=\"{state}\"}} {n}");
    }
    metric(&mut out, "express_sessions", "gauge", "Client sessions relaying on an express lane now (the rest are on tokio: holding, moving, TLS).");
    let _ = writeln!(out, "pgcutover_express_sessions {}", proxy.shards().map_or(0, |s| s.express()));
    metric(&mut out, "server_connections", "gauge", "Backend connections by backend (one per client session).");
    let config = proxy.config();
    for name in config.backends.keys() {
        let _ = writeln!(out, "pgcutover_server_connections{{backend=\"{}\"}} {}", label(name), per_backend.get(name).copied().unwrap_or(0));
    }
    metric(&mut out, "client_connections_total", "counter", "Client sessions started.");
    let _ = writeln!(out, "pgcutover_client_connections_total {}", proxy.sessions.started());
    metric(&mut out, "stats_totals_xact_count", "counter", "Transactions completed (a ReadyForQuery that left the session idle).");
    let _ = writeln!(out, "pgcutover_stats_totals_xact_count {xacts}");
    metric(&mut out, "stats_totals_query_count", "counter", "Queries completed (ReadyForQuery messages).");
    let _ = writeln!(out, "pgcutover_stats_totals_query_count {queries}");
    metric(&mut out, "stats_totals_received_bytes", "counter", "Bytes received from clients.");
    let _ = writeln!(out, "pgcutover_stats_totals_received_bytes {bytes_in}");
    metric(&mut out, "stats_totals_sent_bytes", "counter", "Bytes sent to clients.");
    let _ = writeln!(out, "pgcutover_stats_totals_sent_bytes {bytes_out}");

    let gate = proxy.gate();
    let stats = gate.stats();
    metric(&mut out, "paused", "gauge", "1 while the gate is closed.");
    let _ = writeln!(out, "pgcutover_paused {}", u8::from(gate.paused_for().is_some()));
    metric(&mut out, "pauses_total", "counter", "Pauses (PAUSE and cutovers).");
    let _ = writeln!(out, "pgcutover_pauses_total {}", stats.pauses);
    metric(&mut out, "max_pause_expired_total", "counter", "Pauses the gate ended by itself at max_pause.");
    let _ = writeln!(out, "pgcutover_max_pause_expired_total {}", stats.max_pause_expired);
    metric(&mut out, "drain_timeouts_total", "counter", "Drains that reached their deadline.");
    let _ = writeln!(out, "pgcutover_drain_timeouts_total {}", stats.drain_timeouts);
    metric(&mut out, "cancelled_for_pause_total", "counter", "Sessions whose work a drain deadline cancelled.");
    let _ = writeln!(out, "pgcutover_cancelled_for_pause_total {}", stats.cancelled_for_pause);
    metric(&mut out, "held_requests_total", "counter", "Requests held at the gate.");
    let _ = writeln!(out, "pgcutover_held_requests_total {}", stats.held_requests);
    histogram(&mut out, "pause_duration_seconds", "How long the gate stayed closed.", &stats.pause_us);
    histogram(&mut out, "drain_duration_seconds", "How long drains took.", &stats.drain_us);
    histogram(&mut out, "hold_duration_seconds", "How long requests were held.", &stats.hold_us);

    metric(&mut out, "cutovers_total", "counter", "Cutovers by outcome.");
    for (i, outcome) in ["committed", "rolled_back", "refused", "rehearsed"].iter().enumerate() {
        let _ = writeln!(out, "pgcutover_cutovers_total{{outcome=\"{outcome}\"}} {}", proxy.cutover.counts[i].load(Ordering::Relaxed));
    }
    metric(&mut out, "active_backend", "gauge", "1 for the backend that serves traffic.");
    let active_name = proxy.active_backend().name.clone();
    for name in config.backends.keys() {
        let _ = writeln!(out, "pgcutover_active_backend{{backend=\"{}\"}} {}", label(name), u8::from(*name == active_name));
    }
    metric(&mut out, "replication_lag_bytes", "gauge", "The target's replication lag per database, as last seen by a preflight.");
    for (db, lag) in proxy.cutover.lag.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(out, "pgcutover_replication_lag_bytes{{database=\"{}\"}} {lag}", label(db));
    }
    out
}

/// A minimal HTTP/1.1 endpoint: `GET /metrics`, anything else 404.
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (mut socket, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => continue,
            },
            _ = shutdown.changed() => return,
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let n = match tokio::time::timeout(std::time::Duration::from_secs(5), socket.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = if path == "/metrics" || path.starts_with("/metrics?") {
                ("200 OK", render(&proxy))
            } else {
                ("404 Not Found", "see /metrics\n".to_string())
            };
            let head = format!("HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(body.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}
