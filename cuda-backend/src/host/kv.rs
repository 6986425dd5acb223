//! A rank's KV pool in host memory: one buffer per block, addressed by absolute pool offsets
//! (`block_id * block_bytes + offset`), the same addressing as plan fragments.

use std::sync::{Mutex, MutexGuard};

/// A zeroed block whose pages are mapped now. `vec![0; n]` may return untouched zero pages
/// (calloc), and the first transfer into each block would then pay a page fault per 4 KiB on
/// the data path; a KV pool is faulted in once, at startup, like pinned device staging.
fn prefaulted(n: usize) -> Vec<u8> {
    // Opaque to the optimizer, so the zero fill of "already zero" memory is not elided.
    let mut v = std::hint::black_box(vec![0u8; n]);
    v.fill(0);
    v
}

#[derive(Debug)]
pub struct HostKv {
    block_bytes: u64,
    // One lock per block: a receive landing in one block never waits on a send reading another.
    blocks: Vec<Mutex<Vec<u8>>>,
}

impl HostKv {
    pub fn new(blocks: u32, block_bytes: u64) -> HostKv {
        HostKv {
            block_bytes,
            blocks: (0..blocks)
                .map(|_| Mutex::new(prefaulted(block_bytes as usize)))
                .collect(),
        }
    }

    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    pub fn block(&self, id: u32) -> MutexGuard<'_, Vec<u8>> {
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

    /// Runs `f` on the bytes from pool offset `offset` to the end of its block or `max` bytes,
    /// whichever is shorter, with that block locked. Panics past the pool.
    pub fn with_piece<R>(&self, offset: u64, max: u64, f: impl FnOnce(&[u8]) -> R) -> R {
        let (block, within, n) = self.piece(offset, max);
        f(&self.block(block)[within..within + n])
    }

    /// `with_piece`, for writing.
    pub fn with_piece_mut<R>(&self, offset: u64, max: u64, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let (block, within, n) = self.piece(offset, max);
        f(&mut self.block(block)[within..within + n])
    }

    /// Block, offset in it and length of the piece at pool offset `offset` (at most `max`).
    fn piece(&self, offset: u64, max: u64) -> (u32, usize, usize) {
        let within = offset % self.block_bytes;
        let n = max.min(self.block_bytes - within);
        (
            (offset / self.block_bytes) as u32,
            within as usize,
            n as usize,
        )
    }

    /// True if `[offset, offset+len)` lies inside the pool.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        let total = self.block_bytes * self.blocks.len() as u64;
        offset.checked_add(len).is_some_and(|end| end <= total)
    }
}
