//! Property tests of transfer plans against an independent model of the KV layout.
//!
//! The model below re-derives, from the documented layout alone (rank = pp_rank * tp + tp_rank,
//! contiguous layer split over PP, contiguous head split over TP with replication when there are
//! fewer kv heads than TP ranks, bytes `[layer][kv][head][token][head_dim * dtype]`), which
//! element every byte of every rank's pool holds. It deliberately does not call
//! `CacheLayout::offset_in_block` / `local_layers` / `local_heads`: a plan that agrees with the
//! layout module but not with the documented layout must fail here.
//!
//! Each context pool is filled with element tags, the plan's fragments are applied as memcpys
//! into an empty generation pool, and every destination byte must then be written exactly once
//! with the tag of the element the generation rank is supposed to hold there.

use kvferry_core::layout::{CacheLayout, LayoutError};
use kvferry_core::plan::{Fragment, PlanError, PlanPair, TransferPlan, MAX_PLAN_BLOCKS};
use proptest::prelude::*;
use proptest::sample::{select, subsequence};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

/// The model's shape, independent of any rank.
#[derive(Clone, Copy, Debug)]
struct Model {
    layers: u32,
    heads: u32,
    head_dim: u32,
    tokens: u32,
    dtype: u32,
    mla: bool,
}

/// One element of the KV cache: (layer, kv, head, token, byte within the token's head vector).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Element {
    layer: u32,
    kv: u32,
    head: u32,
    token: u32,
    byte: u32,
}

impl Model {
    fn kv_factor(&self) -> u32 {
        if self.mla {
            1
        } else {
            2
        }
    }

    fn token_bytes(&self) -> u64 {
        u64::from(self.head_dim * self.dtype)
    }

    fn layout(&self, tp: u32, pp: u32, rank: u32) -> CacheLayout {
        CacheLayout {
            num_layers: self.layers,
            num_kv_heads: self.heads,
            head_dim: self.head_dim,
            tokens_per_block: self.tokens,
            dtype_bytes: self.dtype,
            tp_size: tp,
            tp_rank: rank % tp,
            pp_size: pp,
            pp_rank: rank / tp,
            mla: self.mla,
        }
    }

    /// Layers held by `rank` of a (tp, pp) instance.
    fn layers_of(&self, tp: u32, pp: u32, rank: u32) -> Range<u32> {
        let stage = rank / tp;
        let per = self.layers / pp;
        stage * per..stage * per + per
    }

    /// Kv heads held by `rank` of a (tp, pp) instance.
    fn heads_of(&self, tp: u32, rank: u32) -> Range<u32> {
        let t = rank % tp;
        if self.mla {
            0..1
        } else if self.heads >= tp {
            let per = self.heads / tp;
            t * per..t * per + per
        } else {
            // Fewer heads than ranks: consecutive TP ranks share (replicate) one head.
            let h = t / (tp / self.heads);
            h..h + 1
        }
    }

    fn block_bytes(&self, tp: u32, pp: u32) -> u64 {
        let l = u64::from(self.layers / pp);
        let h = self.heads_of(tp, 0).len() as u64;
        l * u64::from(self.kv_factor()) * h * u64::from(self.tokens) * self.token_bytes()
    }

    /// The element at byte `off` of a block on `rank`.
    fn element_at(&self, tp: u32, pp: u32, rank: u32, off: u64) -> Element {
        let layers = self.layers_of(tp, pp, rank);
        let heads = self.heads_of(tp, rank);
        let tb = self.token_bytes();
        let run = tb * u64::from(self.tokens);
        let idx = off / run;
        let in_run = off % run;
        let nh = heads.len() as u64;
        let kvf = u64::from(self.kv_factor());
        let h = idx % nh;
        let kv = (idx / nh) % kvf;
        let l = idx / nh / kvf;
        assert!(l < layers.len() as u64, "offset {off} beyond the block");
        Element {
            layer: layers.start + l as u32,
            kv: kv as u32,
            head: heads.start + h as u32,
            token: (in_run / tb) as u32,
            byte: (in_run % tb) as u32,
        }
    }

