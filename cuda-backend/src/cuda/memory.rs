//! Device memory: KV pools from `cuMemAlloc` (or adopted from the program that embeds the
//! agent, `adopt`), pinned host staging for descriptor uploads, and CUDA IPC export/import of
//! a pool between processes.

use super::device::{Gpu, Stream};
use super::error::{check, CudaError, DriverResultExt};
use cudarc::driver::{result, sys};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Device memory from `cuMemAlloc` (not the stream-ordered pool: pool memory without granted
/// peer access copies ten times slower, and `cuIpcGetMemHandle` does not accept it), or a
/// range of another owner's allocation (`DeviceBuffer::adopt`), which this never frees.
#[derive(Debug)]
pub struct DeviceBuffer {
    pub(super) gpu: Arc<Gpu>,
    pub(super) ptr: sys::CUdeviceptr,
    pub(super) len: usize,
    /// False for adopted memory: its owner frees it.
    pub(super) owned: bool,
}

// SAFETY: a device address is plain data; access is ordered by streams/events.
unsafe impl Send for DeviceBuffer {}
unsafe impl Sync for DeviceBuffer {}

impl DeviceBuffer {
    pub fn alloc(gpu: &Arc<Gpu>, len: usize) -> Result<DeviceBuffer, CudaError> {
        if len == 0 {
            return Err(CudaError::Invalid("zero-byte device allocation".into()));
        }
        gpu.bind()?;
        // SAFETY: plain allocation; freed in Drop.
        let ptr = unsafe { result::malloc_sync(len) }.op("cuMemAlloc")?;
        Ok(DeviceBuffer {
            gpu: gpu.clone(),
            ptr,
            len,
            owned: true,
        })
    }

    /// True if this buffer frees its memory on drop (false: adopted).
    pub fn is_owned(&self) -> bool {
        self.owned
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Sets every byte and waits (set-up and poisoning; not on the copy path).
    pub fn fill_byte(&self, value: u8) -> Result<(), CudaError> {
        self.gpu.bind()?;
        // SAFETY: range inside the allocation. The memset runs on the legacy stream, so wait
        // for the whole context before returning.
        check(
            unsafe { sys::cuMemsetD8_v2(self.ptr, value, self.len) },
            "cuMemsetD8",
        )?;
        self.gpu.synchronize()
    }

    /// Synchronous upload of `src` at byte `offset`.
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<(), CudaError> {
        self.range_check(offset, src.len())?;
        self.gpu.bind()?;
        // SAFETY: bounds checked; synchronous copy from pageable memory.
        check(
            unsafe {
                sys::cuMemcpyHtoD_v2(self.ptr + offset as u64, src.as_ptr().cast(), src.len())
            },
            "cuMemcpyHtoD",
        )?;
        self.gpu.synchronize()
    }

    /// Synchronous download into `dst` from byte `offset`. Waits for the whole context first,
    /// since copies on non-blocking streams do not order against it.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), CudaError> {
        self.range_check(offset, dst.len())?;
        self.gpu.synchronize()?;
        // SAFETY: bounds checked; synchronous copy into pageable memory.
        check(
            unsafe {
                sys::cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), self.ptr + offset as u64, dst.len())
            },
            "cuMemcpyDtoH",
        )
    }

    fn range_check(&self, offset: usize, len: usize) -> Result<(), CudaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(CudaError::Invalid(format!(
                "range {offset}+{len} outside a buffer of {}",
                self.len
            ))),
        }
    }

    /// An IPC handle other processes can open. Valid while this buffer lives. The handle names
    /// the whole allocation that holds the buffer (an adopted buffer may start inside one, as
    /// a caching allocator's sub-allocation does), so the export carries the buffer's offset
    /// from that allocation's base.
    pub fn export(&self) -> Result<PoolExport, CudaError> {
        self.gpu.bind()?;
        let (base, _) = allocation_of(self.ptr)?;
        let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
        // SAFETY: `base` is the base of the live allocation holding this buffer.
        check(
            unsafe { sys::cuIpcGetMemHandle(&mut h, base) },
            "cuIpcGetMemHandle",
        )?;
        Ok(PoolExport {
            device: self.gpu.ordinal() as u32,
            len: self.len as u64,
            offset: self.ptr - base,
            handle: IpcHandle(h.reserved.map(|b| b as u8)).to_hex(),
        })
    }
}

/// The base and size of the allocation that holds device address `ptr`.
pub(super) fn allocation_of(ptr: sys::CUdeviceptr) -> Result<(u64, usize), CudaError> {
    let (mut base, mut size) = (0u64, 0usize);
    // SAFETY: out-pointers to locals; the driver rejects an address it did not allocate.
    check(
        unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) },
        "cuMemGetAddressRange",
    )?;
    Ok((base, size))
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.owned && self.gpu.bind().is_ok() {
            // SAFETY: freed once. Callers keep the buffer alive (agent regions hold an Arc)
            // until every job that touches it has completed.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// The 64 opaque bytes of a `CUipcMemHandle`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IpcHandle(pub [u8; 64]);

impl std::fmt::Debug for IpcHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IpcHandle({}…)", &self.to_hex()[..8])
    }
}

impl IpcHandle {
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Result<IpcHandle, CudaError> {
        if s.len() != 128 || !s.is_ascii() {
            return Err(CudaError::BadHandle(format!(
                "expected 128 hex digits, got {} characters",
                s.len()
            )));
        }
        let mut out = [0u8; 64];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|e| CudaError::BadHandle(e.to_string()))?;
        }
        Ok(IpcHandle(out))
    }
}

