//! What a node is: its KV layout, pool size and transceiver configuration.

use kvferry_core::config::TransceiverConfig;
use kvferry_core::layout::CacheLayout;

/// Upper bound on `--blocks`: the pool lives in host memory.
pub const MAX_POOL_BLOCKS: u32 = 1 << 20;
/// The ctx node is instance 0, rank 0 (one process = one rank).
pub const CTX_INSTANCE: u32 = 0;
/// A ctx node names each accepted connection `GEN_INSTANCE_BASE + n`, rank 0.
pub const GEN_INSTANCE_BASE: u32 = 1;

#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub layout: CacheLayout,
    pub pool_blocks: u32,
    pub config: TransceiverConfig,
}

/// A TP1/PP1 layout from the CLI's model flags.
pub fn layout(
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
