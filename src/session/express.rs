//! The express lane: a session's steady-state relaying on a plain event loop.
//!
//! Between cutovers a session does one thing: move frames between its client and
//! its backend. As a tokio task, every such move also costs a readiness poll, a task
//! wakeup and the scheduler's bookkeeping — about as much CPU again as the relay's
//! own work (benches/throughput). So each shard has a lane: one thread with an
//! epoll set of its own, which a session rides whole. At each edge of one of its
//! sockets the lane runs the very relay turn tokio would ([`Relay::poll_relay`]),
//! reading and writing the plain sockets directly, with no waker: the next edge
//! brings it back (see [`crate::net::RawStream`]).
//!
//! The lane gives a session back at the first event its relay stops for — a
//! request to hold, a repoint to follow, an end — and whenever its task asks: the
//! task keeps only the session's mailbox, and a control request recalls the session
//! before it is handled. Everything else stays on tokio: logins, holds, moves, TLS.
//! A session boards only with the gate open, nothing wanted of it and nothing
//! prepared for it, so the sessions a cutover talks to are mostly home already.
//!
//! [`Relay::poll_relay`]: super::relay::Relay::poll_relay

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll as Epoll, Registry, Token};
use tokio::sync::oneshot;

use super::inbox::Inbox;
use super::registry::Control;
use super::relay::{End, Event};
use super::Session;

/// The token of the lane's bell (its mio `Waker`).
const BELL: Token = Token(usize::MAX);

/// A shard's lane. Dropping it stops the lane's thread; the sessions riding it
/// then are dropped there (their sockets closed), and their tasks end.
pub struct Lane {
    shared: Arc<Shared>,
}

/// What a session's task and the lane's thread share.
pub(super) struct Shared {
    registry: Registry,
    bell: mio::Waker,
    queue: Mutex<Vec<Cmd>>,
    stop: AtomicBool,
    /// Sessions riding the lane now.
    riding: AtomicUsize,
}

enum Cmd {
    Board(Box<Session>, oneshot::Sender<Returned>),
    Recall(u64),
}

/// A session the lane gives back, with the event its relay stopped for (None:
/// recalled, or the lane could not take it).
struct Returned {
    session: Box<Session>,
    event: Option<Event>,
}

thread_local! {
    /// The lane of the shard whose thread this is.
    static HERE: RefCell<Option<Arc<Shared>>> = const { RefCell::new(None) };
}

impl Lane {
    /// Starts a lane's thread.
    pub fn start(name: String) -> std::io::Result<Lane> {
        let poll = Epoll::new()?;
        let registry = poll.registry().try_clone()?;
        let bell = mio::Waker::new(poll.registry(), BELL)?;
        let shared = Arc::new(Shared { registry, bell, queue: Mutex::new(Vec::new()), stop: AtomicBool::new(false), riding: AtomicUsize::new(0) });
        let lane = shared.clone();
        std::thread::Builder::new().name(name).spawn(move || run(lane, poll))?;
        Ok(Lane { shared })
    }

    /// Sessions riding the lane now.
    pub fn riding(&self) -> usize {
        self.shared.riding.load(Ordering::Relaxed)
    }

    /// Makes this the lane of sessions that run on the current thread.
    pub fn enter(&self) {
        HERE.with(|h| *h.borrow_mut() = Some(self.shared.clone()));
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.shared.bell.wake();
    }
}

/// The lane of the current thread, if it has one.
pub(super) fn here() -> Option<Arc<Shared>> {
    HERE.with(|h| h.borrow().clone())
}

impl Shared {
    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<Cmd>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `cmd` for the lane; gives it back if the lane has stopped.
    fn send(&self, cmd: Cmd) -> Result<(), Cmd> {
        {
            // INVARIANT: the lane sets `stop` under this lock before it takes the
            // queue for the last time: nothing queued is left behind.
            let mut q = self.queue();
            if self.stop.load(Ordering::SeqCst) {
                return Err(cmd);
            }
            q.push(cmd);
        }
        if let Err(e) = self.bell.wake() {
            tracing::error!(error = %e, "cannot wake an express lane");
        }
        Ok(())
    }
}

/// What a ride ended with: the session back on tokio, the step to take, and a
/// control request that recalled it (taken after the step).
pub(super) struct Ride {
    pub session: Box<Session>,
    pub step: super::Step,
    pub recalled_by: Option<Control>,
}

