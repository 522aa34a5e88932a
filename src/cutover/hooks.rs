//! Fault injection for tests: a hook runs at every await point of the cutover that
//! leaves a side effect behind, and can fail the phase there, stall it, or end the
//! process as `kill -9` would.
//!
//! Tests of the library set a hook with [`super::Controller::set_hook`]; tests of the
//! binary set `PGCUTOVER_TEST_HOOK=<point>:<fail|stall|abort>` in its environment.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Every point a hook is called at, in the order a cutover reaches them.
pub const POINTS: &[&str] = &[
    "preflight",
    "prewarm",
    "pause",
    "fence.read_only",
    "fence.no_login",
    "fence.terminate",
    "drain",
    "fence.reload",
    "fence.reloaded",
    "catchup",
    "sequences",
    "repoint",
    "repointed",
];

pub type HookFuture = Pin<Box<dyn Future<Output = Result<(), ()>> + Send>>;
/// Called with the point's name; an `Err` fails the phase there.
pub type Hook = Arc<dyn Fn(&'static str) -> HookFuture + Send + Sync>;

/// The hook `PGCUTOVER_TEST_HOOK` asks for, if any.
pub fn from_env() -> Option<Hook> {
    let spec = std::env::var("PGCUTOVER_TEST_HOOK").ok()?;
    let (point, action) = spec.split_once(':')?;
    let point = POINTS.iter().find(|p| **p == point)?;
    let action = action.to_string();
    tracing::warn!(point, %action, "test hook armed");
    Some(Arc::new(move |at| {
        let hit = at == *point;
        let action = action.clone();
        Box::pin(async move {
            if !hit {
                return Ok(());
            }
            match action.as_str() {
                "fail" => Err(()),
                "stall" => std::future::pending().await,
                // As kill -9 would: no destructor, no flush, no rollback.
                "abort" => std::process::abort(),
                _ => Ok(()),
            }
        })
    }))
}

/// The hook of one cutover run, if a test armed one.
#[derive(Clone, Default)]
pub struct Hooks(pub Option<Hook>);

impl Hooks {
    /// Runs the hook at `point`; an injected fault fails the phase there.
    pub async fn at(&self, point: &'static str) -> Result<(), super::CutoverError> {
        match &self.0 {
            Some(hook) => hook(point).await.map_err(|()| super::CutoverError::Injected(point)),
            None => Ok(()),
        }
    }
}
