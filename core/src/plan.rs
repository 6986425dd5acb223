//! Transfer plans: which bytes of which context rank land where on a generation rank.
//!
//! A plan is a pure function of the context instance's layout, one generation rank's layout and
//! the request's block pairs. It is built once per block as a template of fragments (offsets
//! inside a block) and expanded per block pair, so a 2,048-token request costs one template.
//!
//! Source choice when a head is held by several context ranks (replicated kv heads, or MLA's
//! latent on every TP rank): exactly one of them serves, picked as `gen_tp_rank % replicas`, so
//! the load spreads over replicas and the choice is deterministic.

use crate::layout::{CacheLayout, LayoutError};
use serde::Serialize;
use std::ops::Range;
use thiserror::Error;

/// Upper bound on blocks in one plan (a request of 1M tokens at 16 tokens per block).
pub const MAX_PLAN_BLOCKS: usize = 1 << 16;

/// A contiguous copy: `len` bytes from `src_offset` in context rank `src_rank`'s KV pool to
/// `dst_offset` in the generation rank's KV pool. Offsets are absolute within each pool
/// (`block_id * block_bytes + offset in block`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Fragment {
    pub src_rank: u32,
    pub src_offset: u64,
    pub dst_offset: u64,
    pub len: u64,
}

#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum PlanError {
    #[error("context layout: {0}")]
    Context(LayoutError),
    #[error("generation layout: {0}")]
    Generation(LayoutError),
    #[error("layouts describe different models ({field} differs)")]
    ModelMismatch { field: &'static str },
    #[error("{0} blocks exceed the plan limit {MAX_PLAN_BLOCKS}")]
    TooManyBlocks(usize),
    /// Block ids arrive from the peer: `id * block_bytes` must not wrap around to an offset
    /// that lands in another block.
    #[error("{side} block {block} of {block_bytes} bytes ends beyond the 64-bit offset range")]
    OffsetOverflow {
        side: &'static str,
        block: u32,
        block_bytes: u64,
    },
}

/// One (context rank, generation rank) pairing with the global layer and head ranges it carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlanPair {
    pub gen_rank: u32,
    pub ctx_rank: u32,
    pub layers: [u32; 2],
    pub heads: [u32; 2],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferPlan {
    ctx: CacheLayout,
    gen: CacheLayout,
    blocks: Vec<(u32, u32)>,
    /// Fragments of one block pair, offsets relative to the block starts.
    template: Vec<Fragment>,
}

fn mismatch(ctx: &CacheLayout, gen: &CacheLayout) -> Option<&'static str> {
    let fields: [(&'static str, bool); 6] = [
        ("num_layers", ctx.num_layers == gen.num_layers),
        ("num_kv_heads", ctx.num_kv_heads == gen.num_kv_heads),
        ("head_dim", ctx.head_dim == gen.head_dim),
        (
            "tokens_per_block",
            ctx.tokens_per_block == gen.tokens_per_block,
        ),
        ("dtype_bytes", ctx.dtype_bytes == gen.dtype_bytes),
        ("mla", ctx.mla == gen.mla),
    ];
    fields.iter().find(|(_, same)| !same).map(|(f, _)| *f)
}

/// Every block `id` must end, `(id + 1) * block_bytes`, inside `u64`, so `fragments()` can
/// compute absolute offsets without overflow checks.
fn check_offsets(
    side: &'static str,
    ids: impl Iterator<Item = u32>,
    block_bytes: u64,
) -> Result<(), PlanError> {
    match ids.max() {
        Some(block) if (u64::from(block) + 1).checked_mul(block_bytes).is_none() => {
            Err(PlanError::OffsetOverflow {
                side,
                block,
                block_bytes,
            })
        }
        _ => Ok(()),
    }
}

/// The context rank that serves (layer, head) to generation TP rank `gen_tp_rank`.
fn source_rank(ctx: &CacheLayout, layer: u32, head: u32, gen_tp_rank: u32) -> u32 {
    let pp = layer / (ctx.num_layers / ctx.pp_size);
    let tp = if ctx.mla {
        gen_tp_rank % ctx.tp_size
    } else if ctx.num_kv_heads >= ctx.tp_size {
        head / (ctx.num_kv_heads / ctx.tp_size)
    } else {
        let replicas = ctx.tp_size / ctx.num_kv_heads;
        head * replicas + gen_tp_rank % replicas
    };
    pp * ctx.tp_size + tp
}

