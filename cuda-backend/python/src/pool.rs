//! The engine's KV pool with the host backend: any writable, C-contiguous buffer (a numpy
//! array) whose element type and size fit the layout, lent to its rank without a copy (one pool
//! per rank of the layout's `tp_size`). Checked
//! before anything points into it, each refusal a `PoolError` naming what is wrong and what
//! was expected. The buffer stays exported (so it can neither be resized nor freed) for as
//! long as this holds it. (The CUDA backend's pool is `cuda_pool`'s.)

use crate::errors::{error, PoolError};
use crate::layout::Layout;
use kvferry_backends::host::kv::HostKv;
use kvferry_backends::node::backend_parts::LentKv;
use kvferry_backends::node::spec::MAX_POOL_BLOCKS;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};
use std::sync::Arc;

/// A checked pool and the Python objects that keep its memory in place.
#[derive(Debug)]
pub struct LentPool {
    pub kv: LentKv,
    pub blocks: u32,
    /// Host: the buffer's memoryview and the ctypes array over it that gave its address
    /// (while they live the buffer cannot move). CUDA: the tensor and its DLPack capsule.
    pub _keep: Vec<Py<PyAny>>,
}

pub fn bad(py: Python<'_>, reason: &str, msg: String) -> PyErr {
    error::<PoolError>(py, reason, msg)
}

/// One pool per rank of `layout`, each checked and lent by `lend_one`: for TP1 `obj` itself
/// (so a list is a buffer or nothing, as ever), for TP > 1 a list or tuple of them in rank
/// order. A refusal names the rank.
pub fn lend_ranks(
    py: Python<'_>,
    obj: &Bound<'_, PyAny>,
    layout: &Layout,
    lend_one: impl Fn(&Bound<'_, PyAny>) -> PyResult<LentPool>,
) -> PyResult<Vec<LentPool>> {
    let tp = layout.tp_size as usize;
    if tp == 1 {
        return Ok(vec![lend_one(obj)?]);
    }
    let listed = obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>();
    let pools: Vec<Bound<'_, PyAny>> = match listed {
        true => obj.try_iter()?.collect::<PyResult<_>>()?,
        false => Vec::new(),
    };
    if pools.len() != tp {
        let got = match listed {
            true => format!("{} pools", pools.len()),
            false => format!("one {}", obj.get_type().name()?),
        };
        let msg = format!(
            "layout tp_size is {tp}: pass one pool per rank, a list or tuple of {tp} in rank order (got {got})"
        );
        return Err(bad(py, "ranks", msg));
    }
    let in_rank = |r: usize, e: PyErr| {
        if !e.is_instance_of::<PoolError>(py) {
            return e;
        }
        let value = e.value(py);
        let reason: String = value
            .getattr("reason")
            .and_then(|r| r.extract())
            .unwrap_or_else(|_| "pool".into());
        bad(py, &reason, format!("rank {r}: {value}"))
    };
    (pools.iter().enumerate())
        .map(|(r, p)| lend_one(p).map_err(|e| in_rank(r, e)))
        .collect()
}

/// Checks `obj` against `layout` (one rank's pool: every rank's blocks have the same shape) and
/// lends its memory.
pub fn lend(py: Python<'_>, obj: &Bound<'_, PyAny>, layout: &Layout) -> PyResult<LentPool> {
    if crate::device_array::on_a_gpu(obj)? {
        let msg = "the KV pool is in GPU memory; it needs config backend \"cuda\"".to_string();
        return Err(bad(py, "device", msg));
    }
    let memoryview = py.import("builtins")?.getattr("memoryview")?;
    let view = memoryview.call1((obj,)).map_err(|e| {
        bad(
            py,
            "not-a-buffer",
            format!("the KV pool must be a buffer (a numpy array): {e}"),
        )
    })?;
    if view.getattr("readonly")?.extract::<bool>()? {
        return Err(bad(
            py,
            "readonly",
            "the KV pool buffer is read-only".into(),
        ));
    }
    if !view.getattr("c_contiguous")?.extract::<bool>()? {
        return Err(bad(
            py,
            "not-contiguous",
            "the KV pool buffer is not C-contiguous".into(),
        ));
    }
    let format: String = view.getattr("format")?.extract()?;
    let format = format.trim_start_matches(['@', '=', '<']);
    if format != layout.format() {
        let msg = format!(
            "the KV pool's element format is {format:?}; layout dtype {} needs {:?}",
            layout.dtype,
            layout.format()
        );
        return Err(bad(py, "dtype", msg));
    }
    let nbytes: u64 = view.getattr("nbytes")?.extract()?;
    let shape: Vec<u64> = view.getattr("shape")?.extract()?;
    let blocks = check_size(py, &shape, nbytes, layout)?;
    let ctypes = py.import("ctypes")?;
    let array_type = ctypes
        .getattr("c_char")?
        .call_method1("__mul__", (nbytes,))?;
    let holder = array_type.call_method1("from_buffer", (&view,))?;
    let addr: usize = ctypes.call_method1("addressof", (&holder,))?.extract()?;
    // SAFETY: the memory is `nbytes` bytes at `addr`, writable and contiguous (checked), and
    // stays exported by `view`/`holder` for as long as this `LentPool` lives; the transceiver
    // drops the pool only after the rank's driver thread (the only other user) is joined.
    let kv = unsafe { HostKv::lent(addr as *mut u8, blocks, layout.core.block_bytes()) };
    Ok(LentPool {
        kv: LentKv::Host(Arc::new(kv)),
        blocks,
        _keep: vec![view.unbind(), holder.unbind()],
    })
}

/// The pool's block count, if its size and shape (`shape`, in elements) fit the layout.
pub fn check_size(py: Python<'_>, shape: &[u64], nbytes: u64, layout: &Layout) -> PyResult<u32> {
    let bb = layout.core.block_bytes();
    if nbytes == 0 || nbytes % bb != 0 || nbytes / bb > u64::from(MAX_POOL_BLOCKS) {
        let msg = format!(
            "the KV pool has {nbytes} bytes: it must be a whole number of {bb}-byte blocks, 1..={MAX_POOL_BLOCKS} of them"
        );
        return Err(bad(py, "size", msg));
    }
    let blocks = (nbytes / bb) as u32;
    let (n, l, k, h, t, d) = layout.pool_shape(blocks);
    let paged = [n, l, k, h, t, d].map(u64::from);
    if shape.len() != 1 && shape != paged {
        let msg = format!(
            "the KV pool's shape is {shape:?}; the layout needs {paged:?} (blocks, layers, K/V, kv heads, tokens per block, head dim) or a flat buffer"
        );
        return Err(bad(py, "shape", msg));
    }
    Ok(blocks)
}
