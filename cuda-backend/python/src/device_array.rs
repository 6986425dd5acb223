//! What an array object says about its memory through the two protocols frameworks share:
//! DLPack (`__dlpack__` / `__dlpack_device__`: PyTorch, JAX, CuPy, ...) and
//! `__cuda_array_interface__` (PyTorch, CuPy, Numba). DLPack is read first since it names
//! every dtype (PyTorch's `__cuda_array_interface__` has no bfloat16). Nothing here touches the
//! memory; `cuda_pool` checks the description and adopts it (feature `cuda`: without it only
//! `on_a_gpu` is built, so the host pool can refuse GPU memory by name).

use pyo3::prelude::*;
#[cfg(feature = "cuda")]
use pyo3::types::{PyCapsule, PyDict};
#[cfg(feature = "cuda")]
use std::ffi::c_void;

/// DLPack device types (`DLDeviceType`) this package tells apart.
pub const DL_CPU: i32 = 1;
#[cfg(feature = "cuda")]
pub const DL_CUDA: i32 = 2;

#[cfg(feature = "cuda")]
/// The element type in DLPack's terms (`DLDataType`: type code, bits, lanes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DlType {
    pub code: u8,
    pub bits: u8,
    pub lanes: u16,
}

#[cfg(feature = "cuda")]
/// An array's memory as its producer describes it.
#[derive(Debug)]
pub struct DeviceArray {
    /// Address of element 0.
    pub ptr: u64,
    pub device_type: i32,
    pub device_id: i32,
    pub dtype: DlType,
    pub shape: Vec<i64>,
    /// In elements; `None`: C-contiguous.
    pub strides: Option<Vec<i64>>,
    pub readonly: bool,
    /// What keeps the description valid: the DLPack capsule (never consumed, so the producer's
    /// deleter runs when it is collected), or the object itself.
    pub keep: Py<PyAny>,
}

/// True if `obj` says (through either protocol) that its memory is not host memory. An
/// answer that cannot be read counts as no: the buffer checks then say what is wrong.
pub fn on_a_gpu(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    if obj.hasattr("__dlpack_device__")? {
        let device = obj.call_method0("__dlpack_device__");
        let device = device.and_then(|d| d.extract::<(i32, i32)>());
        return Ok(device.is_ok_and(|(ty, _)| ty != DL_CPU));
    }
    obj.hasattr("__cuda_array_interface__")
}

#[cfg(feature = "cuda")]
/// `obj`'s description, or `None` if it speaks neither protocol.
pub fn describe(obj: &Bound<'_, PyAny>) -> PyResult<Option<DeviceArray>> {
    if obj.hasattr("__dlpack__")? {
        return from_dlpack(obj).map(Some);
    }
    if obj.hasattr("__cuda_array_interface__")? {
        return from_cai(obj).map(Some);
    }
    Ok(None)
}

#[cfg(feature = "cuda")]
/// DLPack's `DLTensor` (dlpack.h, ABI stable since 0.6), the head of a `DLManagedTensor`.
#[repr(C)]
struct DlTensor {
    data: *mut c_void,
    device_type: i32,
    device_id: i32,
    ndim: i32,
    dtype: DlType,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}

#[cfg(feature = "cuda")]
fn from_dlpack(obj: &Bound<'_, PyAny>) -> PyResult<DeviceArray> {
    let capsule = obj.call_method0("__dlpack__")?;
    let cap = capsule.downcast::<PyCapsule>()?;
    let named = cap.name()?.is_some_and(|n| n.to_bytes() == b"dltensor");
    if !named {
        return Err(pyo3::exceptions::PyTypeError::new_err(
            "__dlpack__ did not return an unconsumed \"dltensor\" capsule",
        ));
    }
    // SAFETY: a "dltensor" capsule holds a `DLManagedTensor`, whose first member is the
    // `DLTensor`; it stays valid while the capsule is neither consumed nor collected (we hold
    // it). `shape` has `ndim` entries, `strides` too unless null (compact row-major).
    unsafe {
        let t = &*(cap.pointer() as *const DlTensor);
        let ndim = usize::try_from(t.ndim).unwrap_or(0);
        let shape = std::slice::from_raw_parts(t.shape, ndim).to_vec();
        let strides =
            (!t.strides.is_null()).then(|| std::slice::from_raw_parts(t.strides, ndim).to_vec());
        Ok(DeviceArray {
            ptr: (t.data as u64).wrapping_add(t.byte_offset),
            device_type: t.device_type,
            device_id: t.device_id,
            dtype: t.dtype,
            shape,
            strides,
            readonly: false,
            keep: capsule.clone().unbind(),
        })
    }
}

#[cfg(feature = "cuda")]
/// `__cuda_array_interface__` (version 2+): `data` (address, read-only), `shape`, `typestr`
/// (`<f2`, `|u1`, ...), `strides` in bytes or `None`. It names no device; `cuda_pool` asks the
/// driver which device holds the address.
fn from_cai(obj: &Bound<'_, PyAny>) -> PyResult<DeviceArray> {
    let cai = obj.getattr("__cuda_array_interface__")?;
    let cai = cai.downcast::<PyDict>()?;
    let item = |k: &str| -> PyResult<Bound<'_, PyAny>> {
        cai.get_item(k)?.ok_or_else(|| {
            pyo3::exceptions::PyKeyError::new_err(format!("__cuda_array_interface__ has no {k}"))
        })
    };
    let (ptr, readonly): (u64, bool) = item("data")?.extract()?;
    let shape: Vec<i64> = item("shape")?.extract()?;
    let typestr: String = item("typestr")?.extract()?;
    let dtype = typestr_dtype(&typestr).ok_or_else(|| {
        pyo3::exceptions::PyTypeError::new_err(format!("unknown typestr {typestr:?}"))
    })?;
    let strides = match cai.get_item("strides")? {
        Some(s) if !s.is_none() => {
            let bytes: Vec<i64> = s.extract()?;
            let size = i64::from(dtype.bits / 8);
            // A byte stride that is not a whole number of elements cannot be contiguous.
            Some(
                bytes
                    .iter()
                    .map(|b| if b % size == 0 { b / size } else { -1 })
                    .collect(),
            )
        }
        _ => None,
    };
    Ok(DeviceArray {
        ptr,
        device_type: DL_CUDA,
        device_id: -1,
        dtype,
        shape,
        strides,
        readonly,
        keep: obj.clone().unbind(),
    })
}

#[cfg(feature = "cuda")]
/// A numpy-style typestr (`<f2`) as DLPack's type: `f` float (2), `i` int (0), `u` uint (1).
fn typestr_dtype(s: &str) -> Option<DlType> {
    let b = s.as_bytes();
    if b.len() < 3 || b[0] == b'>' {
        return None;
    }
    let code = match b[1] {
        b'i' => 0,
        b'u' => 1,
        b'f' => 2,
        _ => return None,
    };
    let size: u8 = s[2..].parse().ok()?;
    Some(DlType {
        code,
        bits: size.checked_mul(8)?,
        lanes: 1,
    })
}
