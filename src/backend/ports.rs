//! The local ports of the proxy's own backend connections, in every state — logging
//! in, serving, and closing until the server has gone — so that preflight never
//! mistakes one of them for a session that bypasses the proxy.

use std::collections::BTreeMap;
use std::sync::Mutex;

static PORTS: Mutex<BTreeMap<u16, usize>> = Mutex::new(BTreeMap::new());

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
        }
    }
}

/// Every local port the proxy's backend connections use now.
pub fn ours() -> Vec<i32> {
    PORTS.lock().unwrap_or_else(|e| e.into_inner()).keys().map(|p| i32::from(*p)).collect()
}
