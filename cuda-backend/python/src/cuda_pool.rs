//! The engine's KV pool with the CUDA backend (feature `cuda`): a CUDA tensor (DLPack or
//! `__cuda_array_interface__`) whose device, element type, contiguity and size fit the
//! layout, adopted by the CUDA agent as its pool without a copy (`DeviceBuffer::adopt`: the
//! engine keeps ownership, the agent never frees it). Each refusal is a `PoolError` naming
//! what is wrong. The tensor and its DLPack capsule are held for as long as the pool is, so
//! the engine's allocator cannot reuse the memory under the agent.

use crate::device_array::{describe, DeviceArray, DL_CPU, DL_CUDA};
use crate::layout::Layout;
use crate::pool::{bad, check_size, LentPool};
use kvferry_backends::cuda::adopt::device_of;
use kvferry_backends::cuda::{DeviceBuffer, Gpu};
use kvferry_backends::node::backend_parts::LentKv;
use pyo3::prelude::*;
use std::sync::Arc;

/// DLPack float8 type codes (`kDLFloat8_e3m4` .. `kDLFloat8_e8m0fnu`).
const DL_FLOAT8: std::ops::RangeInclusive<u8> = 7..=14;

/// True if DLPack type (`code`, `bits`) holds the layout's `dtype`: the type itself, or the
/// unsigned integer view the host path takes for types numpy lacks (bfloat16, float8).
fn holds(dtype: &str, code: u8, bits: u8) -> bool {
    match (dtype, code, bits) {
        ("float16", 2, 16) | ("float32", 2, 32) | ("float64", 2, 64) => true,
        ("int8", 0, 8) | ("uint8", 1, 8) => true,
        ("bfloat16", 4 | 1, 16) => true,
        ("float8", c, 8) => c == 1 || DL_FLOAT8.contains(&c),
        _ => false,
    }
}

/// Checks `obj` against `layout` and adopts its device memory.
pub fn lend_cuda(py: Python<'_>, obj: &Bound<'_, PyAny>, layout: &Layout) -> PyResult<LentPool> {
    let described = describe(obj).map_err(|e| {
        let msg = format!("the KV pool's DLPack / __cuda_array_interface__ export failed: {e}");
        bad(py, "not-a-cuda-array", msg)
    })?;
    let Some(a) = described else {
        let msg = "backend \"cuda\" needs a CUDA tensor as the KV pool (an object with __dlpack__ or __cuda_array_interface__)";
        return Err(bad(py, "not-a-cuda-array", msg.into()));
    };
    check_device(py, &a)?;
    if a.readonly {
        return Err(bad(
            py,
            "readonly",
            "the KV pool tensor is read-only".into(),
        ));
    }
    if a.dtype.lanes != 1 || !holds(&layout.dtype, a.dtype.code, a.dtype.bits) {
        let msg = format!(
            "the KV pool's element type is DLPack {:?}; layout dtype {} needs that dtype",
            a.dtype, layout.dtype
        );
        return Err(bad(py, "dtype", msg));
    }
    let shape = check_contiguous(py, &a)?;
    let elements = shape.iter().try_fold(1u64, |n, d| n.checked_mul(*d));
    let nbytes = elements.and_then(|n| n.checked_mul(u64::from(a.dtype.bits / 8)));
    let nbytes = nbytes.ok_or_else(|| bad(py, "size", "the KV pool's size overflows".into()))?;
    let blocks = check_size(py, &shape, nbytes, layout)?;
    let buf = adopt(&a, nbytes).map_err(|e| bad(py, "device-memory", e.to_string()))?;
    Ok(LentPool {
        kv: LentKv::Cuda(Arc::new(buf)),
        blocks,
        _keep: vec![obj.clone().unbind(), a.keep],
    })
}

fn check_device(py: Python<'_>, a: &DeviceArray) -> PyResult<()> {
    match a.device_type {
        DL_CUDA => Ok(()),
        DL_CPU => Err(bad(
            py,
            "device",
            "the KV pool is in host memory; backend \"cuda\" needs a CUDA tensor (or use backend \"host\")".into(),
        )),
        t => Err(bad(
            py,
            "device",
            format!("the KV pool is on DLPack device type {t}; backend \"cuda\" needs CUDA device memory (type {DL_CUDA})"),
        )),
    }
}

/// The shape, if the strides are C-contiguous (a dimension of one element may have any).
fn check_contiguous(py: Python<'_>, a: &DeviceArray) -> PyResult<Vec<u64>> {
    let shape: Vec<u64> = a
        .shape
        .iter()
        .map(|d| u64::try_from(*d).unwrap_or(0))
        .collect();
    if let Some(strides) = &a.strides {
        let mut want = 1i64;
        for (dim, stride) in a.shape.iter().zip(strides).rev() {
            if *dim != 1 && *stride != want {
                let msg = format!(
                    "the KV pool tensor is not C-contiguous (shape {:?}, strides {strides:?} elements); pass tensor.contiguous()",
                    a.shape
                );
                return Err(bad(py, "not-contiguous", msg));
            }
            want = want.saturating_mul(*dim);
        }
    }
    Ok(shape)
}

/// The agent's view of the tensor's memory, on the device that holds it.
fn adopt(a: &DeviceArray, nbytes: u64) -> Result<DeviceBuffer, kvferry_backends::cuda::CudaError> {
    let ordinal = match usize::try_from(a.device_id) {
        Ok(d) => d,
        Err(_) => device_of(a.ptr)?,
    };
    let gpu = Gpu::open(ordinal)?;
    let len = usize::try_from(nbytes).unwrap_or(usize::MAX);
    // SAFETY: the memory is the tensor's, which `LentPool::keep` holds (with its DLPack
    // capsule) until the transceiver has joined the driver thread and dropped every region
    // made from this buffer; `adopt` checks the range is this device's and inside one
    // allocation.
    unsafe { DeviceBuffer::adopt(&gpu, a.ptr, len) }
}
