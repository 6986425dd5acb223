//! What NIXL registers as a KV pool: one contiguous region of host memory (DRAM) or of one
//! GPU's memory (VRAM). The engine needs only its address, size and kind; who allocated it and
//! how the node copies patterns in and out stays with the owner (`HostPool`, or the node's
//! device pool), so this module names no allocator.

use super::pool::HostPool;
use nixl_sys::MemType;

pub trait PoolMemory: std::fmt::Debug + Send + Sync {
    /// The region's first address, in the address space `mem_type` names.
    fn base(&self) -> u64;
    /// The region's size in bytes (`size`, not `len`: a pool is never empty).
    fn size(&self) -> u64;
    /// `Dram` for host memory, `Vram` for device memory.
    fn mem_type(&self) -> MemType;
    /// The CUDA device ordinal of VRAM; 0 for DRAM.
    fn device_id(&self) -> u64;

    /// True if `[offset, offset + len)` lies inside the region.
    fn contains(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.size())
    }
}

impl PoolMemory for HostPool {
    fn base(&self) -> u64 {
        HostPool::base(self)
    }

    fn size(&self) -> u64 {
        HostPool::len(self)
    }

    fn mem_type(&self) -> MemType {
        MemType::Dram
    }

    fn device_id(&self) -> u64 {
        0
    }
}
