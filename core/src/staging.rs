//! The staging pool (transfer buffer manager): a fixed set of slots that transfers stage bytes
//! through.
//!
//! `try_acquire` hands out a [`SlotGuard`]; dropping it releases the slot on every exit path,
//! error and panic unwinding included. When a transfer is abandoned while a writer may still
//! land bytes in its slot, [`SlotGuard::poison`] keeps the slot out of circulation until
//! [`StagingPool::fence_passed`] says that writer is gone (fail closed). Exhaustion is never a
//! silent hang: the caller either falls back to a one-off buffer (counted) or queues with a
//! deadline (see the transceiver).

use crate::bugs::{Bug, BugSet};
use std::sync::{Arc, Mutex, MutexGuard};
use thiserror::Error;

/// Upper bound on slots per pool.
pub const MAX_SLOTS: usize = 4096;

/// Identifies the writer a poisoned slot waits for: the transfer that was abandoned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fence(pub u64);

/// Bytes of one slot, shared with whatever writes them (a DMA engine, a socket reader).
/// A writer holding this after the slot was released is exactly the late writer that poison
/// guards against.
pub type SlotBuffer = Arc<Mutex<Vec<u8>>>;

#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum StagingError {
    #[error("staging pool exhausted: {in_use} in use, {poisoned} poisoned")]
    Exhausted { in_use: usize, poisoned: usize },
    #[error("transfer needs {wanted} bytes of staging, slots hold {slot_bytes}")]
    TooLarge { wanted: u64, slot_bytes: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    InUse,
    Poisoned(Fence),
}

/// Occupancy counters, as exported in metrics and checked by the simulator (I2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StagingCounters {
    pub slots: usize,
    pub free: usize,
    pub in_use: usize,
    pub poisoned: usize,
    /// One-off buffers handed out because every slot was busy (lifetime total).
    pub fallbacks: u64,
    /// Fallback buffers alive now.
    pub fallbacks_live: usize,
    /// `try_acquire` calls that found no slot (lifetime total).
    pub exhausted: u64,
}

#[derive(Debug)]
struct Inner {
    slot_bytes: u64,
    state: Vec<SlotState>,
    buffers: Vec<SlotBuffer>,
    free: Vec<usize>,
    counters: StagingCounters,
    bugs: BugSet,
}

/// Cheap to clone: clones share the pool.
#[derive(Clone, Debug)]
pub struct StagingPool {
    inner: Arc<Mutex<Inner>>,
}

impl StagingPool {
    pub fn new(slots: usize, slot_bytes: u64) -> StagingPool {
        StagingPool::with_bugs(slots, slot_bytes, BugSet::NONE)
    }

