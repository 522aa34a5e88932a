//! Where client connections run: single-threaded runtimes (`[proxy] threads`),
//! each with its own event loop, like one PgBouncer each.
//!
//! A session's bytes go in and out on one thread: no work stealing, no wakeups
//! across threads, one `epoll_wait` serving every session of the thread that is
//! ready. (A work-stealing runtime spent about 10 % more CPU per relayed
//! transaction, most of it in futex wakeups and extra `epoll_wait`s.) The accept
//! loops hand each new connection to the shard with the fewest, as a plain socket:
//! it is registered with that shard's event loop, never with the acceptor's.
//!
//! Each shard also has an express lane (`session::express`): a thread of its own
//! where the shard's sessions relay between cutovers, on an epoll set of its own.
//!
//! The control plane (the cutover, the console's commands, the fleet) talks to
//! sessions through channels and atomics, which work across runtimes.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::oneshot;

pub use crate::net::Socket;
use crate::net::Stream;
use crate::session::express::Lane;

struct Shard {
    handle: tokio::runtime::Handle,
    /// Connections running there now.
    live: Arc<AtomicUsize>,
    /// Dropped to stop the shard's thread.
    _stop: oneshot::Sender<()>,
    /// Where the shard's sessions relay between cutovers; stops when dropped.
    lane: Arc<Lane>,
}

pub struct Shards {
    shards: Vec<Shard>,
}

/// Decrements a shard's count when its connection ends (however its task ends).
struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shards {
    /// Starts `n` shards (at least one). Their threads end when this is dropped;
    /// connections still running there are dropped with them.
    pub fn start(n: usize) -> std::io::Result<Shards> {
        let mut shards = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().thread_name(format!("pgcutover-shard-{i}")).build()?;
            let handle = rt.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let lane = Arc::new(Lane::start(format!("pgcutover-lane-{i}"))?);
            let ours = lane.clone();
            std::thread::Builder::new().name(format!("pgcutover-shard-{i}")).spawn(move || {
                ours.enter();
                drop(ours);
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })?;
            shards.push(Shard { handle, live: Arc::new(AtomicUsize::new(0)), _stop: stop, lane });
        }
        Ok(Shards { shards })
    }

    /// Sessions riding the shards' express lanes now.
    pub fn express(&self) -> usize {
        self.shards.iter().map(|s| s.lane.riding()).sum()
    }

    /// Connections running on each shard.
    pub fn loads(&self) -> Vec<usize> {
        self.shards.iter().map(|s| s.live.load(Ordering::Relaxed)).collect()
    }

    /// Runs `serve` with `socket` on the shard with the fewest connections.
    pub fn run<F, Fut>(&self, socket: Socket, serve: F)
    where
        F: FnOnce(Stream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(shard) = self.shards.iter().min_by_key(|s| s.live.load(Ordering::Relaxed)) else { return };
        shard.live.fetch_add(1, Ordering::Relaxed);
        let live = Live(shard.live.clone());
        shard.handle.spawn(async move {
            let _live = live;
            match socket.attach() {
                Ok(stream) => serve(stream).await,
                Err(e) => tracing::warn!(error = %e, "cannot register a new connection with its event loop"),
            }
        });
    }
}

/// How many shards by default: one per four cores, at least one. Each relays
/// about 25,000 short transactions a second on one core here; a loop with fewer
/// sessions waits in `epoll_wait` more often per transaction, so two loops on two
/// cores cost about 10 % more CPU per transaction than one (benches/throughput,
/// BENCH_THREADS).
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().div_ceil(4))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Connections go to the least busy loop, run there (registered with its own
    /// event loop), and leave the count when they end.
    #[test]
    fn connections_spread_over_the_loops_and_leave_when_done() {
        let shards = Shards::start(2).unwrap();
        let mut clients = Vec::new();
        for _ in 0..4 {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            theirs.set_nonblocking(true).unwrap();
            shards.run(Socket::Unix(theirs), |mut stream| async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut b = [0u8; 1];
                while let Ok(1) = stream.read(&mut b).await {
                    let _ = stream.write_all(&b).await;
                }
            });
            clients.push(ours);
        }
        assert_eq!(shards.loads(), vec![2, 2]);
        for c in &mut clients {
            c.write_all(b"x").unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).unwrap();
            assert_eq!(&b, b"x");
        }
        drop(clients);
        // Bounded generously: a busy machine may take its time to see the EOFs.
        for _ in 0..1000 {
            if shards.loads() == vec![0, 0] {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("connections still counted: {:?}", shards.loads());
    }
}