    /// A tag unique to (block, element); 0 is left for "never written".
    fn tag(&self, block: u32, e: Element) -> u64 {
        let mut t = u64::from(block);
        t = t * u64::from(self.layers) + u64::from(e.layer);
        t = t * 2 + u64::from(e.kv);
        t = t * u64::from(self.heads) + u64::from(e.head);
        t = t * u64::from(self.tokens) + u64::from(e.token);
        t = t * self.token_bytes() + u64::from(e.byte);
        t + 1
    }
}

#[derive(Clone, Debug)]
struct Case {
    model: Model,
    ctx_tp: u32,
    ctx_pp: u32,
    gen_tp: u32,
    gen_pp: u32,
    /// (context block, generation block); generation blocks are distinct.
    blocks: Vec<(u32, u32)>,
}

/// One pool per context rank, each byte holding the tag of its (block, element).
fn context_pools(c: &Case, max_block: u32) -> Vec<Vec<u64>> {
    let m = &c.model;
    let bb = m.block_bytes(c.ctx_tp, c.ctx_pp);
    (0..c.ctx_tp * c.ctx_pp)
        .map(|rank| {
            (0..=max_block)
                .flat_map(|b| {
                    (0..bb).map(move |off| m.tag(b, m.element_at(c.ctx_tp, c.ctx_pp, rank, off)))
                })
                .collect()
        })
        .collect()
}

/// Layers and heads of each pair, expanded to a (layer, head) -> context rank map; panics on a
/// (layer, head) named twice.
fn pair_sources(pairs: &[PlanPair]) -> BTreeMap<(u32, u32), u32> {
    let mut map = BTreeMap::new();
    for p in pairs {
        assert!(
            p.layers[0] < p.layers[1] && p.heads[0] < p.heads[1],
            "empty pair {p:?}"
        );
        for l in p.layers[0]..p.layers[1] {
            for h in p.heads[0]..p.heads[1] {
                let prev = map.insert((l, h), p.ctx_rank);
                assert!(prev.is_none(), "({l}, {h}) in two pairs: {pairs:?}");
            }
        }
    }
    map
}

/// Builds the plan of every generation rank and checks it byte by byte against the model.
fn check_case(c: &Case) {
    let m = &c.model;
    let ctx = m.layout(c.ctx_tp, c.ctx_pp, 0);
    let max_ctx_block = c.blocks.iter().map(|b| b.0).max().unwrap_or(0);
    let pools = context_pools(c, max_ctx_block);
    for g in 0..c.gen_tp * c.gen_pp {
        let gen = m.layout(c.gen_tp, c.gen_pp, g);
        let plan = TransferPlan::new(&ctx, &gen, &c.blocks).expect("valid case");
        assert_eq!(
            plan.gen_layout().block_bytes(),
            m.block_bytes(c.gen_tp, c.gen_pp),
            "gen block size"
        );
        assert_eq!(
            plan.ctx_layout().block_bytes(),
            m.block_bytes(c.ctx_tp, c.ctx_pp),
            "ctx block size"
        );
        let frags: Vec<Fragment> = plan.fragments().collect();
        check_bytes(c, &pools, g, &frags);
        let sources = check_accounting(c, &plan, &frags);
        check_pairs(c, g, &plan, &sources);
        if m.mla {
            check_mla_sources(c, g, &sources);
        }
        check_deterministic(c, &gen, &plan, &frags);
    }
}