/// Rides `lane` until the relay stops for an event or a control request comes.
/// None: the lane stopped with the session on it (the proxy is going away).
///
/// Cancellation safety: dropped while the session rides, the session stays on the
/// lane until its relay ends or the lane stops; nothing is lost that the task
/// could still have used.
pub(super) async fn ride(mut session: Box<Session>, lane: Arc<Shared>, inbox: &mut Inbox) -> Option<Ride> {
    let relay = &mut session.relay;
    let off = match (relay.client.to_raw(), relay.backend.stream.to_raw()) {
        (Err(e), _) => Some(End::ClientGone(Some(e))),
        (_, Err(e)) => Some(End::BackendGone(Some(e))),
        _ => None,
    };
    if let Some(end) = off {
        let step = home(&mut session, Some(Event::End(end)));
        return Some(Ride { session, step, recalled_by: None });
    }
    let id = session.relay.info.id;
    let (tx, mut rx) = oneshot::channel();
    if let Err(Cmd::Board(mut session, _)) = lane.send(Cmd::Board(session, tx)) {
        session.lane_ok = false;
        let step = home(&mut session, None);
        return Some(Ride { session, step, recalled_by: None });
    }
    let (back, recalled_by) = tokio::select! {
        biased;
        back = &mut rx => (back.ok()?, None),
        c = inbox.recv() => {
            // A lane that has stopped gives every session back or drops it.
            let _ = lane.send(Cmd::Recall(id));
            (rx.await.ok()?, Some(c))
        }
    };
    let Returned { mut session, event } = back;
    let step = home(&mut session, event);
    Some(Ride { session, step, recalled_by })
}

/// Puts the session's sockets back on tokio's event loop; the step it goes on with.
fn home(session: &mut Session, event: Option<Event>) -> super::Step {
    let relay = &mut session.relay;
    let lost = match (relay.client.to_tokio(), relay.backend.stream.to_tokio()) {
        (Err(e), _) => Some(End::ClientGone(Some(e))),
        (_, Err(e)) => Some(End::BackendGone(Some(e))),
        _ => None,
    };
    match (event, lost) {
        (Some(Event::End(end)), _) => super::Step::Relay(Event::End(end)),
        (_, Some(end)) => {
            tracing::warn!(session = relay.info.id, error = ?end, "a socket could not come back from an express lane");
            // A hold the relay began is not one the gate has counted yet.
            relay.holding = false;
            session.lane_ok = false;
            super::Step::Relay(Event::End(end))
        }
        (Some(event), None) => super::Step::Relay(event),
        (None, None) => super::Step::Returned,
    }
}

/// A session on the lane.
struct Rider {
    session: Box<Session>,
    back: oneshot::Sender<Returned>,
}

struct Slot {
    /// Bumped when a rider leaves: a token of an earlier rider finds no match.
    generation: u32,
    rider: Option<Rider>,
}

/// The lane's sessions, and where each is.
#[derive(Default)]
struct Riders {
    slots: Vec<Slot>,
    free: Vec<usize>,
    by_id: HashMap<u64, usize>,
}

/// Generations count in 31 bits, slots in 31: a token never reaches [`BELL`].
const GENERATIONS: u32 = 0x7fff_ffff;

/// A token: the slot, its generation and the side (0: client, 1: backend).
fn token(slot: usize, generation: u32, side: usize) -> Token {
    Token(((generation as usize) << 32) | ((slot & 0x7fff_ffff) << 1) | side)
}

fn untoken(t: Token) -> (usize, u32, usize) {
    ((t.0 >> 1) & 0x7fff_ffff, (t.0 >> 32) as u32, t.0 & 1)
}

fn run(shared: Arc<Shared>, mut poll: Epoll) {
    let mut riders = Riders::default();
    let mut events = Events::with_capacity(256);
    let mut cx = Context::from_waker(Waker::noop());
    while !shared.stop.load(Ordering::SeqCst) {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "an express lane's event loop failed; its sessions go back to tokio");
            let queued = {
                let mut q = shared.queue();
                shared.stop.store(true, Ordering::SeqCst);
                std::mem::take(&mut *q)
            };
            for cmd in queued {
                if let Cmd::Board(session, back) = cmd {
                    let _ = back.send(Returned { session, event: None });
                }
            }
            for slot in 0..riders.slots.len() {
                riders.alight(slot, None, &shared.registry);
            }
            shared.riding.store(0, Ordering::Relaxed);
            return;
        }
        let mut rung = false;
        let before = riders.by_id.len();
        for ev in events.iter() {
            if ev.token() == BELL {
                rung = true;
            } else {
                riders.on_event(ev, &shared.registry, &mut cx);
            }
        }
        if rung {
            let cmds = std::mem::take(&mut *shared.queue());
            for cmd in cmds {
                match cmd {
                    Cmd::Board(session, back) => riders.board(session, back, &shared.registry, &mut cx),
                    Cmd::Recall(id) => {
                        if let Some(&slot) = riders.by_id.get(&id) {
                            riders.alight(slot, None, &shared.registry);
                        }
                    }
                }
            }
        }
        if riders.by_id.len() != before {
            shared.riding.store(riders.by_id.len(), Ordering::Relaxed);
        }
    }
    // Stopped: the proxy is going away. The sessions still riding, or queued to,
    // are dropped here (their sockets closed); their tasks hear that the lane
    // stopped.
    let queued = {
        let mut q = shared.queue();
        std::mem::take(&mut *q)
    };
    drop(queued);
}

