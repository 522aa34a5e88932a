//! How the cutover talks to sessions: a request that carries its reply, sent
//! through each session's control channel, and the answers collected with a
//! deadline. No shared tally, no polling.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::oneshot;

use crate::backend::BackendTarget;
use crate::session::registry::{Control, Moved, Prewarmed, SessionInfo};

/// How many logins (and the state copies they start) run at once while
/// prewarming: two per core. Prewarm is before the pause, so its length costs
/// nothing, but a login storm (SCRAM on both sides, a fork per backend) takes the
/// cores from the application's running transactions.
fn prewarm_concurrency() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) * 2
}

pub struct Prewarm {
    /// Sessions whose state is on their prepared connection.
    pub copied: usize,
    /// Sessions that could not log in on the target.
    pub failures: Vec<String>,
}

/// Opens a target connection for every session and asks each session to copy its
/// state onto it (idle sessions at once, busy ones at their next idle point).
/// Waits for the answers until `bound` after the last login; a session that has
/// not answered by then copies its state when it moves.
pub async fn prewarm(sessions: &[Arc<SessionInfo>], target: &Arc<BackendTarget>, bound: Duration) -> Prewarm {
    let mut failures = Vec::new();
    let mut answers = FuturesUnordered::new();
    let mut logins = futures::stream::iter(sessions.iter().cloned())
        .map(|s| {
            let target = target.clone();
            async move {
                let conn = target.connect(&s.startup_params.to_vec(), &s.creds).await;
                (s, target, conn)
            }
        })
        .buffer_unordered(prewarm_concurrency());
    while let Some((s, target, conn)) = logins.next().await {
        match conn {
            Ok(conn) => {
                let (tx, rx) = oneshot::channel();
                if s.control(Control::Prepare(Box::new(Prewarmed { target, conn, copied_at: None, copied: None, listen_later: None }), tx)) {
                    answers.push(rx);
                }
            }
            Err(e) => failures.push(format!("session {} ({}@{}): {e}", s.id, s.user, s.database)),
        }
    }
    let mut copied = 0;
    let _ = tokio::time::timeout(bound, async {
        while let Some(answer) = answers.next().await {
            match answer {
                Ok(Ok(())) => copied += 1,
                Ok(Err(why)) => tracing::info!(%why, "a session's state cannot move; it will be closed if the cutover commits"),
                Err(_) => {}
            }
        }
    })
    .await;
    Prewarm { copied, failures }
}

pub struct Moves {
    pub moved: usize,
    pub closed: Vec<String>,
    /// Sessions that had not answered by the deadline (they move at their next
    /// request all the same).
    pub pending: usize,
}

/// Asks every session to be on the active backend, and collects the answers until
/// `bound`.
pub async fn migrate(sessions: &[Arc<SessionInfo>], bound: Duration) -> Moves {
    let mut answers = FuturesUnordered::new();
    for s in sessions {
        let (tx, rx) = oneshot::channel();
        if s.control(Control::Migrate(tx)) {
            let id = s.id;
            answers.push(async move { (id, rx.await) });
        }
    }
    let mut moves = Moves { moved: 0, closed: Vec::new(), pending: answers.len() };
    let _ = tokio::time::timeout(bound, async {
        while let Some((id, answer)) = answers.next().await {
            moves.pending -= 1;
            match answer {
                Ok(Moved::Moved) => moves.moved += 1,
                Ok(Moved::Closed(why)) => moves.closed.push(format!("session {id}: {why}")),
                // The session ended (its client left) before it moved.
                Err(_) => {}
            }
        }
    })
    .await;
    moves
}

/// The cutover rolled back: every session closes its prepared connection.
pub fn discard(sessions: &[Arc<SessionInfo>]) {
    for s in sessions {
        s.control(Control::Discard);
    }
}