/// Applies the fragments as memcpys: every byte of every destination block is written once,
/// with the right element of the right context block; bytes of other blocks never.
fn check_bytes(c: &Case, pools: &[Vec<u64>], g: u32, frags: &[Fragment]) {
    let m = &c.model;
    let gen_bb = m.block_bytes(c.gen_tp, c.gen_pp);
    let ctx_world = c.ctx_tp * c.ctx_pp;
    let max_gen_block = c.blocks.iter().map(|b| b.1).max().unwrap_or(0);
    let gen_len = ((u64::from(max_gen_block) + 1) * gen_bb) as usize;
    let mut dst = vec![0u64; gen_len];
    let mut writes = vec![0u8; gen_len];
    for f in frags {
        assert!(f.len > 0, "empty fragment {f:?}");
        assert!(
            f.src_rank < ctx_world,
            "source rank outside the instance: {f:?}"
        );
        let src = &pools[f.src_rank as usize];
        let (s, d, n) = (f.src_offset as usize, f.dst_offset as usize, f.len as usize);
        assert!(s + n <= src.len(), "source out of the pool: {f:?}");
        assert!(d + n <= dst.len(), "destination out of the pool: {f:?}");
        dst[d..d + n].copy_from_slice(&src[s..s + n]);
        for w in &mut writes[d..d + n] {
            *w += 1;
        }
    }

    let ctx_of: BTreeMap<u32, u32> = c.blocks.iter().map(|&(cb, gb)| (gb, cb)).collect();
    for gb in 0..=max_gen_block {
        for off in 0..gen_bb {
            let i = (u64::from(gb) * gen_bb + off) as usize;
            match ctx_of.get(&gb) {
                Some(&cb) => {
                    let e = m.element_at(c.gen_tp, c.gen_pp, g, off);
                    assert_eq!(writes[i], 1, "gen rank {g} block {gb} byte {off} ({e:?})");
                    assert_eq!(
                        dst[i],
                        m.tag(cb, e),
                        "gen rank {g} block {gb} byte {off} expected {e:?} of ctx block {cb}"
                    );
                }
                None => assert_eq!(writes[i], 0, "gen rank {g} block {gb} not requested"),
            }
        }
    }
}

/// Accounting agrees with the fragments, and the template is fully coalesced. Returns the
/// plan's source ranks.
fn check_accounting(c: &Case, plan: &TransferPlan, frags: &[Fragment]) -> BTreeSet<u32> {
    let gen_bb = c.model.block_bytes(c.gen_tp, c.gen_pp);
    let template = plan.template();
    assert_eq!(frags.len(), template.len() * c.blocks.len());
    assert_eq!(plan.total_bytes(), gen_bb * c.blocks.len() as u64);
    assert_eq!(frags.iter().map(|f| f.len).sum::<u64>(), plan.total_bytes());
    let sources: BTreeSet<u32> = template.iter().map(|f| f.src_rank).collect();
    assert_eq!(plan.sources(), sources.iter().copied().collect::<Vec<_>>());
    for r in 0..c.ctx_tp * c.ctx_pp {
        let from: Vec<Fragment> = plan.fragments_from(r).collect();
        let want: Vec<Fragment> = frags.iter().filter(|f| f.src_rank == r).copied().collect();
        assert_eq!(from, want, "fragments_from({r})");
        assert_eq!(
            plan.bytes_from(r),
            want.iter().map(|f| f.len).sum::<u64>(),
            "bytes_from({r})"
        );
    }
    // Coalescing is complete: no two consecutive template fragments could have been one.
    for w in template.windows(2) {
        let mergeable = w[0].src_rank == w[1].src_rank
            && w[0].src_offset + w[0].len == w[1].src_offset
            && w[0].dst_offset + w[0].len == w[1].dst_offset;
        assert!(!mergeable, "uncoalesced fragments {:?}", w);
    }
    sources
}

