//! KV block pool with pin counts and owner epochs.
//!
//! Every allocation stamps a block with a fresh epoch. A transfer pins the blocks it reads or
//! writes; freeing a pinned block only marks it, and the last unpin returns it to the free list
//! (the KV-block use-after-free fix). Every write names the epoch it expects and
//! [`BlockPool::check_write`] refuses a stale one, so a late writer gets an error, not a block.

use crate::bugs::{Bug, BugSet};
use crate::RequestId;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use thiserror::Error;

/// Upper bound on blocks per pool; ids are `u32` on the wire.
pub const MAX_BLOCKS: u32 = 1 << 24;
/// Upper bound on concurrent pins of one block (one per transfer touching it).
pub const MAX_PINS: u32 = 1 << 16;

/// A block as a request holds it: its id and the epoch of the allocation that gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct BlockRef {
    pub id: u32,
    pub epoch: u64,
}

#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum BlockError {
    #[error("block pool exhausted: wanted {wanted}, {free} free")]
    Exhausted { wanted: usize, free: usize },
    #[error("block {0} does not exist")]
    Unknown(u32),
    #[error("block {block}: stale epoch {expected}, block is at epoch {actual} (owner {owner:?})")]
    StaleEpoch {
        block: u32,
        expected: u64,
        actual: u64,
        owner: Option<RequestId>,
    },
    #[error("block {block} is not owned by {request}")]
    NotOwned { block: u32, request: RequestId },
    #[error("block {0} has too many pins")]
    TooManyPins(u32),
    #[error(
        "block {block} is not free (held by {owner:?}, or freed and still pinned by a transfer)"
    )]
    NotFree {
        block: u32,
        owner: Option<RequestId>,
    },
    #[error("block {0} is named twice")]
    Repeated(u32),
}

#[derive(Clone, Debug)]
struct Meta {
    owner: Option<RequestId>,
    epoch: u64,
    pins: u32,
    /// Freed by its owner while pinned: goes back to the free list on the last unpin.
    free_deferred: bool,
}

/// What `free` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FreeOutcome {
    pub freed: usize,
    pub deferred: usize,
}

#[derive(Debug)]
pub struct BlockPool {
    meta: Vec<Meta>,
    free: VecDeque<u32>,
    next_epoch: u64,
    bugs: BugSet,
}

impl BlockPool {
    pub fn new(blocks: u32) -> BlockPool {
        BlockPool::with_bugs(blocks, BugSet::NONE)
    }

    pub fn with_bugs(blocks: u32, bugs: BugSet) -> BlockPool {
        assert!(blocks <= MAX_BLOCKS, "{blocks} blocks exceed MAX_BLOCKS");
        BlockPool {
            meta: vec![
                Meta {
                    owner: None,
                    epoch: 0,
                    pins: 0,
                    free_deferred: false,
                };
                blocks as usize
            ],
            free: (0..blocks).collect(),
            next_epoch: 1,
            bugs,
        }
    }

