//! A session's control channel, cheap to watch.
//!
//! The relay's task wakes for every frame a client or its backend sends, and a
//! control request comes a few times in a session's life. Polling a channel on
//! every wakeup cost about a tenth of the relay's own CPU (its queue and waker live
//! on cache lines nothing else touches). Here a sender rings a bell after queueing
//! its request; the session looks at the queue only when the bell rang (one relaxed
//! load otherwise), and registers its waker with the bell only when it rang or the
//! waker changed. The bell lives in the session's [`SessionInfo`], whose line the
//! relay touches at every request anyway.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures::task::AtomicWaker;
use tokio::sync::mpsc;

use super::registry::{Control, SessionInfo};

/// Rung after a request was queued.
#[derive(Default)]
pub struct Bell {
    rung: AtomicBool,
    waker: AtomicWaker,
}

/// The control plane's end (kept in the session's [`SessionInfo`], with the bell).
pub struct Outbox {
    tx: mpsc::UnboundedSender<Control>,
}

/// The session's end.
pub struct Inbox {
    rx: mpsc::UnboundedReceiver<Control>,
    info: Arc<SessionInfo>,
    /// The waker last registered with the bell.
    registered: Option<Waker>,
}

pub fn channel() -> (Outbox, mpsc::UnboundedReceiver<Control>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Outbox { tx }, rx)
}

impl Outbox {
    /// Queues `c` for the session and rings `bell`; false if the session has ended.
    pub fn send(&self, bell: &Bell, c: Control) -> bool {
        if self.tx.send(c).is_err() {
            return false;
        }
        // INVARIANT: queued before the bell rings; the session registers its waker
        // before it clears the bell and looks at the queue (see `poll_recv`).
        bell.rung.store(true, Ordering::SeqCst);
        bell.waker.wake();
        true
    }
}

impl Inbox {
    pub fn new(rx: mpsc::UnboundedReceiver<Control>, info: Arc<SessionInfo>) -> Inbox {
        Inbox { rx, info, registered: None }
    }

    /// The next request, if one was queued. Pending registers the task to be woken
    /// by the next [`Outbox::send`]. Cancel-safe: a request leaves the queue only
    /// in a Ready.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Control>> {
        let bell = &self.info.bell;
        let fresh = !self.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if !fresh && !bell.rung.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        if fresh {
            self.registered = Some(cx.waker().clone());
        }
        // Registered, then cleared, then looked: a request queued after the look
        // rings again and finds the waker; one queued before it is found now.
        bell.waker.register(cx.waker());
        bell.rung.swap(false, Ordering::SeqCst);
        match self.rx.try_recv() {
            Ok(c) => {
                // More may be queued: look again at the next poll.
                bell.rung.store(true, Ordering::Relaxed);
                Poll::Ready(Some(c))
            }
            Err(mpsc::error::TryRecvError::Empty) => Poll::Pending,
            Err(mpsc::error::TryRecvError::Disconnected) => Poll::Ready(None),
        }
    }

    pub async fn recv(&mut self) -> Option<Control> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request sent arrives, in order, however sends and polls interleave,
    /// and a send wakes a session that waits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_request_arrives_and_a_send_wakes_the_session() {
        let (guard, mut inbox, _, _) = crate::session::fuzzing::lone_session().unwrap();
        let info = guard.info.clone();
        let sender = tokio::spawn(async move {
            for i in 0..20_000u32 {
                assert!(info.control(Control::Discard));
                if i % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            info
        });
        let mut got = 0;
        while got < 20_000 {
            match tokio::time::timeout(std::time::Duration::from_secs(10), inbox.recv()).await {
                Ok(Some(Control::Discard)) => got += 1,
                other => panic!("after {got} requests: {:?}", other.map(|c| c.map(|_| ()))),
            }
        }
        let info = sender.await.unwrap();
        drop(inbox);
        assert!(!info.control(Control::Discard), "a send to an ended session reports it");
        drop(guard);
    }
}