/// pairs(): sorted, all for this generation rank, a partition of what it holds, the rank each
/// pair names is the rank the fragments read those (layer, head)s from, and as few pairs as
/// the ranges allow.
fn check_pairs(c: &Case, g: u32, plan: &TransferPlan, sources: &BTreeSet<u32>) {
    let m = &c.model;
    let template = plan.template();
    let pairs = plan.pairs();
    assert!(pairs.iter().all(|p| p.gen_rank == g));
    let keys: Vec<_> = pairs
        .iter()
        .map(|p| (p.gen_rank, p.ctx_rank, p.layers[0], p.heads[0]))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    assert_eq!(keys, sorted, "pairs not sorted");
    let by_pair = pair_sources(&pairs);
    let held: BTreeSet<(u32, u32)> = m
        .layers_of(c.gen_tp, c.gen_pp, g)
        .flat_map(|l| m.heads_of(c.gen_tp, g).map(move |h| (l, h)))
        .collect();
    assert_eq!(by_pair.keys().copied().collect::<BTreeSet<_>>(), held);
    for f in template {
        for off in f.dst_offset..f.dst_offset + f.len {
            let e = m.element_at(c.gen_tp, c.gen_pp, g, off);
            assert_eq!(
                by_pair[&(e.layer, e.head)],
                f.src_rank,
                "pairs() disagree with fragment {f:?} at {e:?}"
            );
        }
    }
    // And as few pairs as the ranges allow: none could be merged with another.
    for (i, a) in pairs.iter().enumerate() {
        for b in &pairs[i + 1..] {
            let same = a.ctx_rank == b.ctx_rank;
            let layer_join =
                a.heads == b.heads && (a.layers[1] == b.layers[0] || b.layers[1] == a.layers[0]);
            let head_join =
                a.layers == b.layers && (a.heads[1] == b.heads[0] || b.heads[1] == a.heads[0]);
            assert!(
                !(same && (layer_join || head_join)),
                "mergeable {a:?} {b:?}"
            );
        }
    }
    let pair_ranks: BTreeSet<u32> = pairs.iter().map(|p| p.ctx_rank).collect();
    assert_eq!(&pair_ranks, sources, "pairs() and sources() disagree");
}

/// Exactly one context rank serves each (layer, head) of this generation rank (the pair map
/// is a function, checked in `check_pairs`). For MLA that means one rank per context PP stage
/// the generation rank's layers span: never two TP replicas of the same stage.
fn check_mla_sources(c: &Case, g: u32, sources: &BTreeSet<u32>) {
    let m = &c.model;
    let stages: BTreeSet<u32> = m
        .layers_of(c.gen_tp, c.gen_pp, g)
        .map(|l| l / (m.layers / c.ctx_pp))
        .collect();
    assert_eq!(sources.len(), stages.len(), "MLA: one source per stage");
    let src_stages: BTreeSet<u32> = sources.iter().map(|r| r / c.ctx_tp).collect();
    assert_eq!(src_stages, stages);
}

/// Deterministic, and the context layout's rank fields do not matter.
fn check_deterministic(c: &Case, gen: &CacheLayout, plan: &TransferPlan, frags: &[Fragment]) {
    let m = &c.model;
    let ctx = m.layout(c.ctx_tp, c.ctx_pp, 0);
    let again = TransferPlan::new(&ctx, gen, &c.blocks).unwrap();
    assert_eq!(&again, plan);
    assert_eq!(again.fragments().collect::<Vec<_>>(), frags.to_vec());
    let other_rank = m.layout(c.ctx_tp, c.ctx_pp, c.ctx_tp * c.ctx_pp - 1);
    assert_eq!(
        TransferPlan::new(&other_rank, gen, &c.blocks).unwrap(),
        *plan
    );
}

