//! Transfer plans from arbitrary layouts: `TransferPlan::new` either returns an error that
//! matches what is wrong with its input, or a plan whose fragments write every byte of every
//! destination block exactly once, each from the context rank and offset that hold the same
//! element (layer, K/V, head, token, byte) under the documented layout.
//!
//! Sizes are folded into small ranges (layers, heads, TP and PP up to 8/8/8/4, tiny head_dim
//! and blocks) so one execution checks every byte in well under a millisecond; a raw
//! `CacheLayout` may replace either side to reach the validation and overflow paths with any
//! field values.
#![no_main]

use arbitrary::Arbitrary;
use kvferry_core::layout::CacheLayout;
use kvferry_core::plan::{PlanError, TransferPlan};
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;

#[derive(Arbitrary, Debug)]
struct Model {
    layers: u8,
    heads: u8,
    head_dim: u8,
    tokens: u8,
    dtype: u8,
    mla: bool,
}

#[derive(Arbitrary, Debug)]
struct Parallel {
    tp: u8,
    tp_rank: u8,
    pp: u8,
    pp_rank: u8,
}

#[derive(Arbitrary, Debug)]
struct Input {
    model: Model,
    ctx: Parallel,
    gen: Parallel,
    /// Replace a side with raw field values (mostly invalid or mismatched).
    ctx_raw: Option<CacheLayout>,
    gen_raw: Option<CacheLayout>,
    /// (context block, generation block); folded small unless `raw_ids`.
    blocks: Vec<(u32, u32)>,
    raw_ids: bool,
}

/// Zero stays reachable (an invalid layout), the rest folds into 1..=max.
fn fold(v: u8, max: u8) -> u32 {
    u32::from(v % (max + 1))
}

fn small_layout(m: &Model, p: &Parallel) -> CacheLayout {
    let tp = fold(p.tp, 8);
    let pp = fold(p.pp, 4);
    CacheLayout {
        num_layers: fold(m.layers, 8),
        num_kv_heads: fold(m.heads, 8),
        head_dim: fold(m.head_dim, 4),
        tokens_per_block: fold(m.tokens, 4),
        dtype_bytes: fold(m.dtype, 2),
        tp_size: tp,
        // One past the size is reachable: an out-of-range rank must be an error.
        tp_rank: u32::from(p.tp_rank) % (tp + 1),
        pp_size: pp,
        pp_rank: u32::from(p.pp_rank) % (pp + 1),
        mla: m.mla,
    }
}

/// The element held at byte `off` of a block of rank `l`, derived from the documented layout
/// `[layer][kv][head][token][head_dim * dtype]` without calling the layout module.
fn element(l: &CacheLayout, off: u64) -> (u32, u32, u32, u64, u64) {
    let token_bytes = u64::from(l.head_dim) * u64::from(l.dtype_bytes);
    let run = token_bytes * u64::from(l.tokens_per_block);
    let kvf = if l.mla { 1 } else { 2 };
    let (local_heads, first_head) = if l.mla {
        (1, 0)
    } else if l.num_kv_heads >= l.tp_size {
        let per = l.num_kv_heads / l.tp_size;
        (per, l.tp_rank * per)
    } else {
        (1, l.tp_rank / (l.tp_size / l.num_kv_heads))
    };
    let local_layers = l.num_layers / l.pp_size;
    let idx = off / run;
    let (token, byte) = ((off % run) / token_bytes, off % token_bytes);
    let head = (idx % u64::from(local_heads)) as u32;
    let idx = idx / u64::from(local_heads);
    let kv = (idx % kvf) as u32;
    let layer = (idx / kvf) as u32;
    assert!(
        layer < local_layers,
        "offset {off} beyond the block of {l:?}"
    );
    (
        l.pp_rank * local_layers + layer,
        kv,
        first_head + head,
        token,
        byte,
    )
}

/// False when a valid layout is too big to check byte by byte.
fn small_enough(l: &CacheLayout) -> bool {
    let elems = [
        l.num_layers,
        l.num_kv_heads,
        l.head_dim,
        l.tokens_per_block,
        l.dtype_bytes,
    ]
    .iter()
    .fold(1u64, |acc, &v| acc.saturating_mul(u64::from(v)));
    elems <= 1 << 14 && l.tp_size <= 8 && l.pp_size <= 8
}

fn rank_layout(l: &CacheLayout, rank: u32) -> CacheLayout {
    CacheLayout {
        tp_rank: rank % l.tp_size,
        pp_rank: rank / l.tp_size,
        ..*l
    }
}

