//! Layouts of an instance's ranks (PP1): what the node's model flags describe, and what the host data
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
    sharded(layers, kv_heads, head_dim, tokens_per_block, dtype_bytes, 1)
}

/// Rank 0 of a TP `tp` / PP1 instance of the model the flags describe (`with_rank` gives the
/// others). Not validated: `kv_heads` and `tp` must divide one another.
pub fn sharded(
    layers: u32,
    kv_heads: u32,
    head_dim: u32,
    tokens_per_block: u32,
    dtype_bytes: u32,
    tp: u32,
) -> CacheLayout {
    CacheLayout {
        num_layers: layers,
        num_kv_heads: kv_heads,
        head_dim,
        tokens_per_block,
        dtype_bytes,
        tp_size: tp,
        tp_rank: 0,
        pp_size: 1,
        pp_rank: 0,
        mla: false,
    }
}