impl TransferPlan {
    /// `ctx`: the context instance's layout (its rank fields are ignored); `gen`: the receiving
    /// generation rank; `blocks`: (context block id, generation block id) in token order.
    pub fn new(
        ctx: &CacheLayout,
        gen: &CacheLayout,
        blocks: &[(u32, u32)],
    ) -> Result<TransferPlan, PlanError> {
        let ctx = ctx.with_rank_unchecked(0);
        ctx.validate().map_err(PlanError::Context)?;
        gen.validate().map_err(PlanError::Generation)?;
        if let Some(field) = mismatch(&ctx, gen) {
            return Err(PlanError::ModelMismatch { field });
        }
        if blocks.len() > MAX_PLAN_BLOCKS {
            return Err(PlanError::TooManyBlocks(blocks.len()));
        }
        check_offsets("context", blocks.iter().map(|b| b.0), ctx.block_bytes())?;
        check_offsets("generation", blocks.iter().map(|b| b.1), gen.block_bytes())?;
        let mut template: Vec<Fragment> = Vec::new();
        for layer in gen.local_layers() {
            for kv in 0..gen.kv_factor() {
                for head in gen.local_heads() {
                    let src_rank = source_rank(&ctx, layer, head, gen.tp_rank);
                    let src = ctx.with_rank(src_rank);
                    let f = Fragment {
                        src_rank,
                        src_offset: src.offset_in_block(layer, kv, head, 0),
                        dst_offset: gen.offset_in_block(layer, kv, head, 0),
                        len: gen.head_run_bytes(),
                    };
                    // Coalesce runs contiguous on both sides (same TP: a block is one copy).
                    match template.last_mut() {
                        Some(last)
                            if last.src_rank == f.src_rank
                                && last.src_offset + last.len == f.src_offset
                                && last.dst_offset + last.len == f.dst_offset =>
                        {
                            last.len += f.len
                        }
                        _ => template.push(f),
                    }
                }
            }
        }
        Ok(TransferPlan {
            ctx,
            gen: *gen,
            blocks: blocks.to_vec(),
            template,
        })
    }

    pub fn ctx_layout(&self) -> &CacheLayout {
        &self.ctx
    }

    pub fn gen_layout(&self) -> &CacheLayout {
        &self.gen
    }

    pub fn blocks(&self) -> &[(u32, u32)] {
        &self.blocks
    }

    /// Fragments of one block pair, offsets inside the blocks.
    pub fn template(&self) -> &[Fragment] {
        &self.template
    }

    /// Context ranks that send to this generation rank, ascending.
    pub fn sources(&self) -> Vec<u32> {
        let mut s: Vec<u32> = self.template.iter().map(|f| f.src_rank).collect();
        s.sort_unstable();
        s.dedup();
        s
    }

    /// Every fragment with absolute pool offsets, block pair by block pair.
    pub fn fragments(&self) -> impl Iterator<Item = Fragment> + '_ {
        let src_block = self.ctx.block_bytes();
        let dst_block = self.gen.block_bytes();
        self.blocks.iter().flat_map(move |&(c, g)| {
            self.template.iter().map(move |f| Fragment {
                src_offset: u64::from(c) * src_block + f.src_offset,
                dst_offset: u64::from(g) * dst_block + f.dst_offset,
                ..*f
            })
        })
    }

    /// The fragments one context rank sends.
    pub fn fragments_from(&self, src_rank: u32) -> impl Iterator<Item = Fragment> + '_ {
        self.fragments().filter(move |f| f.src_rank == src_rank)
    }

    /// Bytes `src_rank` sends for the whole request.
    pub fn bytes_from(&self, src_rank: u32) -> u64 {
        let per_block: u64 = self
            .template
            .iter()
            .filter(|f| f.src_rank == src_rank)
            .map(|f| f.len)
            .sum();
        per_block * self.blocks.len() as u64
    }

    pub fn total_bytes(&self) -> u64 {
        self.gen.block_bytes() * self.blocks.len() as u64
    }

    /// Which global (layer, head) ranges this generation rank takes from which context rank:
    /// one pair per (context rank, layer range) with a contiguous head range.
    pub fn pairs(&self) -> Vec<PlanPair> {
        let g = &self.gen;
        let heads: Range<u32> = g.local_heads();
        let mut done: Vec<PlanPair> = Vec::new();
        // Pairs whose layer range ends at the current layer, in head order. Linear in
        // layers x heads: a 1,024-layer, 1,024-head layout must not go quadratic.
        let mut open: Vec<PlanPair> = Vec::new();
        let mut runs: Vec<PlanPair> = Vec::new();
        for layer in g.local_layers() {
            // This layer's heads, cut into runs served by one context rank each.
            runs.clear();
            for head in heads.clone() {
                let ctx_rank = source_rank(&self.ctx, layer, head, g.tp_rank);
                match runs.last_mut() {
                    Some(r) if r.ctx_rank == ctx_rank && r.heads[1] == head => r.heads[1] += 1,
                    _ => runs.push(PlanPair {
                        gen_rank: g.rank(),
                        ctx_rank,
                        layers: [layer, layer + 1],
                        heads: [head, head + 1],
                    }),
                }
            }
            // A run carrying the same heads from the same rank as the previous layer's run at
            // the same position extends that pair; anything else closes it.
            if runs.len() != open.len() {
                done.append(&mut open);
                std::mem::swap(&mut open, &mut runs);
                continue;
            }
            for (p, run) in open.iter_mut().zip(runs.drain(..)) {
                if p.ctx_rank == run.ctx_rank && p.heads == run.heads {
                    p.layers[1] = layer + 1;
                } else {
                    done.push(std::mem::replace(p, run));
                }
            }
        }
        done.append(&mut open);
        done.sort_by_key(|p| (p.gen_rank, p.ctx_rank, p.layers[0], p.heads[0]));
        done
    }
}

impl CacheLayout {
    /// `with_rank` without the range assertion, for normalising a layout before validation.
    fn with_rank_unchecked(&self, rank: u32) -> CacheLayout {
        CacheLayout {
            tp_rank: rank % self.tp_size.max(1),
            pp_rank: rank / self.tp_size.max(1),
            ..*self
        }
    }
}
