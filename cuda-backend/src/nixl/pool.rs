//! A rank's KV pool for NIXL: one contiguous, page-aligned host buffer registered once, so a
//! fragment is one descriptor (`base + offset`), the same addressing as plan fragments.
//!
//! NIXL writes into it from its own threads while the node reads other blocks, so it is never
//! borrowed as a Rust slice as a whole: access goes through bounds-checked copies of one range.

use super::error::NixlError;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

const PAGE: usize = 4096;

#[derive(Debug)]
pub struct HostPool {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is plain memory owned by the pool; every access is a raw copy of a range
// the caller owns (blocks pinned by the core), so sharing it across threads is sound.
unsafe impl Send for HostPool {}
// SAFETY: see `Send`.
unsafe impl Sync for HostPool {}

impl HostPool {
    /// A zeroed pool of `len` bytes, faulted in now (not on the first transfer).
    pub fn new(len: usize) -> Result<HostPool, NixlError> {
        if len == 0 {
            return Err(NixlError::Invalid("empty KV pool".into()));
        }
        let layout = Layout::from_size_align(len, PAGE)
            .map_err(|e| NixlError::Invalid(format!("pool of {len} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })
            .ok_or_else(|| NixlError::Invalid(format!("cannot allocate {len} bytes")))?;
        for at in (0..len).step_by(PAGE) {
            // SAFETY: in bounds; a volatile write so the page fault is not optimized away.
            unsafe { ptr.as_ptr().add(at).write_volatile(0) };
        }
        Ok(HostPool { ptr, layout })
    }

    pub fn base(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub fn len(&self) -> u64 {
        self.layout.size() as u64
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Copies `src` into the pool at `offset`.
    pub fn write(&self, offset: u64, src: &[u8]) -> Result<(), NixlError> {
        let at = self.check(offset, src.len())?;
        // SAFETY: `check` proved the range inside the allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(at), src.len())
        };
        Ok(())
    }

    /// Copies the pool's bytes at `offset` into `dst`.
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), NixlError> {
        let at = self.check(offset, dst.len())?;
        // SAFETY: `check` proved the range inside the allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(at), dst.as_mut_ptr(), dst.len())
        };
        Ok(())
    }

    /// True if `[offset, offset + len)` lies inside the pool.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.len())
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize, NixlError> {
        if !self.contains(offset, len as u64) {
            return Err(NixlError::Invalid(format!(
                "range {offset}+{len} outside the pool of {} bytes",
                self.len()
            )));
        }
        Ok(offset as usize)
    }
}

impl Drop for HostPool {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout. A pool a peer may still touch is never
        // dropped: the driver leaks it (see `driver`).
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_round_trip_and_ranges_past_the_end_are_refused() {
        let p = HostPool::new(3 * PAGE).unwrap();
        assert_eq!(p.base() % PAGE as u64, 0, "page aligned");
        p.write(PAGE as u64 - 2, &[1, 2, 3, 4]).unwrap();
        let mut out = [0u8; 6];
        p.read(PAGE as u64 - 3, &mut out).unwrap();
        assert_eq!(out, [0, 1, 2, 3, 4, 0]);
        assert!(p.write(3 * PAGE as u64 - 1, &[1, 2]).is_err());
        assert!(p.read(u64::MAX, &mut out).is_err());
        assert!(!p.contains(u64::MAX, 2));
        assert!(HostPool::new(0).is_err());
    }
}
