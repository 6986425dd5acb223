//! A NIXL node's KV pool: host memory, or (feature `cuda`) one GPU's memory from `cuMemAlloc`
//! as the CUDA node allocates it, registered with NIXL as VRAM so UCX moves it with its CUDA
//! transports (`cuda_ipc` between processes on one host). The node fills and verifies blocks
//! through it; NIXL sees only `PoolMemory`.

#[cfg(feature = "cuda")]
use crate::cuda::device::Gpu;
#[cfg(feature = "cuda")]
use crate::cuda::error::CudaError;
#[cfg(feature = "cuda")]
use crate::cuda::memory::DeviceBuffer;
use crate::nixl::{HostPool, NixlError, PoolMemory};
#[cfg(feature = "cuda")]
use nixl_sys::MemType;
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PoolError {
    #[error(transparent)]
    Host(#[from] NixlError),
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error("a pool in device memory needs a build with `--features cuda`")]
    NoCuda,
    #[error("pool offset {0} does not fit this machine's address space")]
    Offset(u64),
}

#[derive(Debug, Clone)]
pub enum KvPool {
    Host(Arc<HostPool>),
    #[cfg(feature = "cuda")]
    Device(Arc<VramPool>),
}

impl KvPool {
    /// A zeroed pool of `bytes` in host memory, or on CUDA device `device`.
    pub fn new(bytes: usize, device: Option<usize>) -> Result<KvPool, PoolError> {
        match device {
            None => Ok(KvPool::Host(Arc::new(HostPool::new(bytes)?))),
            #[cfg(feature = "cuda")]
            Some(ordinal) => Ok(KvPool::Device(Arc::new(VramPool::new(ordinal, bytes)?))),
            #[cfg(not(feature = "cuda"))]
            Some(_) => Err(PoolError::NoCuda),
        }
    }

    pub fn memory(&self) -> Arc<dyn PoolMemory> {
        match self {
            KvPool::Host(h) => h.clone(),
            #[cfg(feature = "cuda")]
            KvPool::Device(d) => d.clone(),
        }
    }

    /// Makes the pool's device current on the calling thread (the NIXL driver's, before
    /// UCX registers the pool); nothing for host memory.
    pub fn bind(&self) -> Result<(), PoolError> {
        match self {
            KvPool::Host(_) => Ok(()),
            #[cfg(feature = "cuda")]
            KvPool::Device(d) => Ok(d.0.gpu().bind()?),
        }
    }

    pub fn write(&self, offset: u64, src: &[u8]) -> Result<(), PoolError> {
        match self {
            KvPool::Host(h) => Ok(h.write(offset, src)?),
            #[cfg(feature = "cuda")]
            KvPool::Device(d) => Ok(d.0.write(d.offset(offset)?, src)?),
        }
    }

    /// Copies the pool's bytes at `offset` into `dst` (from the device: a synchronous
    /// download after the context's work, so a finished READ's bytes are seen).
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), PoolError> {
        match self {
            KvPool::Host(h) => Ok(h.read(offset, dst)?),
            #[cfg(feature = "cuda")]
            KvPool::Device(d) => Ok(d.0.read(d.offset(offset)?, dst)?),
        }
    }
}

/// Device memory as NIXL registers it: VRAM of the buffer's device.
#[cfg(feature = "cuda")]
#[derive(Debug)]
pub struct VramPool(DeviceBuffer);

#[cfg(feature = "cuda")]
impl VramPool {
    fn new(ordinal: usize, bytes: usize) -> Result<VramPool, PoolError> {
        let gpu = Gpu::open(ordinal)?;
        let buf = DeviceBuffer::alloc(&gpu, bytes)?;
        // cuMemAlloc leaves the bytes undefined; a gen's unwritten blocks must not pass for
        // the pattern by chance, as a host pool's zeroes do not.
        buf.fill_byte(0)?;
        Ok(VramPool(buf))
    }

    fn offset(&self, offset: u64) -> Result<usize, PoolError> {
        usize::try_from(offset).map_err(|_| PoolError::Offset(offset))
    }
}

#[cfg(feature = "cuda")]
impl PoolMemory for VramPool {
    fn base(&self) -> u64 {
        self.0.ptr()
    }

    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn mem_type(&self) -> MemType {
        MemType::Vram
    }

    fn device_id(&self) -> u64 {
        self.0.gpu().ordinal() as u64
    }
}