/// What a process sends its peer over the control channel so the peer can map its KV pool:
/// serialisable (JSON line, or a field of a control frame).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolExport {
    /// Exporting device ordinal (informational: IPC handles are device-independent).
    pub device: u32,
    /// Pool bytes; the importer checks the mapping holds `offset + len`.
    pub len: u64,
    /// Where the pool starts in the allocation the handle names (0 for a `cuMemAlloc` pool;
    /// an adopted pool may be a sub-allocation).
    #[serde(default)]
    pub offset: u64,
    /// `IpcHandle` as 128 hex digits.
    pub handle: String,
}

/// A peer process's pool mapped into this process (`cuIpcOpenMemHandle`), closed on drop.
#[derive(Debug)]
pub struct IpcMapping {
    gpu: Arc<Gpu>,
    /// What `cuIpcOpenMemHandle` returned: the peer allocation's base, closed on drop.
    base: sys::CUdeviceptr,
    /// The pool: `base` plus the export's offset.
    ptr: sys::CUdeviceptr,
    len: usize,
}

// SAFETY: as for `DeviceBuffer`.
unsafe impl Send for IpcMapping {}
unsafe impl Sync for IpcMapping {}

impl IpcMapping {
    /// Maps `export` into `gpu`'s context. Peer access is enabled lazily by the driver, so
    /// the importing context's kernels read the exporter's memory over NVLink directly.
    /// Both processes must see both devices (CUDA_VISIBLE_DEVICES must not hide the exporter).
    pub fn open(gpu: &Arc<Gpu>, export: &PoolExport) -> Result<IpcMapping, CudaError> {
        let handle = IpcHandle::from_hex(&export.handle)?;
        gpu.bind()?;
        let raw = sys::CUipcMemHandle {
            reserved: handle.0.map(|b| b as _),
        };
        let mut base: sys::CUdeviceptr = 0;
        // SAFETY: out-pointer to a local; the handle bytes come from cuIpcGetMemHandle of a
        // live allocation in another process (or the driver rejects them).
        check(
            unsafe {
                sys::cuIpcOpenMemHandle_v2(
                    &mut base,
                    raw,
                    sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
                )
            },
            "cuIpcOpenMemHandle",
        )
        .map_err(|e| CudaError::BadHandle(e.to_string()))?;
        let mut mapping = IpcMapping {
            gpu: gpu.clone(),
            base,
            ptr: base,
            len: export.len as usize,
        };
        // The claimed range comes from the peer: one past the end would let a plan read past
        // the mapping, so check it against the driver's view of the allocation.
        let (start, size) = allocation_of(base)?;
        let end = export.offset.checked_add(export.len);
        if start != base || end.is_none_or(|end| end > size as u64) {
            return Err(CudaError::BadHandle(format!(
                "peer claims {} bytes at offset {}, mapping holds {size}",
                export.len, export.offset
            )));
        }
        mapping.ptr = base + export.offset;
        Ok(mapping)
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: closes the mapping opened in `open`, once.
            let _ = unsafe { sys::cuIpcCloseMemHandle(self.base) };
        }
    }
}

/// A KV pool as the agent sees it: a device address range plus whatever keeps it mapped.
#[derive(Clone, Debug)]
pub struct Region {
    base: u64,
    len: u64,
    _keep: Arc<dyn std::any::Any + Send + Sync>,
}

impl Region {
    pub fn from_buffer(buf: Arc<DeviceBuffer>) -> Region {
        Region {
            base: buf.ptr(),
            len: buf.len() as u64,
            _keep: buf,
        }
    }

    pub fn from_ipc(map: Arc<IpcMapping>) -> Region {
        Region {
            base: map.ptr(),
            len: map.len() as u64,
            _keep: map,
        }
    }

    /// A pool owned by someone else (a framework's KV cache, allocated with `cuMemAlloc` or
    /// with peer access granted).
    ///
    /// # Safety
    /// `[base, base + len)` must stay valid device memory for as long as the returned region
    /// (and every agent it is registered with) lives.
    pub unsafe fn from_raw(base: u64, len: u64) -> Region {
        Region {
            base,
            len,
            _keep: Arc::new(()),
        }
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Page-locked host memory: the source of asynchronous descriptor uploads (a pageable source
/// would make `cuMemcpyHtoDAsync` synchronous).
#[derive(Debug)]
pub struct PinnedBuffer {
    gpu: Arc<Gpu>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: owned allocation; writes happen only while no copy reads it (the agent reuses a
// buffer only after the job's completion event).
unsafe impl Send for PinnedBuffer {}
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    pub fn alloc(gpu: &Arc<Gpu>, len: usize) -> Result<PinnedBuffer, CudaError> {
        gpu.bind()?;
        // SAFETY: plain allocation; freed in Drop.
        let ptr = unsafe { result::malloc_host(len.max(1), 0) }.op("cuMemAllocHost")?;
        Ok(PinnedBuffer {
            gpu: gpu.clone(),
            ptr: ptr.cast(),
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Enqueues a copy of the first `len` bytes to `dst` on `stream`.
    pub fn upload(&self, dst: u64, len: usize, stream: &Stream) -> Result<(), CudaError> {
        assert!(len <= self.len);
        // SAFETY: pinned source stays alive and unmodified until the stream passes this copy
        // (caller contract above).
        check(
            unsafe { sys::cuMemcpyHtoDAsync_v2(dst, self.ptr.cast(), len, stream.raw()) },
            "cuMemcpyHtoDAsync",
        )
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: freed once.
            let _ = unsafe { result::free_host(self.ptr.cast()) };
        }
    }
}