    /// Buffers are allocated lazily on first use (a pool sized for the worst case should not
    /// cost its full size before any transfer runs).
    pub fn with_bugs(slots: usize, slot_bytes: u64, bugs: BugSet) -> StagingPool {
        assert!(slots <= MAX_SLOTS, "{slots} staging slots exceed MAX_SLOTS");
        StagingPool {
            inner: Arc::new(Mutex::new(Inner {
                slot_bytes,
                state: vec![SlotState::Free; slots],
                buffers: (0..slots).map(|_| SlotBuffer::default()).collect(),
                // Pop from the back: lowest slot first, deterministic.
                free: (0..slots).rev().collect(),
                counters: StagingCounters {
                    slots,
                    free: slots,
                    ..StagingCounters::default()
                },
                bugs,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("staging pool lock poisoned")
    }

    pub fn slot_bytes(&self) -> u64 {
        self.lock().slot_bytes
    }

    pub fn counters(&self) -> StagingCounters {
        self.lock().counters
    }

    /// A free slot sized for `bytes`, or an error at once.
    pub fn try_acquire(&self, bytes: u64) -> Result<SlotGuard, StagingError> {
        let mut g = self.lock();
        if bytes > g.slot_bytes {
            return Err(StagingError::TooLarge {
                wanted: bytes,
                slot_bytes: g.slot_bytes,
            });
        }
        let Some(slot) = g.free.pop() else {
            g.counters.exhausted += 1;
            return Err(StagingError::Exhausted {
                in_use: g.counters.in_use,
                poisoned: g.counters.poisoned,
            });
        };
        assert_eq!(g.state[slot], SlotState::Free, "free list held a busy slot");
        g.state[slot] = SlotState::InUse;
        g.counters.free -= 1;
        g.counters.in_use += 1;
        let buffer = g.buffers[slot].clone();
        drop(g);
        {
            let mut b = buffer.lock().expect("slot buffer lock poisoned");
            if (b.len() as u64) < bytes {
                b.resize(bytes as usize, 0);
            }
        }
        Ok(SlotGuard {
            pool: self.clone(),
            slot: Some(slot),
            buffer,
            released: false,
        })
    }

    /// A slot if one is free, else a one-off buffer of `bytes` (counted in `fallbacks`).
    pub fn acquire_or_fallback(&self, bytes: u64) -> SlotGuard {
        match self.try_acquire(bytes) {
            Ok(g) => g,
            Err(_) => {
                let mut g = self.lock();
                g.counters.fallbacks += 1;
                g.counters.fallbacks_live += 1;
                drop(g);
                SlotGuard {
                    pool: self.clone(),
                    slot: None,
                    buffer: Arc::new(Mutex::new(vec![0; bytes as usize])),
                    released: false,
                }
            }
        }
    }

    /// The writer named by `fence` can no longer touch any slot: return its poisoned slots.
    /// Returns how many came back.
    pub fn fence_passed(&self, fence: Fence) -> usize {
        let mut g = self.lock();
        let mut n = 0;
        for slot in 0..g.state.len() {
            if g.state[slot] == SlotState::Poisoned(fence) {
                g.state[slot] = SlotState::Free;
                g.free.push(slot);
                g.counters.poisoned -= 1;
                g.counters.free += 1;
                n += 1;
            }
        }
        n
    }

    fn release(&self, slot: Option<usize>, poison: Option<Fence>) {
        let mut g = self.lock();
        let Some(slot) = slot else {
            g.counters.fallbacks_live -= 1;
            return;
        };
        assert_eq!(
            g.state[slot],
            SlotState::InUse,
            "release of a slot not in use"
        );
        g.counters.in_use -= 1;
        match poison {
            Some(fence) if !g.bugs.has(Bug::ReusePoisonedSlot) => {
                g.state[slot] = SlotState::Poisoned(fence);
                g.counters.poisoned += 1;
            }
            _ => {
                g.state[slot] = SlotState::Free;
                g.free.push(slot);
                g.counters.free += 1;
            }
        }
    }
}

/// Exclusive use of one staging slot (or one fallback buffer). Released on drop.
#[derive(Debug)]
pub struct SlotGuard {
    pool: StagingPool,
    slot: Option<usize>,
    buffer: SlotBuffer,
    released: bool,
}

impl SlotGuard {
    /// The slot's bytes, to hand to a writer or reader.
    pub fn buffer(&self) -> &SlotBuffer {
        &self.buffer
    }

    /// Slot index, or `None` for a fallback buffer.
    pub fn slot(&self) -> Option<usize> {
        self.slot
    }

    pub fn is_fallback(&self) -> bool {
        self.slot.is_none()
    }

    /// Gives the slot up while a writer named by `fence` may still land bytes in it: it stays
    /// out of circulation until `fence_passed(fence)`. A fallback buffer is simply dropped: no
    /// one else will ever be handed it.
    pub fn poison(mut self, fence: Fence) {
        self.released = true;
        self.pool.release(self.slot, Some(fence));
    }

    /// Leaks the slot: never returned. Exists only for the `leak-slot-on-error` bug switch.
    #[cfg(feature = "bug-switches")]
    pub fn leak(mut self) {
        self.released = true;
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if !self.released {
            self.released = true;
            self.pool.release(self.slot, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_releases_on_every_path() {
        let pool = StagingPool::new(2, 64);
        {
            let _a = pool.try_acquire(64).unwrap();
            let _b = pool.try_acquire(8).unwrap();
            assert!(matches!(
                pool.try_acquire(8),
                Err(StagingError::Exhausted { .. })
            ));
        }
        assert_eq!(pool.counters().free, 2);
        let p2 = pool.clone();
        let r = std::panic::catch_unwind(move || {
            let _g = p2.try_acquire(1).unwrap();
            panic!("transfer blew up");
        });
        assert!(r.is_err());
        assert_eq!(pool.counters().free, 2);
        assert_eq!(pool.counters().exhausted, 1);
    }

    #[test]
    fn poisoned_slot_stays_out_until_its_fence() {
        let pool = StagingPool::new(1, 16);
        pool.try_acquire(16).unwrap().poison(Fence(9));
        assert_eq!(pool.counters().poisoned, 1);
        assert!(pool.try_acquire(1).is_err());
        assert_eq!(pool.fence_passed(Fence(8)), 0);
        assert_eq!(pool.fence_passed(Fence(9)), 1);
        assert!(pool.try_acquire(1).is_ok());
    }

    #[test]
    fn fallback_when_exhausted_is_counted() {
        let pool = StagingPool::new(1, 16);
        let a = pool.acquire_or_fallback(16);
        let b = pool.acquire_or_fallback(32);
        assert!(!a.is_fallback() && b.is_fallback());
        assert_eq!(b.buffer().lock().unwrap().len(), 32);
        assert_eq!(pool.counters().fallbacks_live, 1);
        drop(b);
        let c = pool.counters();
        assert_eq!((c.fallbacks, c.fallbacks_live, c.in_use), (1, 0, 1));
    }

    #[test]
    fn counters_follow_every_slot_and_the_lowest_slot_goes_first() {
        let pool = StagingPool::new(3, 64);
        assert_eq!(pool.slot_bytes(), 64);
        let c = pool.counters();
        assert_eq!((c.slots, c.free, c.in_use, c.poisoned), (3, 3, 0, 0));
        let a = pool.try_acquire(10).unwrap();
        let b = pool.try_acquire(64).unwrap();
        assert_eq!((a.slot(), b.slot()), (Some(0), Some(1)));
        assert_eq!(
            a.buffer().lock().unwrap().len(),
            10,
            "sized for the transfer"
        );
        let c = pool.counters();
        assert_eq!((c.free, c.in_use, c.poisoned), (1, 2, 0));
        a.poison(Fence(1));
        b.poison(Fence(1));
        let c = pool.counters();
        assert_eq!((c.free, c.in_use, c.poisoned), (1, 0, 2));
        assert_eq!(pool.fence_passed(Fence(1)), 2, "every slot of the fence");
        let c = pool.counters();
        assert_eq!((c.free, c.in_use, c.poisoned), (3, 0, 0));
        assert_eq!(pool.fence_passed(Fence(1)), 0, "a fence passes once");
        // A buffer grows for a larger transfer and is not shrunk for a smaller one.
        let g = pool.try_acquire(64).unwrap();
        assert_eq!(g.buffer().lock().unwrap().len(), 64);
        drop(g);
        let g = pool.try_acquire(8).unwrap();
        assert_eq!(g.buffer().lock().unwrap().len(), 64);
    }

    #[test]
    fn a_poisoned_fallback_buffer_is_simply_dropped() {
        let pool = StagingPool::new(1, 16);
        let _slot = pool.try_acquire(16).unwrap();
        let f = pool.acquire_or_fallback(8);
        assert!(f.is_fallback() && f.slot().is_none());
        f.poison(Fence(3));
        let c = pool.counters();
        assert_eq!((c.fallbacks, c.fallbacks_live, c.poisoned), (1, 0, 0));
    }

    #[test]
    #[should_panic(expected = "exceed MAX_SLOTS")]
    fn a_pool_past_max_slots_is_refused() {
        StagingPool::new(MAX_SLOTS + 1, 1);
    }

    /// The `reuse-poisoned-slot` switch puts a poisoned slot straight back (I6 broken).
    #[cfg(feature = "bug-switches")]
    #[test]
    fn reuse_poisoned_slot_returns_the_slot_at_once() {
        let pool = StagingPool::with_bugs(1, 16, BugSet::NONE.with(Bug::ReusePoisonedSlot));
        pool.try_acquire(16).unwrap().poison(Fence(9));
        let c = pool.counters();
        assert_eq!((c.free, c.poisoned), (1, 0));
        assert!(pool.try_acquire(1).is_ok());
    }

    #[cfg(feature = "bug-switches")]
    #[test]
    fn a_leaked_slot_never_comes_back() {
        let pool = StagingPool::new(1, 16);
        pool.try_acquire(16).unwrap().leak();
        assert_eq!(pool.counters().in_use, 1);
        assert!(pool.try_acquire(1).is_err());
    }

    #[test]
    fn oversized_request_is_an_error() {
        let pool = StagingPool::new(1, 16);
        assert!(matches!(
            pool.try_acquire(17),
            Err(StagingError::TooLarge { .. })
        ));
    }
}
