//! A session's control mailbox, cheap to watch and to keep.
//!
//! The relay's task wakes for every frame a client or its backend sends, and a
//! control request comes a few times in a session's life. Polling a channel on
//! every wakeup cost about a tenth of the relay's own CPU (its queue and waker live
//! on cache lines nothing else touches), and a channel per session cost about
//! 1.3 KB before anything was sent. Here the mailbox lives in the session's
//! [`SessionInfo`]: a queue that allocates only when used, and a bell a sender
//! rings after queueing its request. The session looks at the queue only when the
//! bell rang (one relaxed load otherwise, on a line the relay touches at every
//! request anyway), and registers its waker only when it rang or the waker changed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use futures::task::AtomicWaker;

use super::registry::{Control, SessionInfo};

/// Requests for one session, and the bell that says some were queued.
#[derive(Default)]
pub struct Mailbox {
    rung: AtomicBool,
    waker: AtomicWaker,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Control>,
    /// The session has ended: nothing more is queued.
    closed: bool,
}

impl Mailbox {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `c` for the session and wakes it; false if the session has ended.
    pub fn send(&self, c: Control) -> bool {
        {
            let mut q = self.queue();
            if q.closed {
                return false;
            }
            q.items.push_back(c);
        }
        // INVARIANT: queued before the bell rings; the session registers its waker
        // before it clears the bell and looks at the queue (see `poll_recv`).
        self.rung.store(true, Ordering::SeqCst);
        self.waker.wake();
        true
    }
}

/// The session's end: its task reads the mailbox through this. Dropped when the
/// session ends, which closes the mailbox (queued requests are dropped, so whoever
/// waits for an answer hears that none will come).
pub struct Inbox {
    info: Arc<SessionInfo>,
    /// The waker last registered with the bell.
    registered: Option<Waker>,
}

impl Inbox {
    pub fn new(info: Arc<SessionInfo>) -> Inbox {
        Inbox { info, registered: None }
    }

    /// The next request, if one was queued. Pending registers the task to be woken
    /// by the next [`Mailbox::send`]. Cancel-safe: a request leaves the queue only
    /// in a Ready.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Control> {
        let mailbox = &self.info.mailbox;
        let fresh = !self.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if !fresh && !mailbox.rung.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        if fresh {
            self.registered = Some(cx.waker().clone());
        }
        // Registered, then cleared, then looked: a request queued after the look
        // rings again and finds the waker; one queued before it is found now.
        mailbox.waker.register(cx.waker());
        mailbox.rung.swap(false, Ordering::SeqCst);
        let mut q = mailbox.queue();
        match q.items.pop_front() {
            Some(c) => {
                if !q.items.is_empty() {
                    // More are queued: look again at the next poll.
                    mailbox.rung.store(true, Ordering::Relaxed);
                }
                Poll::Ready(c)
            }
            None => Poll::Pending,
        }
    }

    /// A request may be waiting (the bell rang and the session has not looked).
    pub fn rung(&self) -> bool {
        self.info.mailbox.rung.load(Ordering::Relaxed)
    }

    pub async fn recv(&mut self) -> Control {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        let mut q = self.info.mailbox.queue();
        q.closed = true;
        // Dropped outside the lock: a request may hold a connection to close.
        let items = std::mem::take(&mut q.items);
        drop(q);
        drop(items);
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
                Ok(Control::Discard) => got += 1,
                other => panic!("after {got} requests: {:?}", other.map(|_| ())),
            }
        }
        let info = sender.await.unwrap();
        drop(inbox);
        assert!(!info.control(Control::Discard), "a send to an ended session reports it");
        drop(guard);
    }
}
