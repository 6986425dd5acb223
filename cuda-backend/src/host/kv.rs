//! A rank's KV pool in host memory: one buffer per block, addressed by absolute pool offsets
//! (`block_id * block_bytes + offset`), the same addressing as plan fragments.

use std::io::{IoSlice, IoSliceMut};
use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, MutexGuard};

/// A zeroed block whose pages are mapped now. `vec![0; n]` may return untouched zero pages
/// (calloc), and the first transfer into each block would then pay a page fault per 4 KiB on
/// the data path; a KV pool is faulted in once, at startup, like pinned device staging.
pub(crate) fn prefaulted(n: usize) -> Vec<u8> {
    // Opaque to the optimizer, so the zero fill of "already zero" memory is not elided.
    let mut v = std::hint::black_box(vec![0u8; n]);
    v.fill(0);
    v
}

/// One block's bytes: the pool's own, or a piece of memory a program that embeds a rank lent
/// it (`HostKv::lent`: an inference engine's KV cache).
#[derive(Debug)]
pub enum BlockMem {
    Owned(Vec<u8>),
    Lent { ptr: *mut u8, len: usize },
}

// SAFETY: a lent block is plain memory that `HostKv::lent`'s caller keeps valid for the
// pool's life; every access goes through the block's mutex, as for an owned block.
unsafe impl Send for BlockMem {}
unsafe impl Sync for BlockMem {}

impl Deref for BlockMem {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            BlockMem::Owned(v) => v,
            // SAFETY: see `HostKv::lent`.
            BlockMem::Lent { ptr, len } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
        }
    }
}

impl DerefMut for BlockMem {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            BlockMem::Owned(v) => v,
            // SAFETY: see `HostKv::lent`; the block's mutex makes this the only reference.
            BlockMem::Lent { ptr, len } => unsafe { std::slice::from_raw_parts_mut(*ptr, *len) },
        }
    }
}

#[derive(Debug)]
pub struct HostKv {
    block_bytes: u64,
    // One lock per block: a receive landing in one block never waits on a send reading another.
    blocks: Vec<Mutex<BlockMem>>,
}

impl HostKv {
    pub fn new(blocks: u32, block_bytes: u64) -> HostKv {
        HostKv {
            block_bytes,
            blocks: (0..blocks)
                .map(|_| Mutex::new(BlockMem::Owned(prefaulted(block_bytes as usize))))
                .collect(),
        }
    }

    /// A pool over `blocks * block_bytes` bytes of memory at `base` that the caller owns (an
    /// engine's KV cache, block `i` at `base + i * block_bytes`).
    ///
    /// # Safety
    /// The memory must be valid for reads and writes for as long as this pool (and every
    /// clone of an `Arc` holding it) lives, and nothing else may write to a block while a
    /// transfer pins it (the caller learns when that ends from the request's terminal state).
    pub unsafe fn lent(base: *mut u8, blocks: u32, block_bytes: u64) -> HostKv {
        let len = block_bytes as usize;
        HostKv {
            block_bytes,
            blocks: (0..blocks as usize)
                .map(|i| {
                    Mutex::new(BlockMem::Lent {
                        // SAFETY: in bounds of the caller's region, by the contract above.
                        ptr: unsafe { base.add(i * len) },
                        len,
                    })
                })
                .collect(),
        }
    }

    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    /// Blocks in the pool.
    pub fn blocks(&self) -> u32 {
        self.blocks.len() as u32
    }

