//! Layouts of one rank (TP1/PP1): what the node's model flags describe, and what the host data
//! plane's tests use, so neither the node nor the host owns it.

use kvferry_core::layout::CacheLayout;

/// A TP1/PP1 layout from the CLI's model flags.
pub fn single_rank(
    layers: u32,
    kv_heads: u32,
    head_dim: u32,
    tokens_per_block: u32,
    dtype_bytes: u32,
) -> CacheLayout {
    CacheLayout {
        num_layers: layers,
        num_kv_heads: kv_heads,
        head_dim,
        tokens_per_block,
        dtype_bytes,
        tp_size: 1,
        tp_rank: 0,
        pp_size: 1,
        pp_rank: 0,
        mla: false,
    }
}
