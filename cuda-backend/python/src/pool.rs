//! The engine's KV pool: any writable, C-contiguous buffer (a numpy array) whose element type
//! and size fit the layout, lent to the rank without a copy. Checked before anything points
//! into it, each refusal a `PoolError` naming what is wrong and what was expected. The buffer
//! stays exported (so it can neither be resized nor freed) for as long as this holds it.

use crate::errors::{error, PoolError};
use crate::layout::Layout;
use kvferry_backends::host::kv::HostKv;
use kvferry_backends::node::spec::MAX_POOL_BLOCKS;
use pyo3::prelude::*;
use std::sync::Arc;

/// A checked pool buffer and the export that keeps it in place.
#[derive(Debug)]
pub struct LentPool {
    pub kv: Arc<HostKv>,
    pub blocks: u32,
    /// The buffer's memoryview and the ctypes array over it that gave its address: while they
    /// live the buffer cannot move.
    _view: Py<PyAny>,
    _holder: Py<PyAny>,
}

fn bad(py: Python<'_>, reason: &str, msg: String) -> PyErr {
    error::<PoolError>(py, reason, msg)
}

/// Checks `obj` against `layout` and lends its memory.
pub fn lend(py: Python<'_>, obj: &Bound<'_, PyAny>, layout: &Layout) -> PyResult<LentPool> {
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
    let blocks = check_size(py, &view, nbytes, layout)?;
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
        kv: Arc::new(kv),
        blocks,
        _view: view.unbind(),
        _holder: holder.unbind(),
    })
}

/// The pool's block count, if its size and shape fit the layout.
fn check_size(
    py: Python<'_>,
    view: &Bound<'_, PyAny>,
    nbytes: u64,
    layout: &Layout,
) -> PyResult<u32> {
    let bb = layout.core.block_bytes();
    if nbytes == 0 || nbytes % bb != 0 || nbytes / bb > u64::from(MAX_POOL_BLOCKS) {
        let msg = format!(
            "the KV pool has {nbytes} bytes: it must be a whole number of {bb}-byte blocks, 1..={MAX_POOL_BLOCKS} of them"
        );
        return Err(bad(py, "size", msg));
    }
    let blocks = (nbytes / bb) as u32;
    let shape: Vec<u64> = view.getattr("shape")?.extract()?;
    let (n, l, k, h, t, d) = layout.pool_shape(blocks);
    let paged = [n, l, k, h, t, d].map(u64::from);
    if shape.len() != 1 && shape[..] != paged[..] {
        let msg = format!(
            "the KV pool's shape is {shape:?}; the layout needs {paged:?} (blocks, layers, K/V, kv heads, tokens per block, head dim) or a flat buffer"
        );
        return Err(bad(py, "shape", msg));
    }
    Ok(blocks)
}
