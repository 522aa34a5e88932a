//! The local ports of the proxy's own backend connections, in every state — logging
//! in, serving, and closing until the server has gone — so that preflight never
//! mistakes one of them for a session that bypasses the proxy.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static PORTS: Mutex<BTreeMap<u16, usize>> = Mutex::new(BTreeMap::new());
/// Ports given up lately, and when: a look at pg_stat_activity that began before a
/// connection closed may still show it.
static RELEASED: Mutex<VecDeque<(Instant, u16)>> = Mutex::new(VecDeque::new());
const KEEP_RELEASED: Duration = Duration::from_secs(30);

/// Holds a local port in the set until dropped.
#[derive(Debug)]
pub struct PortGuard(Option<u16>);

impl PortGuard {
    pub fn hold(port: Option<u16>) -> PortGuard {
        if let Some(p) = port {
            *PORTS.lock().unwrap_or_else(|e| e.into_inner()).entry(p).or_default() += 1;
        }
        PortGuard(port)
    }

    /// For a connection that is no TCP connection (Unix socket).
    pub fn none() -> PortGuard {
        PortGuard(None)
    }
}

impl Drop for PortGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            let mut ports = PORTS.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = ports.get_mut(&p) {
                *n -= 1;
                if *n == 0 {
                    ports.remove(&p);
                }
            }
            drop(ports);
            let now = Instant::now();
            let mut released = RELEASED.lock().unwrap_or_else(|e| e.into_inner());
            while released.front().is_some_and(|(t, _)| now.duration_since(*t) > KEEP_RELEASED) {
                released.pop_front();
            }
            released.push_back((now, p));
        }
    }
}

/// Every local port the proxy's backend connections used at any time since
/// `since`: take `since` before a query of pg_stat_activity and call this after it,
/// and every connection of ours the query can have seen is in the answer (a port is
/// held before its server process exists and released only once it has gone).
pub fn ours_since(since: Instant) -> Vec<i32> {
    let mut all: Vec<i32> = PORTS.lock().unwrap_or_else(|e| e.into_inner()).keys().map(|p| i32::from(*p)).collect();
    let released = RELEASED.lock().unwrap_or_else(|e| e.into_inner());
    all.extend(released.iter().filter(|(t, _)| *t >= since).map(|(_, p)| i32::from(*p)));
    all
}