fn check(input: Input) {
    let ctx = input
        .ctx_raw
        .unwrap_or_else(|| small_layout(&input.model, &input.ctx));
    let gen = input
        .gen_raw
        .unwrap_or_else(|| small_layout(&input.model, &input.gen));
    // Generation block ids must be distinct (a request never holds a block twice); keep the
    // first occurrence. At most 8 pairs keeps one execution short.
    let mut seen = HashMap::new();
    let blocks: Vec<(u32, u32)> = input
        .blocks
        .iter()
        .map(|&(c, g)| {
            if input.raw_ids {
                (c, g)
            } else {
                (c % 16, g % 16)
            }
        })
        .filter(|&(_, g)| seen.insert(g, ()).is_none())
        .take(8)
        .collect();

    // The plan ignores the context side's rank fields; normalise them the same way.
    let ctx0 = CacheLayout {
        tp_rank: 0,
        pp_rank: 0,
        ..ctx
    };
    let valid = ctx0.validate().is_ok() && gen.validate().is_ok() && ctx0.same_model(&gen);
    if valid && !(small_enough(&ctx0) && small_enough(&gen)) {
        // Valid but huge: checking every byte would take seconds. Block offsets are checked
        // before any fragment is built, so the overflow path stays cheap and is still tried.
        let overflows = |ids: &mut dyn Iterator<Item = u32>, bb: u64| {
            ids.max()
                .is_some_and(|b| (u64::from(b) + 1).checked_mul(bb).is_none())
        };
        if overflows(&mut blocks.iter().map(|b| b.0), ctx0.block_bytes())
            || overflows(&mut blocks.iter().map(|b| b.1), gen.block_bytes())
        {
            let e = TransferPlan::new(&ctx, &gen, &blocks).unwrap_err();
            assert!(matches!(e, PlanError::OffsetOverflow { .. }), "{e}");
        }
        return;
    }

    let plan = match TransferPlan::new(&ctx, &gen, &blocks) {
        Ok(plan) => plan,
        Err(e) => {
            // The message must be printable (it goes to the peer and the log) and the variant
            // must match the first thing wrong with the input.
            assert!(!e.to_string().is_empty());
            match &e {
                PlanError::Context(le) => assert_eq!(ctx0.validate(), Err(le.clone())),
                PlanError::Generation(le) => {
                    assert!(ctx0.validate().is_ok());
                    assert_eq!(gen.validate(), Err(le.clone()));
                }
                PlanError::ModelMismatch { .. } => assert!(!ctx0.same_model(&gen)),
                PlanError::TooManyBlocks(_) => unreachable!("at most 8 blocks"),
                PlanError::OffsetOverflow {
                    side,
                    block,
                    block_bytes,
                } => {
                    assert!(valid, "overflow reported for invalid layouts: {e}");
                    assert!(
                        (u64::from(*block) + 1).checked_mul(*block_bytes).is_none(),
                        "{side}"
                    );
                }
            }
            return;
        }
    };
    assert!(valid, "plan built from invalid layouts {ctx:?} / {gen:?}");

    let ctx_bb = ctx0.block_bytes();
    let gen_bb = gen.block_bytes();
    let world = ctx0.world_size();
    // Write counts per destination block, keyed by generation block id.
    let mut written: HashMap<u32, Vec<u8>> = blocks
        .iter()
        .map(|&(_, g)| (g, vec![0u8; gen_bb as usize]))
        .collect();
    let src_block_of: HashMap<u32, u32> = blocks.iter().map(|&(c, g)| (g, c)).collect();
    let mut total = 0u64;
    for f in plan.fragments() {
        assert!(f.len > 0, "empty fragment {f:?}");
        assert!(f.src_rank < world, "source rank {} of {world}", f.src_rank);
        let g = u32::try_from(f.dst_offset / gen_bb).expect("destination block id fits u32");
        let dst_in = f.dst_offset % gen_bb;
        assert!(
            dst_in + f.len <= gen_bb,
            "fragment {f:?} crosses a destination block"
        );
        let c = *src_block_of
            .get(&g)
            .unwrap_or_else(|| panic!("fragment {f:?} writes block {g}, not in the request"));
        let src_in = f
            .src_offset
            .checked_sub(u64::from(c) * ctx_bb)
            .filter(|o| o + f.len <= ctx_bb)
            .unwrap_or_else(|| panic!("fragment {f:?} reads outside context block {c}"));
        let src = rank_layout(&ctx0, f.src_rank);
        let counts = written.get_mut(&g).unwrap();
        for i in 0..f.len {
            let n = &mut counts[(dst_in + i) as usize];
            *n = n.saturating_add(1);
            assert_eq!(
                element(&src, src_in + i),
                element(&gen, dst_in + i),
                "fragment {f:?} byte {i} carries the wrong element"
            );
        }
        total += f.len;
    }
    for (g, counts) in &written {
        if let Some(i) = counts.iter().position(|&n| n != 1) {
            panic!("block {g} byte {i} written {} times", counts[i]);
        }
    }
    assert_eq!(total, plan.total_bytes());
    let by_source: u64 = plan.sources().iter().map(|&r| plan.bytes_from(r)).sum();
    assert_eq!(
        by_source, total,
        "bytes_from over sources disagrees with the fragments"
    );
}

fuzz_target!(|input: Input| check(input));