fn case_strategy() -> impl Strategy<Value = Case> {
    let par = (
        select(vec![1u32, 2, 4, 8]),
        select(vec![1u32, 2, 4]),
        select(vec![1u32, 2, 4, 8]),
        select(vec![1u32, 2, 4]),
    );
    let shape = (
        1u32..=3,
        select(vec![1u32, 2, 4, 8, 16]),
        any::<bool>(),
        1u32..=3,
        1u32..=3,
        select(vec![1u32, 2]),
    );
    // Distinct generation blocks in random order, each fed from any context block (repeats
    // allowed: nothing stops two generation blocks from copying the same prefix block).
    let blocks = (
        subsequence((0u32..6).collect::<Vec<_>>(), 0..=4).prop_shuffle(),
        proptest::collection::vec(0u32..5, 4),
    );
    (par, shape, blocks).prop_map(
        |(
            (ctx_tp, ctx_pp, gen_tp, gen_pp),
            (mult, heads, mla, head_dim, tokens, dtype),
            (g, c),
        )| {
            // PP sizes are powers of two, so the larger one is their lcm.
            let layers = ctx_pp.max(gen_pp) * mult;
            Case {
                model: Model {
                    layers,
                    heads: if mla { 1 } else { heads },
                    head_dim,
                    tokens,
                    dtype,
                    mla,
                },
                ctx_tp,
                ctx_pp,
                gen_tp,
                gen_pp,
                blocks: c.into_iter().zip(g).collect(),
            }
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn plans_copy_every_element_exactly_once(c in case_strategy()) {
        check_case(&c);
    }

    /// Any layouts at all: `new` never panics, and succeeds exactly when both layouts are valid
    /// (context rank fields aside) and describe the same model.
    #[test]
    fn new_accepts_exactly_valid_matching_layouts(
        a in layout_strategy(),
        b in layout_strategy(),
        same in any::<bool>(),
    ) {
        // Half the time force a matching model so the success path is exercised too.
        let b = if same {
            CacheLayout { tp_size: b.tp_size, tp_rank: b.tp_rank, pp_size: b.pp_size,
                          pp_rank: b.pp_rank, ..a }
        } else {
            b
        };
        let ctx0 = CacheLayout { tp_rank: 0, pp_rank: 0, ..a };
        let r = TransferPlan::new(&a, &b, &[(0, 0), (1, 1)]);
        match (ctx0.validate(), b.validate()) {
            (Err(e), _) => prop_assert_eq!(r, Err(PlanError::Context(e))),
            (Ok(()), Err(e)) => prop_assert_eq!(r, Err(PlanError::Generation(e))),
            (Ok(()), Ok(())) if a.same_model(&b) => { prop_assert!(r.is_ok()); }
            (Ok(()), Ok(())) => {
                prop_assert!(matches!(r, Err(PlanError::ModelMismatch { .. })), "{:?}", r);
            }
        }
    }
}

fn layout_strategy() -> impl Strategy<Value = CacheLayout> {
    (
        (0u32..=9, 0u32..=5, 0u32..=2, 0u32..=2, 0u32..=2),
        (0u32..=5, 0u32..=5, 0u32..=4, 0u32..=4, any::<bool>()),
    )
        .prop_map(
            |((num_layers, num_kv_heads, head_dim, tokens_per_block, dtype_bytes), p)| {
                let (tp_size, tp_rank, pp_size, pp_rank, mla) = p;
                CacheLayout {
                    num_layers,
                    num_kv_heads,
                    head_dim,
                    tokens_per_block,
                    dtype_bytes,
                    tp_size,
                    tp_rank,
                    pp_size,
                    pp_rank,
                    mla,
                }
            },
        )
}

/// Every TP {1,2,4,8} x PP {1,2,4} pairing on both sides, for every head count (fewer and more
/// than TP) and MLA, with the smallest element so the sweep stays fast. The proptest above
/// samples the same space with larger shapes; this makes sure no combination is skipped.
#[test]
fn every_parallelism_combination() {
    let tps = [1u32, 2, 4, 8];
    let pps = [1u32, 2, 4];
    let shapes = [
        (1, false),
        (2, false),
        (4, false),
        (8, false),
        (16, false),
        (1, true),
    ];
    for &(heads, mla) in &shapes {
        for &ctx_tp in &tps {
            for &ctx_pp in &pps {
                for &gen_tp in &tps {
                    for &gen_pp in &pps {
                        check_case(&Case {
                            model: Model {
                                layers: 4,
                                heads,
                                head_dim: 1,
                                tokens: 2,
                                dtype: 1,
                                mla,
                            },
                            ctx_tp,
                            ctx_pp,
                            gen_tp,
                            gen_pp,
                            blocks: vec![(2, 1), (0, 0)],
                        });
                    }
                }
            }
        }
    }
}

fn base(tp: u32, pp: u32) -> CacheLayout {
    CacheLayout {
        num_layers: 8,
        num_kv_heads: 4,
        head_dim: 16,
        tokens_per_block: 4,
        dtype_bytes: 2,
        tp_size: tp,
        tp_rank: 0,
        pp_size: pp,
        pp_rank: 0,
        mla: false,
    }
}

#[test]
fn mismatched_models_name_the_field() {
    let ctx = base(2, 1);
    let gen = base(1, 2);
    let cases: [(&str, CacheLayout); 5] = [
        (
            "num_layers",
            CacheLayout {
                num_layers: 4,
                ..gen
            },
        ),
        (
            "num_kv_heads",
            CacheLayout {
                num_kv_heads: 8,
                ..gen
            },
        ),
        ("head_dim", CacheLayout { head_dim: 8, ..gen }),
        (
            "tokens_per_block",
            CacheLayout {
                tokens_per_block: 8,
                ..gen
            },
        ),
        (
            "dtype_bytes",
            CacheLayout {
                dtype_bytes: 1,
                ..gen
            },
        ),
    ];
    for (field, g) in cases {
        assert_eq!(
            TransferPlan::new(&ctx, &g, &[(0, 0)]),
            Err(PlanError::ModelMismatch { field })
        );
    }
    let mla = CacheLayout {
        num_kv_heads: 1,
        mla: true,
        ..gen
    };
    let plain = CacheLayout {
        num_kv_heads: 1,
        ..ctx
    };
    assert_eq!(
        TransferPlan::new(&plain, &mla, &[(0, 0)]),
        Err(PlanError::ModelMismatch { field: "mla" })
    );
}

#[test]
fn invalid_layouts_are_errors_on_either_side() {
    let ok = base(2, 2);
    let bad_layers = CacheLayout {
        num_layers: 6,
        pp_size: 4,
        ..ok
    };
    let bad_heads = CacheLayout {
        num_kv_heads: 6,
        tp_size: 4,
        ..ok
    };
    let zero = CacheLayout { head_dim: 0, ..ok };
    let bad_mla = CacheLayout { mla: true, ..ok };
    let bad_rank = CacheLayout { tp_rank: 2, ..ok };
    assert_eq!(
        TransferPlan::new(&bad_layers, &ok, &[]),
        Err(PlanError::Context(LayoutError::LayersNotDivisible {
            layers: 6,
            pp: 4
        }))
    );
    assert_eq!(
        TransferPlan::new(&ok, &bad_heads, &[]),
        Err(PlanError::Generation(LayoutError::HeadsNotDivisible {
            heads: 6,
            tp: 4
        }))
    );
    assert_eq!(
        TransferPlan::new(&zero, &ok, &[]),
        Err(PlanError::Context(LayoutError::Zero { field: "head_dim" }))
    );
    assert_eq!(
        TransferPlan::new(&ok, &bad_mla, &[]),
        Err(PlanError::Generation(LayoutError::MlaHeads { heads: 4 }))
    );
    // The generation rank is the receiver: its rank must exist. The context's is ignored.
    assert!(matches!(
        TransferPlan::new(&ok, &bad_rank, &[]),
        Err(PlanError::Generation(LayoutError::RankOutOfRange { .. }))
    ));
    assert!(TransferPlan::new(&bad_rank, &ok, &[]).is_ok());
    let too_many = vec![(0u32, 0u32); MAX_PLAN_BLOCKS + 1];
    assert_eq!(
        TransferPlan::new(&ok, &ok, &too_many),
        Err(PlanError::TooManyBlocks(MAX_PLAN_BLOCKS + 1))
    );
}

/// Block ids come from the peer's request; with a large layout, `id * block_bytes` must not
/// wrap around to an offset that lands inside someone else's block.
#[test]
fn block_offsets_that_overflow_are_rejected() {
    let huge = CacheLayout {
        num_layers: 1024,
        num_kv_heads: 1024,
        head_dim: 4096,
        tokens_per_block: 1024,
        dtype_bytes: 8,
        ..base(1, 1)
    };
    assert_eq!(huge.block_bytes(), 1 << 46);
    assert!(matches!(
        TransferPlan::new(&huge, &huge, &[(0, u32::MAX)]),
        Err(PlanError::OffsetOverflow { .. })
    ));
    assert!(matches!(
        TransferPlan::new(&huge, &huge, &[(u32::MAX, 0)]),
        Err(PlanError::OffsetOverflow { .. })
    ));
    // The largest id whose block still ends inside u64.
    let max_ok = u32::try_from(u64::MAX / (1 << 46) - 1).unwrap();
    let plan = TransferPlan::new(&huge, &huge, &[(max_ok, max_ok)]).unwrap();
    let f = plan.fragments().last().unwrap();
    assert_eq!(f.dst_offset + f.len, (u64::from(max_ok) + 1) << 46);
}

/// A plain TP8 -> TP4 example checked by hand, so the properties above are not vacuous.
#[test]
fn tp8_to_tp4_by_hand() {
    let ctx = base(8, 1);
    let ctx = CacheLayout {
        num_kv_heads: 8,
        ..ctx
    };
    let gen = CacheLayout {
        tp_size: 4,
        tp_rank: 1,
        ..ctx
    };
    let plan = TransferPlan::new(&ctx, &gen, &[(5, 3)]).unwrap();
    assert_eq!(plan.sources(), vec![2, 3]);
    // One fragment per (layer, kv, head): heads 2 and 3 live on different context ranks.
    assert_eq!(plan.template().len(), 8 * 2 * 2);
    let run = 16 * 4 * 2;
    let first = plan.fragments().next().unwrap();
    assert_eq!(
        first,
        Fragment {
            src_rank: 2,
            src_offset: 5 * ctx.block_bytes(),
            dst_offset: 3 * gen.block_bytes(),
            len: run,
        }
    );
    assert_eq!(
        plan.pairs(),
        vec![
            PlanPair {
                gen_rank: 1,
                ctx_rank: 2,
                layers: [0, 8],
                heads: [2, 3]
            },
            PlanPair {
                gen_rank: 1,
                ctx_rank: 3,
                layers: [0, 8],
                heads: [3, 4]
            },
        ]
    );
}

/// The documented replica choice (`gen_tp_rank % replicas`) spreads the send load: with equal
/// TP on both sides every generation rank of an MLA model reads from its own context rank.
#[test]
fn replicated_sources_spread_over_replicas() {
    let mla = CacheLayout {
        num_kv_heads: 1,
        mla: true,
        ..base(8, 1)
    };
    let srcs: BTreeSet<u32> = (0..8)
        .map(|g| {
            let plan = TransferPlan::new(&mla, &mla.with_rank(g), &[(0, 0)]).unwrap();
            assert_eq!(plan.sources().len(), 1);
            plan.sources()[0]
        })
        .collect();
    assert_eq!(srcs.len(), 8);
    // Two kv heads over TP8: four replicas each; gen TP8 ranks 0..4 hold head 0.
    let few = CacheLayout {
        num_kv_heads: 2,
        ..base(8, 1)
    };
    let srcs: BTreeSet<u32> = (0..4)
        .flat_map(|g| {
            TransferPlan::new(&few, &few.with_rank(g), &[(0, 0)])
                .unwrap()
                .sources()
        })
        .collect();
    assert_eq!(srcs, (0..4).collect());
}

/// The largest layout the limits allow still plans in well under a second (debug build): the
/// plan and `pairs()` are linear in layers x heads.
#[test]
fn largest_layout_plans_quickly() {
    let ctx = CacheLayout {
        num_layers: 1024,
        num_kv_heads: 1024,
        head_dim: 1,
        tokens_per_block: 1,
        dtype_bytes: 1,
        tp_size: 64,
        tp_rank: 0,
        pp_size: 64,
        pp_rank: 0,
        mla: false,
    };
    let gen = CacheLayout {
        tp_size: 1,
        pp_size: 1,
        ..ctx
    };
    let t = std::time::Instant::now();
    let plan = TransferPlan::new(&ctx, &gen, &[(0, 0)]).unwrap();
    let pairs = plan.pairs();
    // 64 stages x 64 TP ranks, each one pair of 16 layers x 16 heads.
    assert_eq!(pairs.len(), 64 * 64);
    assert!(pairs
        .iter()
        .all(|p| p.layers[1] - p.layers[0] == 16 && p.heads[1] - p.heads[0] == 16));
    assert_eq!(plan.sources().len(), 64 * 64);
    let elapsed = t.elapsed();
    assert!(elapsed.as_secs() < 10, "took {elapsed:?}");
}
