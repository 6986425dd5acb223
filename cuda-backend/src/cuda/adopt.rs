//! Adopting device memory another owner allocated (an engine's KV cache, e.g. a PyTorch
//! tensor) as a `DeviceBuffer` that is never freed here. The range is checked against the
//! driver's own records before anything points into it: device (not host or managed) memory,
//! on this GPU, inside one allocation.

use super::device::Gpu;
use super::error::{check, CudaError};
use super::memory::{allocation_of, DeviceBuffer};
use cudarc::driver::sys;
use std::sync::Arc;

impl DeviceBuffer {
    /// `len` bytes of device memory at `ptr`, owned by the caller: dropping the buffer leaves
    /// the memory alone.
    ///
    /// # Safety
    /// `[ptr, ptr + len)` must stay allocated for as long as the returned buffer (and every
    /// agent region or export made from it) lives. What the driver can check — that the range
    /// is device memory of `gpu`'s device inside one allocation — is checked.
    pub unsafe fn adopt(gpu: &Arc<Gpu>, ptr: u64, len: usize) -> Result<DeviceBuffer, CudaError> {
        if len == 0 {
            return Err(CudaError::NotAdoptable("zero-byte device range".into()));
        }
        gpu.bind()?;
        let memory_type = pointer_attribute(
            ptr,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
        )?;
        if memory_type != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 {
            return Err(CudaError::NotAdoptable(format!(
                "address {ptr:#x} is not device memory (memory type {memory_type})"
            )));
        }
        let ordinal = pointer_attribute(
            ptr,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
        )?;
        if ordinal as usize != gpu.ordinal() {
            return Err(CudaError::NotAdoptable(format!(
                "address {ptr:#x} is on device {ordinal}, not device {}",
                gpu.ordinal()
            )));
        }
        let (base, size) = allocation_of(ptr)?;
        let end = (ptr - base).checked_add(len as u64);
        if end.is_none_or(|end| end > size as u64) {
            return Err(CudaError::NotAdoptable(format!(
                "{len} bytes at {ptr:#x} run past the end of their allocation ({size} bytes at {base:#x})"
            )));
        }
        Ok(DeviceBuffer {
            gpu: gpu.clone(),
            ptr,
            len,
            owned: false,
        })
    }
}

/// The ordinal of the device whose memory `ptr` is (for a producer that does not say, as
/// `__cuda_array_interface__` does not).
pub fn device_of(ptr: u64) -> Result<usize, CudaError> {
    super::device::probe()?;
    let ordinal = pointer_attribute(
        ptr,
        sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
    )?;
    Ok(ordinal as usize)
}

/// A 32-bit pointer attribute of `ptr`; an error for an address the driver does not know.
fn pointer_attribute(ptr: u64, attribute: sys::CUpointer_attribute) -> Result<u32, CudaError> {
    let mut value: u32 = 0;
    // SAFETY: both attributes asked for here are 32-bit values written to a local.
    check(
        unsafe { sys::cuPointerGetAttribute((&mut value as *mut u32).cast(), attribute, ptr) },
        "cuPointerGetAttribute",
    )
    .map_err(|e| CudaError::NotAdoptable(format!("address {ptr:#x}: {e}")))?;
    Ok(value)
}
