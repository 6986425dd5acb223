//! How one rank stores its share of the KV cache.
//!
//! A rank holds layers `local_layers()` (pipeline split) and kv heads `local_heads()` (tensor
//! split; replicated when there are fewer kv heads than TP ranks, and for MLA's single latent
//! head). Inside a block the bytes are laid out `[layer][kv][head][token][head_dim * dtype]`,
//! with `kv` of extent 2 (K, V) or 1 for MLA (the latent holds both).

use serde::{Deserialize, Serialize};
use std::ops::Range;
use thiserror::Error;

/// Upper bounds that keep arithmetic in `u64` and plans of sane size. A layout beyond them is
/// rejected, not truncated.
pub const MAX_LAYERS: u32 = 1024;
pub const MAX_KV_HEADS: u32 = 1024;
pub const MAX_HEAD_DIM: u32 = 4096;
pub const MAX_TOKENS_PER_BLOCK: u32 = 1024;
pub const MAX_DTYPE_BYTES: u32 = 8;
pub const MAX_PARALLEL: u32 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct CacheLayout {
    /// Layers of the whole model (global, not per PP stage).
    pub num_layers: u32,
    /// KV heads of the whole model (global). MLA: exactly 1 (the latent).
    pub num_kv_heads: u32,
    pub head_dim: u32,
    pub tokens_per_block: u32,
    pub dtype_bytes: u32,
    pub tp_size: u32,
    pub tp_rank: u32,
    pub pp_size: u32,
    pub pp_rank: u32,
    pub mla: bool,
}

#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum LayoutError {
    #[error("{field} must be at least 1")]
    Zero { field: &'static str },
    #[error("{field} = {value} exceeds the limit {max}")]
    TooLarge {
        field: &'static str,
        value: u32,
        max: u32,
    },
    #[error("{field} = {rank} is out of range for size {size}")]
    RankOutOfRange {
        field: &'static str,
        rank: u32,
        size: u32,
    },
    #[error("num_layers = {layers} is not divisible by pp_size = {pp}")]
    LayersNotDivisible { layers: u32, pp: u32 },
    #[error("num_kv_heads = {heads} and tp_size = {tp}: one must divide the other")]
    HeadsNotDivisible { heads: u32, tp: u32 },
    #[error("MLA needs exactly one latent kv head, got num_kv_heads = {heads}")]
    MlaHeads { heads: u32 },
}

impl CacheLayout {
    /// Checks every field; all other methods assume a validated layout.
    // `u32::is_multiple_of` needs Rust 1.87; the workspace declares rust-version 1.85, which
    // clippy does not see because this crate does not inherit `rust-version`.
    #[allow(clippy::manual_is_multiple_of)]
    pub fn validate(&self) -> Result<(), LayoutError> {
        let bounded = [
            ("num_layers", self.num_layers, MAX_LAYERS),
            ("num_kv_heads", self.num_kv_heads, MAX_KV_HEADS),
            ("head_dim", self.head_dim, MAX_HEAD_DIM),
            (
                "tokens_per_block",
                self.tokens_per_block,
                MAX_TOKENS_PER_BLOCK,
            ),
            ("dtype_bytes", self.dtype_bytes, MAX_DTYPE_BYTES),
            ("tp_size", self.tp_size, MAX_PARALLEL),
            ("pp_size", self.pp_size, MAX_PARALLEL),
        ];
        for (field, value, max) in bounded {
            if value == 0 {
                return Err(LayoutError::Zero { field });
            }
            if value > max {
                return Err(LayoutError::TooLarge { field, value, max });
            }
        }
        if self.tp_rank >= self.tp_size {
            return Err(LayoutError::RankOutOfRange {
                field: "tp_rank",
                rank: self.tp_rank,
                size: self.tp_size,
            });
        }
        if self.pp_rank >= self.pp_size {
            return Err(LayoutError::RankOutOfRange {
                field: "pp_rank",
                rank: self.pp_rank,
                size: self.pp_size,
            });
        }
        if self.num_layers % self.pp_size != 0 {
            return Err(LayoutError::LayersNotDivisible {
                layers: self.num_layers,
                pp: self.pp_size,
            });
        }
        if self.mla {
            if self.num_kv_heads != 1 {
                return Err(LayoutError::MlaHeads {
                    heads: self.num_kv_heads,
                });
            }
        } else if self.num_kv_heads % self.tp_size != 0 && self.tp_size % self.num_kv_heads != 0 {
            return Err(LayoutError::HeadsNotDivisible {
                heads: self.num_kv_heads,
                tp: self.tp_size,
            });
        }
        Ok(())
    }

    /// Ranks in the instance (`tp_size * pp_size`).
    pub fn world_size(&self) -> u32 {
        self.tp_size * self.pp_size
    }

    /// `pp_rank * tp_size + tp_rank`.
    pub fn rank(&self) -> u32 {
        self.pp_rank * self.tp_size + self.tp_rank
    }

    /// The same instance layout seen from another rank.
    pub fn with_rank(&self, rank: u32) -> CacheLayout {
        assert!(rank < self.world_size(), "rank {rank} outside the instance");
        CacheLayout {
            tp_rank: rank % self.tp_size,
            pp_rank: rank / self.tp_size,
            ..*self
        }
    }