impl Riders {
    fn board(&mut self, session: Box<Session>, back: oneshot::Sender<Returned>, registry: &Registry, cx: &mut Context<'_>) {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot { generation: 0, rider: None });
                self.slots.len() - 1
            }
        };
        let generation = self.slots[slot].generation;
        let fds = [session.relay.client.raw_fd(), session.relay.backend.stream.raw_fd()];
        let id = session.relay.info.id;
        self.slots[slot].rider = Some(Rider { session, back });
        self.by_id.insert(id, slot);
        for (side, fd) in fds.iter().enumerate() {
            let registered = match fd {
                Some(fd) => registry.register(&mut SourceFd(fd), token(slot, generation, side), Interest::READABLE | Interest::WRITABLE),
                None => Err(std::io::Error::other("not a plain socket")),
            };
            if let Err(e) = registered {
                tracing::warn!(session = id, error = %e, "an express lane cannot take a session; it stays on tokio");
                if let Some(r) = self.slots[slot].rider.as_mut() {
                    r.session.lane_ok = false;
                }
                self.alight(slot, None, registry);
                return;
            }
        }
        // Bytes may wait in the relay's buffers, and the sockets' edges may have
        // passed while tokio had them: one turn now, with both sides worth a try.
        self.turn(slot, cx, registry);
    }

    fn on_event(&mut self, ev: &mio::event::Event, registry: &Registry, cx: &mut Context<'_>) {
        let (slot, generation, side) = untoken(ev.token());
        let Some(Slot { generation: g, rider: Some(rider) }) = self.slots.get_mut(slot) else { return };
        if *g != generation {
            return;
        }
        let relay = &mut rider.session.relay;
        let (stream, out_waiting) = if side == 0 { (&mut relay.client, !relay.to_client.is_empty()) } else { (&mut relay.backend.stream, !relay.to_backend.is_empty()) };
        let Some(raw) = stream.as_raw_mut() else { return };
        let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
        let writable = ev.is_writable() || ev.is_write_closed() || ev.is_error();
        raw.readable |= readable;
        raw.writable |= writable;
        raw.read_closed |= ev.is_read_closed() || ev.is_error();
        // Room to write matters only to a side with something to write (a Unix
        // socket's peer signals room after each read).
        if readable || (writable && out_waiting) {
            self.turn(slot, cx, registry);
        }
    }

    fn turn(&mut self, slot: usize, cx: &mut Context<'_>, registry: &Registry) {
        let Some(Slot { rider: Some(rider), .. }) = self.slots.get_mut(slot) else { return };
        // A panic in one session's relay ends that session only, as it would as a
        // task of its own on tokio.
        let turned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rider.session.relay.poll_relay(cx)));
        match turned {
            Ok(Poll::Pending) => {}
            Ok(Poll::Ready(event)) => self.alight(slot, Some(event), registry),
            Err(_) => {
                tracing::error!(session = rider.session.relay.info.id, "a session's relay panicked on an express lane; the session ends");
                drop(self.leave(slot, registry));
            }
        }
    }

    /// Gives a session back to its task.
    fn alight(&mut self, slot: usize, event: Option<Event>, registry: &Registry) {
        if let Some(rider) = self.leave(slot, registry) {
            // A task that has gone (its runtime stopped) drops the session here.
            let _ = rider.back.send(Returned { session: rider.session, event });
        }
    }

    /// Takes a session off the lane.
    fn leave(&mut self, slot: usize, registry: &Registry) -> Option<Rider> {
        let s = self.slots.get_mut(slot)?;
        let rider = s.rider.take()?;
        s.generation = s.generation.wrapping_add(1) & GENERATIONS;
        self.free.push(slot);
        let relay = &rider.session.relay;
        self.by_id.remove(&relay.info.id);
        for fd in [relay.client.raw_fd(), relay.backend.stream.raw_fd()].into_iter().flatten() {
            // Off this lane's set before tokio's takes it (a socket not in the set,
            // after a failed boarding, only returns an error).
            let _ = registry.deregister(&mut SourceFd(&fd));
        }
        Some(rider)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_the_slot_generation_and_side() {
        for (slot, generation, side) in [(0, 0, 0), (1, 0, 1), (70_000, 3, 1), (0x7fff_ffff, GENERATIONS, 1)] {
            let t = token(slot, generation, side);
            assert_ne!(t, BELL);
            assert_eq!(untoken(t), (slot, generation, side));
        }
    }
}