    pub fn capacity(&self) -> usize {
        self.meta.len()
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    pub fn pinned_count(&self) -> usize {
        self.meta.iter().filter(|m| m.pins > 0).count()
    }

    /// Blocks freed by their owner but still pinned by a transfer.
    pub fn deferred_count(&self) -> usize {
        self.meta.iter().filter(|m| m.free_deferred).count()
    }

    /// All `n` blocks or none.
    pub fn allocate(&mut self, owner: RequestId, n: usize) -> Result<Vec<BlockRef>, BlockError> {
        if n > self.free.len() {
            return Err(BlockError::Exhausted {
                wanted: n,
                free: self.free.len(),
            });
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let id = self.free.pop_front().expect("checked length");
            out.push(self.hand_out(id, owner));
        }
        Ok(out)
    }

    /// Exactly the blocks `ids`, in that order, all or none: for a pool whose block ids an
    /// embedding engine's own KV cache manager assigns (the Python package), not this pool's
    /// free list. Refuses an id past the pool, one named twice, or one that is not free (held,
    /// or freed while a transfer still pins it: its memory may still be read or written).
    /// Costs one pass over the free list, as the ids may sit anywhere in it.
    pub fn allocate_ids(
        &mut self,
        owner: RequestId,
        ids: &[u32],
    ) -> Result<Vec<BlockRef>, BlockError> {
        let mut wanted = std::collections::HashSet::with_capacity(ids.len());
        for &id in ids {
            let m = self.meta.get(id as usize).ok_or(BlockError::Unknown(id))?;
            if m.owner.is_some() || m.pins > 0 {
                return Err(BlockError::NotFree {
                    block: id,
                    owner: m.owner,
                });
            }
            if !wanted.insert(id) {
                return Err(BlockError::Repeated(id));
            }
        }
        self.free.retain(|id| !wanted.contains(id));
        Ok(ids.iter().map(|&id| self.hand_out(id, owner)).collect())
    }

    /// Gives free block `id` (already off the free list) to `owner` under a fresh epoch.
    fn hand_out(&mut self, id: u32, owner: RequestId) -> BlockRef {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let m = &mut self.meta[id as usize];
        assert!(
            m.owner.is_none() && m.pins == 0,
            "handing out live block {id}"
        );
        *m = Meta {
            owner: Some(owner),
            epoch,
            pins: 0,
            free_deferred: false,
        };
        BlockRef { id, epoch }
    }

    fn meta_for(&self, b: &BlockRef) -> Result<&Meta, BlockError> {
        let m = self
            .meta
            .get(b.id as usize)
            .ok_or(BlockError::Unknown(b.id))?;
        if m.epoch != b.epoch || m.owner.is_none() {
            return Err(BlockError::StaleEpoch {
                block: b.id,
                expected: b.epoch,
                actual: m.epoch,
                owner: m.owner,
            });
        }
        Ok(m)
    }

    /// Ok if a write into `b` may land now: the block is still the allocation `b` names.
    pub fn check_write(&self, b: &BlockRef) -> Result<(), BlockError> {
        self.meta_for(b).map(|_| ())
    }

    /// Ok if `b` belongs to `request` in its current allocation (the serving check of I9).
    pub fn check_owner(&self, b: &BlockRef, request: RequestId) -> Result<(), BlockError> {
        let m = self.meta_for(b)?;
        if m.owner != Some(request) {
            return Err(BlockError::NotOwned {
                block: b.id,
                request,
            });
        }
        Ok(())
    }

    /// Current allocation of a block id, if any.
    pub fn current(&self, id: u32) -> Option<(RequestId, BlockRef)> {
        let m = self.meta.get(id as usize)?;
        m.owner.map(|o| (o, BlockRef { id, epoch: m.epoch }))
    }

    /// Pins every block or none.
    pub fn pin(&mut self, blocks: &[BlockRef]) -> Result<(), BlockError> {
        for b in blocks {
            let m = self.meta_for(b)?;
            if m.pins >= MAX_PINS {
                return Err(BlockError::TooManyPins(b.id));
            }
        }
        for b in blocks {
            self.meta[b.id as usize].pins += 1;
        }
        Ok(())
    }

    /// Drops one pin from each block; the last unpin of a freed block returns it to the pool.
    /// Unpinning a block that is not pinned at that epoch is a bookkeeping bug and panics.
    pub fn unpin(&mut self, blocks: &[BlockRef]) {
        for b in blocks {
            let m = &mut self.meta[b.id as usize];
            if m.epoch != b.epoch {
                // Only reachable when a bug switch freed the block under its pin.
                assert!(
                    self.bugs.has(Bug::FreeBlocksDuringTransfer),
                    "unpin of block {} at stale epoch {} (now {})",
                    b.id,
                    b.epoch,
                    m.epoch
                );
                continue;
            }
            assert!(m.pins > 0, "unpin of unpinned block {}", b.id);
            m.pins -= 1;
            if m.pins == 0 && m.free_deferred {
                m.free_deferred = false;
                m.owner = None;
                self.free.push_back(b.id);
            }
        }
    }

    /// Frees the owner's blocks: immediately if unpinned, else when the last pin goes.
    /// Blocks not currently held at that epoch are skipped (double free is harmless).
    pub fn free(&mut self, blocks: &[BlockRef]) -> FreeOutcome {
        let mut out = FreeOutcome::default();
        for b in blocks {
            let Some(m) = self.meta.get_mut(b.id as usize) else {
                continue;
            };
            if m.epoch != b.epoch || m.owner.is_none() || m.free_deferred {
                continue;
            }
            if m.pins > 0 && !self.bugs.has(Bug::FreeBlocksDuringTransfer) {
                m.free_deferred = true;
                out.deferred += 1;
            } else {
                m.owner = None;
                m.pins = 0;
                self.free.push_back(b.id);
                out.freed += 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_while_pinned_is_deferred_until_unpin() {
        let mut p = BlockPool::new(4);
        let b = p.allocate(RequestId(1), 2).unwrap();
        p.pin(&b).unwrap();
        assert_eq!(
            p.free(&b),
            FreeOutcome {
                freed: 0,
                deferred: 2
            }
        );
        assert_eq!(p.free_count(), 2);
        // The pinned transfer may still write: the epoch is unchanged.
        p.check_write(&b[0]).unwrap();
        p.unpin(&b);
        assert_eq!(p.free_count(), 4);
        assert!(p.check_write(&b[0]).is_err());
    }

    #[test]
    fn stale_epoch_write_is_an_error_after_reuse() {
        let mut p = BlockPool::new(1);
        let old = p.allocate(RequestId(1), 1).unwrap();
        p.free(&old);
        let new = p.allocate(RequestId(2), 1).unwrap();
        assert_eq!(old[0].id, new[0].id);
        assert!(matches!(
            p.check_write(&old[0]),
            Err(BlockError::StaleEpoch { .. })
        ));
        p.check_write(&new[0]).unwrap();
        assert!(p.check_owner(&new[0], RequestId(1)).is_err());
    }

    #[test]
    fn allocate_ids_takes_exactly_the_free_ids_named_or_none() {
        let mut p = BlockPool::new(6);
        let a = p.allocate_ids(RequestId(1), &[4, 1]).unwrap();
        assert_eq!(a.iter().map(|b| b.id).collect::<Vec<_>>(), vec![4, 1]);
        assert_eq!(p.free_count(), 4);
        // Held, repeated, past the pool: refused, and nothing of the call is taken.
        assert!(matches!(
            p.allocate_ids(RequestId(2), &[0, 4]),
            Err(BlockError::NotFree { block: 4, .. })
        ));
        assert_eq!(
            p.allocate_ids(RequestId(2), &[2, 2]),
            Err(BlockError::Repeated(2))
        );
        assert_eq!(
            p.allocate_ids(RequestId(2), &[9]),
            Err(BlockError::Unknown(9))
        );
        assert_eq!(p.free_count(), 4);
        // Freed while pinned: not free until the pin goes.
        p.pin(&a[..1]).unwrap();
        p.free(&a);
        assert!(p.allocate_ids(RequestId(3), &[4]).is_err());
        assert_eq!(p.allocate_ids(RequestId(3), &[1]).unwrap()[0].id, 1);
        p.unpin(&a[..1]);
        assert_eq!(p.allocate_ids(RequestId(3), &[4]).unwrap()[0].id, 4);
        // The free list no longer hands out what was taken by id.
        let rest = p.allocate(RequestId(4), 3).unwrap();
        let mut ids: Vec<u32> = rest.iter().map(|b| b.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![0, 2, 3]);
        assert_eq!(p.free_count(), 1, "block 5 is left");
    }

    #[test]
    fn allocation_is_all_or_nothing() {
        let mut p = BlockPool::new(3);
        assert_eq!(
            p.allocate(RequestId(1), 4),
            Err(BlockError::Exhausted { wanted: 4, free: 3 })
        );
        assert_eq!(p.free_count(), 3);
        assert_eq!(p.allocate(RequestId(1), 3).unwrap().len(), 3);
        assert_eq!(p.free_count(), 0);
        assert_eq!(p.capacity(), 3);
    }

    #[test]
    fn every_allocation_gets_a_fresh_epoch_and_an_owner() {
        let mut p = BlockPool::new(4);
        assert_eq!(p.current(0), None, "nothing allocated yet");
        assert_eq!(p.current(9), None, "no such block");
        let a = p.allocate(RequestId(1), 2).unwrap();
        let b = p.allocate(RequestId(2), 2).unwrap();
        let mut epochs: Vec<u64> = a.iter().chain(&b).map(|r| r.epoch).collect();
        epochs.dedup();
        assert_eq!(epochs.len(), 4, "epochs are distinct: {epochs:?}");
        assert!(epochs.iter().all(|e| *e > 0), "epoch 0 is never handed out");
        assert_eq!(p.current(b[1].id), Some((RequestId(2), b[1])));
        p.check_owner(&a[0], RequestId(1)).unwrap();
        assert_eq!(
            p.check_owner(&a[0], RequestId(2)),
            Err(BlockError::NotOwned {
                block: a[0].id,
                request: RequestId(2)
            })
        );
        assert_eq!(
            p.check_write(&BlockRef { id: 4, epoch: 1 }),
            Err(BlockError::Unknown(4))
        );
        // A block on the free list has no owner: no write lands in it, whatever the epoch.
        p.free(&a);
        assert_eq!(p.current(a[0].id), None);
        assert!(matches!(
            p.check_write(&a[0]),
            Err(BlockError::StaleEpoch { owner: None, .. })
        ));
    }

    #[test]
    fn counts_follow_pins_and_deferred_frees() {
        let mut p = BlockPool::new(4);
        let b = p.allocate(RequestId(1), 2).unwrap();
        assert_eq!((p.pinned_count(), p.deferred_count()), (0, 0));
        // Two transfers pin the same blocks.
        p.pin(&b).unwrap();
        p.pin(&b[..1]).unwrap();
        assert_eq!(p.pinned_count(), 2);
        assert_eq!(
            p.free(&b),
            FreeOutcome {
                freed: 0,
                deferred: 2
            }
        );
        assert_eq!((p.deferred_count(), p.free_count()), (2, 2));
        // Freeing again is harmless and counts nothing.
        assert_eq!(p.free(&b), FreeOutcome::default());
        p.unpin(&b);
        // Block 1 had one pin: back now. Block 0 still has one.
        assert_eq!((p.pinned_count(), p.deferred_count()), (1, 1));
        assert_eq!(p.free_count(), 3);
        assert_eq!(p.current(b[0].id), Some((RequestId(1), b[0])));
        assert_eq!(p.current(b[1].id), None);
        p.unpin(&b[..1]);
        assert_eq!((p.pinned_count(), p.deferred_count()), (0, 0));
        assert_eq!(p.free_count(), 4);
        // A block that came back by unpin is allocatable and not deferred.
        let again = p.allocate(RequestId(2), 4).unwrap();
        p.pin(&again).unwrap();
        p.unpin(&again);
        assert_eq!(
            (p.pinned_count(), p.deferred_count(), p.free_count()),
            (0, 0, 0)
        );
    }

    #[test]
    fn unpinned_blocks_free_at_once_and_unknown_ones_are_skipped() {
        let mut p = BlockPool::new(2);
        let b = p.allocate(RequestId(1), 2).unwrap();
        p.pin(&b[..1]).unwrap();
        p.unpin(&b[..1]);
        let out = p.free(&[b[0], b[1], BlockRef { id: 7, epoch: 1 }]);
        assert_eq!(
            out,
            FreeOutcome {
                freed: 2,
                deferred: 0
            }
        );
        assert_eq!(p.free_count(), 2);
        // A stale reference frees nothing of the block's next owner.
        let c = p.allocate(RequestId(2), 2).unwrap();
        assert_eq!(p.free(&b), FreeOutcome::default());
        assert_eq!(p.free_count(), 0);
        p.check_owner(&c[0], RequestId(2)).unwrap();
    }

    #[test]
    fn pin_is_all_or_nothing_and_bounded() {
        let mut p = BlockPool::new(2);
        let b = p.allocate(RequestId(1), 1).unwrap();
        let stale = BlockRef {
            id: b[0].id,
            epoch: b[0].epoch + 1,
        };
        assert!(matches!(
            p.pin(&[b[0], stale]),
            Err(BlockError::StaleEpoch { .. })
        ));
        assert_eq!(p.pinned_count(), 0, "nothing pinned on error");
        for _ in 0..MAX_PINS {
            p.pin(&b).unwrap();
        }
        assert_eq!(p.pin(&b), Err(BlockError::TooManyPins(b[0].id)));
        for _ in 0..MAX_PINS {
            p.unpin(&b);
        }
        assert_eq!(p.pinned_count(), 0);
    }

    #[test]
    #[should_panic(expected = "unpin of unpinned block")]
    fn unpin_without_a_pin_is_a_bug() {
        let mut p = BlockPool::new(1);
        let b = p.allocate(RequestId(1), 1).unwrap();
        p.unpin(&b);
    }

    #[test]
    #[should_panic(expected = "stale epoch")]
    fn unpin_at_a_stale_epoch_is_a_bug() {
        let mut p = BlockPool::new(1);
        let old = p.allocate(RequestId(1), 1).unwrap();
        p.free(&old);
        p.allocate(RequestId(2), 1).unwrap();
        p.unpin(&old);
    }

    #[test]
    #[should_panic(expected = "exceed MAX_BLOCKS")]
    fn a_pool_past_max_blocks_is_refused() {
        BlockPool::new(MAX_BLOCKS + 1);
    }

    /// The `free-blocks-during-transfer` switch frees pinned blocks at once (I5 broken), and
    /// the late unpin at the old epoch is tolerated.
    #[cfg(feature = "bug-switches")]
    #[test]
    fn free_blocks_during_transfer_frees_under_the_pin() {
        let mut p = BlockPool::with_bugs(1, BugSet::NONE.with(Bug::FreeBlocksDuringTransfer));
        let b = p.allocate(RequestId(1), 1).unwrap();
        p.pin(&b).unwrap();
        assert_eq!(
            p.free(&b),
            FreeOutcome {
                freed: 1,
                deferred: 0
            }
        );
        assert_eq!((p.free_count(), p.pinned_count()), (1, 0));
        let reused = p.allocate(RequestId(2), 1).unwrap();
        p.unpin(&b);
        p.check_owner(&reused[0], RequestId(2)).unwrap();
    }
}