    /// 2 (K and V) or 1 (MLA latent).
    pub fn kv_factor(&self) -> u32 {
        if self.mla {
            1
        } else {
            2
        }
    }

    /// Global layer range held by this rank.
    pub fn local_layers(&self) -> Range<u32> {
        let per = self.num_layers / self.pp_size;
        self.pp_rank * per..(self.pp_rank + 1) * per
    }

    /// Global kv-head range held by this rank (replicated heads give a range of one).
    pub fn local_heads(&self) -> Range<u32> {
        if self.mla {
            return 0..1;
        }
        if self.num_kv_heads >= self.tp_size {
            let per = self.num_kv_heads / self.tp_size;
            self.tp_rank * per..(self.tp_rank + 1) * per
        } else {
            let replicas = self.tp_size / self.num_kv_heads;
            let head = self.tp_rank / replicas;
            head..head + 1
        }
    }

    /// Bytes of one token of one head (`head_dim * dtype_bytes`).
    pub fn token_bytes(&self) -> u64 {
        u64::from(self.head_dim) * u64::from(self.dtype_bytes)
    }

    /// Bytes of one (layer, kv, head) run of a block: all its tokens.
    pub fn head_run_bytes(&self) -> u64 {
        self.token_bytes() * u64::from(self.tokens_per_block)
    }

    /// Bytes of one KV block on this rank.
    pub fn block_bytes(&self) -> u64 {
        let layers = self.local_layers().len() as u64;
        let heads = self.local_heads().len() as u64;
        layers * u64::from(self.kv_factor()) * heads * self.head_run_bytes()
    }

    /// Byte offset inside a block of element (global layer, kv, global head, token).
    /// Panics if the element is not held by this rank: a caller asking for one is a plan bug.
    pub fn offset_in_block(&self, layer: u32, kv: u32, head: u32, token: u32) -> u64 {
        let layers = self.local_layers();
        let heads = self.local_heads();
        assert!(layers.contains(&layer), "layer {layer} not on this rank");
        assert!(heads.contains(&head), "head {head} not on this rank");
        assert!(kv < self.kv_factor() && token < self.tokens_per_block);
        let l = u64::from(layer - layers.start);
        let h = u64::from(head - heads.start);
        let nh = heads.len() as u64;
        let kvf = u64::from(self.kv_factor());
        ((l * kvf + u64::from(kv)) * nh + h) * self.head_run_bytes()
            + u64::from(token) * self.token_bytes()
    }

    /// True when two layouts describe the same model, so bytes can move between them.
    pub fn same_model(&self, other: &CacheLayout) -> bool {
        self.num_layers == other.num_layers
            && self.num_kv_heads == other.num_kv_heads
            && self.head_dim == other.head_dim
            && self.tokens_per_block == other.tokens_per_block
            && self.dtype_bytes == other.dtype_bytes
            && self.mla == other.mla
    }
}

/// The smallest valid layout (every size 1, one rank): for unit tests that need a layout but
/// not its shape.
#[cfg(test)]
pub(crate) fn unit_layout() -> CacheLayout {
    CacheLayout {
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: 1,
        tokens_per_block: 1,
        dtype_bytes: 1,
        tp_size: 1,
        tp_rank: 0,
        pp_size: 1,
        pp_rank: 0,
        mla: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama70b(tp: u32, pp: u32) -> CacheLayout {
        CacheLayout {
            num_layers: 80,
            num_kv_heads: 8,
            head_dim: 128,
            tokens_per_block: 32,
            dtype_bytes: 2,
            tp_size: tp,
            tp_rank: 0,
            pp_size: pp,
            pp_rank: 0,
            mla: false,
        }
    }

    #[test]
    fn block_bytes_split_by_tp_and_pp() {
        let full = llama70b(1, 1);
        assert_eq!(full.block_bytes(), 80 * 2 * 8 * 32 * 128 * 2);
        let split = llama70b(4, 2);
        assert_eq!(split.block_bytes(), full.block_bytes() / 8);
    }

    #[test]
    fn replicated_heads_map_to_one_head_each() {
        let l = CacheLayout {
            tp_size: 8,
            ..llama70b(8, 1)
        };
        let mut few = l;
        few.num_kv_heads = 2;
        assert_eq!(few.with_rank(3).local_heads(), 0..1);
        assert_eq!(few.with_rank(4).local_heads(), 1..2);
    }

    #[test]
    fn invalid_layouts_name_the_field() {
        let mut l = llama70b(1, 3);
        assert_eq!(
            l.validate(),
            Err(LayoutError::LayersNotDivisible { layers: 80, pp: 3 })
        );
        l.pp_size = 1;
        l.head_dim = 0;
        assert_eq!(l.validate(), Err(LayoutError::Zero { field: "head_dim" }));
        let mut h = llama70b(3, 1);
        h.num_kv_heads = 8;
        assert!(matches!(
            h.validate(),
            Err(LayoutError::HeadsNotDivisible { .. })
        ));
    }
}
