//! `kvferry.Layout`: one rank's KV cache geometry, the shape of a block
//! (layers × K/V × kv heads × tokens per block × head dim) and its element type.

use crate::errors::{error, ConfigError};
use kvferry_backends::layout::single_rank;
use kvferry_core::layout::CacheLayout;
use pyo3::prelude::*;

/// Element types a pool may hold: name, bytes, and the buffer formats (Python `struct`
/// characters) that hold it. bfloat16 and float8 have no numpy dtype: pass them as uint16 /
/// uint8 views of the same memory.
const DTYPES: &[(&str, u32, &str)] = &[
    ("float16", 2, "e"),
    ("bfloat16", 2, "H"),
    ("float32", 4, "f"),
    ("float64", 8, "d"),
    ("int8", 1, "b"),
    ("uint8", 1, "B"),
    ("float8", 1, "B"),
];

/// One rank's KV cache layout (tensor and pipeline parallelism of one rank: TP1/PP1).
#[pyclass(frozen, module = "kvferry")]
#[derive(Clone, Debug)]
pub struct Layout {
    #[pyo3(get)]
    pub num_layers: u32,
    #[pyo3(get)]
    pub num_kv_heads: u32,
    #[pyo3(get)]
    pub head_dim: u32,
    #[pyo3(get)]
    pub tokens_per_block: u32,
    #[pyo3(get)]
    pub dtype: String,
    #[pyo3(get)]
    pub mla: bool,
    pub core: CacheLayout,
}

#[pymethods]
impl Layout {
    #[new]
    #[pyo3(signature = (num_layers, num_kv_heads, head_dim, tokens_per_block, dtype = "float16", mla = false))]
    fn new(
        py: Python<'_>,
        num_layers: u32,
        num_kv_heads: u32,
        head_dim: u32,
        tokens_per_block: u32,
        dtype: &str,
        mla: bool,
    ) -> PyResult<Layout> {
        let Some(&(_, dtype_bytes, _)) = DTYPES.iter().find(|d| d.0 == dtype) else {
            let names: Vec<&str> = DTYPES.iter().map(|d| d.0).collect();
            let msg = format!("dtype {dtype:?} is not one of {names:?}");
            return Err(error::<ConfigError>(py, "dtype", msg));
        };
        let core = CacheLayout {
            mla,
            ..single_rank(
                num_layers,
                num_kv_heads,
                head_dim,
                tokens_per_block,
                dtype_bytes,
            )
        };
        core.validate()
            .map_err(|e| error::<ConfigError>(py, "layout", format!("layout: {e}")))?;
        Ok(Layout {
            num_layers,
            num_kv_heads,
            head_dim,
            tokens_per_block,
            dtype: dtype.to_string(),
            mla,
            core,
        })
    }

    /// Bytes of one KV block.
    #[getter]
    fn block_bytes(&self) -> u64 {
        self.core.block_bytes()
    }

    /// The shape of one block: (layers, K/V, kv heads, tokens per block, head dim).
    #[getter]
    pub fn block_shape(&self) -> (u32, u32, u32, u32, u32) {
        let c = &self.core;
        let (l, h) = (c.local_layers().len(), c.local_heads().len());
        (
            l as u32,
            c.kv_factor(),
            h as u32,
            c.tokens_per_block,
            c.head_dim,
        )
    }

    /// The shape of a pool of `num_blocks` blocks: (num_blocks, *block_shape).
    pub fn pool_shape(&self, num_blocks: u32) -> (u32, u32, u32, u32, u32, u32) {
        let (l, k, h, t, d) = self.block_shape();
        (num_blocks, l, k, h, t, d)
    }

    fn __repr__(&self) -> String {
        format!(
            "Layout(num_layers={}, num_kv_heads={}, head_dim={}, tokens_per_block={}, dtype={:?}, mla={})",
            self.num_layers, self.num_kv_heads, self.head_dim, self.tokens_per_block, self.dtype,
            if self.mla { "True" } else { "False" }
        )
    }
}

impl Layout {
    /// The buffer format (a `struct` character) a pool of this dtype must have.
    pub fn format(&self) -> &'static str {
        DTYPES
            .iter()
            .find(|d| d.0 == self.dtype)
            .map(|d| d.2)
            .expect("a layout's dtype is in the table")
    }
}