    pub fn block(&self, id: u32) -> MutexGuard<'_, BlockMem> {
        self.blocks[id as usize]
            .lock()
            .expect("kv block lock poisoned")
    }

    /// Calls `f(block, offset in block, len)` for each block piece of `[offset, offset+len)`.
    /// Panics past the pool: plans are validated against the pool size before they get here.
    fn pieces(&self, mut offset: u64, mut len: u64, mut f: impl FnMut(u32, usize, usize)) {
        while len > 0 {
            let block = offset / self.block_bytes;
            let within = offset % self.block_bytes;
            let n = len.min(self.block_bytes - within);
            f(block as u32, within as usize, n as usize);
            offset += n;
            len -= n;
        }
    }

    /// Calls `f` on each block piece of `[offset, offset+len)` in order, each block locked only
    /// during its call.
    pub fn for_each_piece(&self, offset: u64, len: u64, mut f: impl FnMut(&[u8])) {
        self.pieces(offset, len, |b, at, n| f(&self.block(b)[at..at + n]));
    }

    /// Runs `f` on the bytes of `ranges` (pool offset, length), in order, as slices split at
    /// block boundaries, with every block they touch locked for the call (see `lock_all`).
    /// Panics past the pool.
    pub fn with_ranges<R>(&self, ranges: &[(u64, u64)], f: impl FnOnce(&[IoSlice<'_>]) -> R) -> R {
        let pieces = self.split(ranges);
        let (ids, guards) = self.lock_all(&pieces);
        let slices: Vec<IoSlice<'_>> = pieces
            .iter()
            .map(|&(b, at, n)| IoSlice::new(&guards[slot(&ids, b)][at..at + n]))
            .collect();
        f(&slices)
    }

    /// `with_ranges`, for writing. Panics if two ranges overlap.
    pub fn with_ranges_mut<R>(
        &self,
        ranges: &[(u64, u64)],
        f: impl FnOnce(&mut [IoSliceMut<'_>]) -> R,
    ) -> R {
        let pieces = self.split(ranges);
        let (ids, mut guards) = self.lock_all(&pieces);
        // Disjoint mutable slices out of each block: its pieces in address order, each split
        // off the front of what is left of the block.
        let mut by_address: Vec<usize> = (0..pieces.len()).collect();
        by_address.sort_unstable_by_key(|&i| (pieces[i].0, pieces[i].1));
        let mut slices: Vec<Option<IoSliceMut<'_>>> = pieces.iter().map(|_| None).collect();
        let mut next = by_address.into_iter().peekable();
        for (&b, guard) in ids.iter().zip(guards.iter_mut()) {
            let mut rest: &mut [u8] = &mut guard[..];
            let mut base = 0;
            while let Some(i) = next.next_if(|&i| pieces[i].0 == b) {
                let (_, at, n) = pieces[i];
                assert!(at >= base, "overlapping ranges in block {b}");
                let (piece, tail) = std::mem::take(&mut rest)[at - base..].split_at_mut(n);
                slices[i] = Some(IoSliceMut::new(piece));
                rest = tail;
                base = at + n;
            }
        }
        let mut slices: Vec<IoSliceMut<'_>> = slices
            .into_iter()
            .map(|s| s.expect("every piece lies in a locked block"))
            .collect();
        f(&mut slices)
    }

    /// (block, offset in block, length) for each block piece of `ranges`, in order.
    fn split(&self, ranges: &[(u64, u64)]) -> Vec<(u32, usize, usize)> {
        let mut out = Vec::with_capacity(ranges.len() + 2);
        for &(offset, len) in ranges {
            self.pieces(offset, len, |b, at, n| out.push((b, at, n)));
        }
        out
    }

    /// Locks every block `pieces` touch, in ascending id order: the only way this pool takes
    /// more than one block lock at a time, so two holders of several never deadlock (others
    /// hold one lock at a time and wait for nothing while they do).
    fn lock_all(
        &self,
        pieces: &[(u32, usize, usize)],
    ) -> (Vec<u32>, Vec<MutexGuard<'_, BlockMem>>) {
        let mut ids: Vec<u32> = pieces.iter().map(|p| p.0).collect();
        ids.sort_unstable();
        ids.dedup();
        let guards = ids.iter().map(|&b| self.block(b)).collect();
        (ids, guards)
    }

    /// True if `[offset, offset+len)` lies inside the pool.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        let total = self.block_bytes * self.blocks.len() as u64;
        offset.checked_add(len).is_some_and(|end| end <= total)
    }
}

/// Index of block `b` in the sorted ids `lock_all` returned.
fn slot(ids: &[u32], b: u32) -> usize {
    ids.binary_search(&b)
        .expect("every piece's block is locked")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> HostKv {
        let kv = HostKv::new(4, 16);
        for b in 0..4u32 {
            for (i, x) in kv.block(b).iter_mut().enumerate() {
                *x = (b * 16 + i as u32) as u8;
            }
        }
        kv
    }

    #[test]
    fn ranges_come_out_in_order_split_at_blocks() {
        let kv = pool();
        // Out of address order, across a block boundary, and two pieces of one block.
        let ranges = [(40, 12), (2, 3), (8, 4)];
        let got: Vec<Vec<u8>> = kv.with_ranges(&ranges, |s| s.iter().map(|x| x.to_vec()).collect());
        let want: Vec<Vec<u8>> = vec![
            (40..48).collect(),
            (48..52).collect(),
            (2..5).collect(),
            (8..12).collect(),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn mutable_ranges_write_where_they_say() {
        let kv = HostKv::new(4, 16);
        let ranges = [(40, 12), (2, 3), (8, 4)];
        kv.with_ranges_mut(&ranges, |s| {
            let mut v = 1u8;
            for slice in s.iter_mut() {
                for x in slice.iter_mut() {
                    *x = v;
                    v += 1;
                }
            }
        });
        let all: Vec<u8> = (0..4u32).flat_map(|b| kv.block(b).to_vec()).collect();
        assert_eq!(&all[40..52], &(1..=12).collect::<Vec<u8>>()[..]);
        assert_eq!(&all[2..5], &[13, 14, 15]);
        assert_eq!(&all[8..12], &[16, 17, 18, 19]);
        let written: usize = all.iter().filter(|&&x| x != 0).count();
        assert_eq!(written, 19, "nothing outside the ranges");
    }

    /// A lent pool reads and writes the caller's memory, block `i` at `i * block_bytes`.
    #[test]
    fn lent_pool_is_the_callers_memory() {
        let mut mem: Vec<u8> = (0..64).collect();
        // SAFETY: `mem` outlives `kv`, and nothing else touches it meanwhile.
        let kv = unsafe { HostKv::lent(mem.as_mut_ptr(), 4, 16) };
        assert_eq!(kv.blocks(), 4);
        let got = kv.with_ranges(&[(20, 4)], |s| s[0].to_vec());
        assert_eq!(got, vec![20, 21, 22, 23]);
        kv.with_ranges_mut(&[(14, 4)], |s| {
            s[0].copy_from_slice(&[7; 2]);
            s[1].copy_from_slice(&[9; 2]);
        });
        drop(kv);
        assert_eq!(&mem[12..20], &[12, 13, 7, 7, 9, 9, 18, 19]);
    }

    #[test]
    #[should_panic(expected = "overlapping")]
    fn overlapping_mutable_ranges_are_refused() {
        HostKv::new(2, 16).with_ranges_mut(&[(0, 8), (4, 8)], |_| ());
    }
}
