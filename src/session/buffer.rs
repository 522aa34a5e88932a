//! Relay buffers, pooled per thread: an idle session holds none.
//!
//! A session takes a buffer when bytes arrive and gives it back as soon as it is
//! empty again, so memory follows traffic, not connections (PgBouncer keeps its
//! packet buffers in a shared pool for the same reason). Buffers that grew past
//! the standard size to inspect a large frame are freed, not pooled.

use std::cell::RefCell;

/// The size of a pooled buffer, and of one read.
pub const CHUNK: usize = 16 * 1024;
/// Buffers kept per thread.
const POOL_LIMIT: usize = 512;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

fn take() -> Vec<u8> {
    POOL.with(|p| p.borrow_mut().pop()).unwrap_or_else(|| vec![0; CHUNK])
}

fn give_back(v: Vec<u8>) {
    if v.len() == CHUNK {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_LIMIT {
                p.push(v);
            }
        });
    }
}

/// A byte queue: `data[start..end]` holds bytes not consumed yet.
///
/// INVARIANT: `data.len()` is the capacity (zero-filled once), `start <= end <=
/// data.len()`; an empty queue holds no allocation after [`IoBuf::release`].
#[derive(Default)]
pub struct IoBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl IoBuf {
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn bytes(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.start..self.end]
    }

    /// Drops `n` bytes from the front.
    pub fn consume(&mut self, n: usize) {
        self.start += n.min(self.len());
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Room for at least `min` more bytes at the end; returns it.
    pub fn spare(&mut self, min: usize) -> &mut [u8] {
        if self.data.is_empty() {
            self.data = take();
        }
        if self.data.len() - self.end < min {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.data.len() - self.end < min {
                let want = (self.end + min).next_power_of_two();
                self.data.resize(want, 0);
            }
        }
        &mut self.data[self.end..]
    }

    /// `n` bytes were written into [`IoBuf::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.data.len());
    }

    pub fn extend(&mut self, bytes: &[u8]) {
        self.spare(bytes.len())[..bytes.len()].copy_from_slice(bytes);
        self.filled(bytes.len());
    }

    /// Gives the allocation back to the pool if nothing is queued.
    pub fn release(&mut self) {
        if self.is_empty() && !self.data.is_empty() {
            give_back(std::mem::take(&mut self.data));
            self.start = 0;
            self.end = 0;
        }
    }

    /// Whether an allocation is held (for the memory tests).
    pub fn holds_memory(&self) -> bool {
        !self.data.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_come_out_in_order_across_growth_and_compaction() {
        let mut b = IoBuf::default();
        let mut expect = Vec::new();
        for i in 0..50_000u32 {
            let piece = i.to_be_bytes();
            b.extend(&piece);
            expect.extend_from_slice(&piece);
            if i % 7 == 0 {
                let n = b.len().min(11);
                assert_eq!(&b.bytes()[..n], &expect[..n]);
                b.consume(n);
                expect.drain(..n);
            }
        }
        assert_eq!(b.bytes(), &expect[..]);
        let n = b.len();
        b.consume(n);
        b.release();
        assert!(!b.holds_memory());
    }
}
