//! `kvferry.Layout`: a model's KV cache geometry over the `tp_size` ranks of one instance,
//! the shape of one rank's block (layers × K/V × the rank's kv heads × tokens per block × head
//! dim) and its element type.

use crate::errors::{error, ConfigError};
use kvferry_backends::layout::sharded;
use kvferry_backends::node::instance::MAX_LOCAL_RANKS;
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

/// A model's KV cache layout on an instance of `tp_size` ranks (PP1): the model's
/// `num_kv_heads` are split over the ranks (or, fewer heads than ranks, each replicated), and
/// every rank's pool holds blocks of `block_shape`.
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
    #[pyo3(get)]
    pub tp_size: u32,
    /// Rank 0's; `with_rank` gives the others (every rank's blocks have the same size).
    pub core: CacheLayout,
}

#[pymethods]
impl Layout {
    #[new]
    #[pyo3(signature = (num_layers, num_kv_heads, head_dim, tokens_per_block, dtype = "float16", mla = false, tp_size = 1))]
    #[allow(clippy::too_many_arguments)] // the Python constructor's keyword arguments
    fn new(
        py: Python<'_>,
        num_layers: u32,
        num_kv_heads: u32,
        head_dim: u32,
        tokens_per_block: u32,
        dtype: &str,
        mla: bool,
        tp_size: u32,
    ) -> PyResult<Layout> {
        let Some(&(_, dtype_bytes, _)) = DTYPES.iter().find(|d| d.0 == dtype) else {
            let names: Vec<&str> = DTYPES.iter().map(|d| d.0).collect();
            let msg = format!("dtype {dtype:?} is not one of {names:?}");
            return Err(error::<ConfigError>(py, "dtype", msg));
        };
        check_tp(py, num_kv_heads, tp_size, mla)?;
        let core = CacheLayout {
            mla,
            ..sharded(
                num_layers,
                num_kv_heads,
                head_dim,
                tokens_per_block,
                dtype_bytes,
                tp_size,
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
            tp_size,
            core,
        })
    }

    /// The global kv heads rank `rank` holds, as (first, end): its pool's heads, in order.
    fn rank_heads(&self, py: Python<'_>, rank: u32) -> PyResult<(u32, u32)> {
        if rank >= self.tp_size {
            let msg = format!("rank {rank} outside tp_size {}", self.tp_size);
            return Err(error::<ConfigError>(py, "rank", msg));
        }
        let h = self.core.with_rank(rank).local_heads();
        Ok((h.start, h.end))
    }

    /// Bytes of one KV block of one rank.
    #[getter]
    fn block_bytes(&self) -> u64 {
        self.core.block_bytes()
    }

    /// The shape of one rank's block: (layers, K/V, the rank's kv heads, tokens per block,
    /// head dim).
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

    /// The shape of one rank's pool of `num_blocks` blocks: (num_blocks, *block_shape).
    pub fn pool_shape(&self, num_blocks: u32) -> (u32, u32, u32, u32, u32, u32) {
        let (l, k, h, t, d) = self.block_shape();
        (num_blocks, l, k, h, t, d)
    }

    fn __repr__(&self) -> String {
        format!(
            "Layout(num_layers={}, num_kv_heads={}, head_dim={}, tokens_per_block={}, dtype={:?}, mla={}, tp_size={})",
            self.num_layers, self.num_kv_heads, self.head_dim, self.tokens_per_block, self.dtype,
            if self.mla { "True" } else { "False" }, self.tp_size
        )
    }
}

/// `tp_size` ranks of one process sharing `heads` kv heads: in range, and the heads split
/// evenly (or, fewer heads than ranks, each on the same number of ranks).
fn check_tp(py: Python<'_>, heads: u32, tp_size: u32, mla: bool) -> PyResult<()> {
    let max = MAX_LOCAL_RANKS as u32;
    let msg = if tp_size == 0 || tp_size > max {
        format!("tp_size {tp_size} is not 1..={max} (the ranks one process serves)")
    } else if !mla && heads != 0 && heads % tp_size != 0 && tp_size % heads != 0 {
        format!("num_kv_heads {heads} and tp_size {tp_size} must divide one another")
    } else {
        return Ok(());
    };
    Err(error::<ConfigError>(py, "tp_size", msg))
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
