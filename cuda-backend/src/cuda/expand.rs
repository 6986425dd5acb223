//! Device-side fragment expansion: what one launch needs to copy every fragment of one or more
//! plan legs without listing the fragments.
//!
//! Why: a plan is a template (one block pair's fragments, offsets inside the blocks) times the
//! request's block pairs. Expanding it on the host cost one descriptor per 64 KiB piece (up to
//! 41k fragments for a 2,048-token TP4 → TP1 request: about a MiB to build, write to pinned
//! memory and upload), which dominated a request's fixed cost (BENCHMARKS.md). Here each leg
//! uploads its template, cut into pieces, and its block pairs; the kernel (`KERNEL_SRC`,
//! `expand`) computes every piece's addresses from them, so the descriptor is a few KiB
//! whatever the request's length.

use super::error::CudaError;
use super::kernel::{split_into_pieces, CopyPiece, ExpandArgs, PIECE_BYTES};
use super::memory::Region;
use kvferry_core::plan::{Fragment, TransferPlan};

/// One leg as the kernel reads it (must match `struct Leg` in `KERNEL_SRC`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LegDesc {
    pub src_base: u64,
    pub dst_base: u64,
    pub src_block: u64,
    pub dst_block: u64,
    /// Work items (block pair × template piece) of the legs up to and including this one.
    pub items_end: u64,
    pub tmpl_start: u32,
    pub tmpl_count: u32,
    pub pair_start: u32,
    pub pad: u32,
}

pub const LEG_BYTES: usize = std::mem::size_of::<LegDesc>();
/// Bytes of one block pair as the kernel reads it (`uint2`).
const PAIR_BYTES: usize = 8;

/// The legs of one launch, built on the host (a few KiB, reused between launches).
#[derive(Debug, Default)]
pub struct Expansion {
    legs: Vec<LegDesc>,
    tmpl: Vec<CopyPiece>,
    pairs: Vec<[u32; 2]>,
    /// The current leg's template fragments (scratch).
    frags: Vec<Fragment>,
}

impl Expansion {
    pub fn clear(&mut self) {
        self.legs.clear();
        self.tmpl.clear();
        self.pairs.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.items() == 0
    }

    /// Work items of every leg so far: the grid-stride loop's length.
    pub fn items(&self) -> u64 {
        self.legs.last().map_or(0, |l| l.items_end)
    }

    /// The largest template piece of every leg so far (the launch shape is fitted to it).
    pub fn largest_piece(&self) -> u64 {
        self.tmpl.iter().map(|p| p.len).max().unwrap_or(0)
    }

    /// Adds the leg of `plan` that `src_rank` sends, from pool `src` to pool `dst`, each
    /// template fragment cut into pieces of at most `piece` bytes; returns the leg's bytes.
    /// A leg of no bytes adds nothing. Every fragment is checked against both regions first
    /// (`OutOfBounds` names the first one outside, as the plan orders them) and nothing is
    /// added if one is.
    pub fn add_leg(
        &mut self,
        plan: &TransferPlan,
        src_rank: u32,
        (src, dst): (&Region, &Region),
        piece: u64,
    ) -> Result<u64, CudaError> {
        self.frags.clear();
        self.frags
            .extend(plan.template().iter().filter(|f| f.src_rank == src_rank));
        let blocks = plan.blocks();
        let per_pair: u64 = self.frags.iter().map(|f| f.len).sum();
        if per_pair == 0 || blocks.is_empty() {
            return Ok(0);
        }
        // The block strides `TransferPlan::fragments` uses for absolute offsets.
        let src_block = plan.ctx_layout().block_bytes();
        let dst_block = plan.gen_layout().block_bytes();
        check_bounds(&self.frags, blocks, (src_block, dst_block), (src, dst))?;
        let tmpl_start = self.tmpl.len();
        for f in &self.frags {
            split_into_pieces(f.src_offset, f.dst_offset, f.len, piece, &mut self.tmpl);
        }
        let pair_start = self.pairs.len();
        self.pairs.extend(blocks.iter().map(|&(c, g)| [c, g]));
        let tmpl_count = (self.tmpl.len() - tmpl_start) as u64;
        self.legs.push(LegDesc {
            src_base: src.base(),
            dst_base: dst.base(),
            src_block,
            dst_block,
            items_end: self.items() + tmpl_count * blocks.len() as u64,
            tmpl_start: tmpl_start as u32,
            tmpl_count: tmpl_count as u32,
            pair_start: pair_start as u32,
            pad: 0,
        });
        Ok(per_pair * blocks.len() as u64)
    }

    /// Bytes `encode` writes.
    pub fn encoded_len(&self) -> usize {
        self.legs.len() * LEG_BYTES + self.tmpl.len() * PIECE_BYTES + self.pairs.len() * PAIR_BYTES
    }

    /// Writes legs, template pieces and block pairs into `out` (at least `encoded_len` bytes)
    /// in the kernel's layout, and returns the launch arguments for `out` uploaded at `at`.
    pub fn encode(&self, out: &mut [u8], at: u64) -> ExpandArgs {
        let mut w = 0;
        let mut put = |bytes: &[u8]| {
            out[w..w + bytes.len()].copy_from_slice(bytes);
            w += bytes.len();
        };
        for l in &self.legs {
            for x in [
                l.src_base,
                l.dst_base,
                l.src_block,
                l.dst_block,
                l.items_end,
            ] {
                put(&x.to_ne_bytes());
            }
            for x in [l.tmpl_start, l.tmpl_count, l.pair_start, l.pad] {
                put(&x.to_ne_bytes());
            }
        }
        for p in &self.tmpl {
            for x in [p.src, p.dst, p.len] {
                put(&x.to_ne_bytes());
            }
        }
        for p in &self.pairs {
            put(&p[0].to_ne_bytes());
            put(&p[1].to_ne_bytes());
        }
        let tmpl = at + (self.legs.len() * LEG_BYTES) as u64;
        ExpandArgs {
            legs: at,
            n_legs: self.legs.len() as u32,
            tmpl,
            pairs: tmpl + (self.tmpl.len() * PIECE_BYTES) as u64,
            items: self.items(),
        }
    }
}

/// Checks every fragment of the leg (`frags` at every block pair) against both regions: per
/// pair by the template's furthest end first, then fragment by fragment only for the first
/// pair that fails, so the error names the first fragment outside in the plan's order.
fn check_bounds(
    frags: &[Fragment],
    blocks: &[(u32, u32)],
    (src_block, dst_block): (u64, u64),
    (src, dst): (&Region, &Region),
) -> Result<(), CudaError> {
    let src_reach = frags
        .iter()
        .map(|f| f.src_offset + f.len)
        .max()
        .unwrap_or(0);
    let dst_reach = frags
        .iter()
        .map(|f| f.dst_offset + f.len)
        .max()
        .unwrap_or(0);
    // Block ids were checked by the plan: `(id + 1) * block_bytes` fits in u64, and a template
    // stays inside its block, so these sums cannot overflow.
    let fits = |&(c, g): &(u32, u32)| {
        u64::from(c) * src_block + src_reach <= src.len()
            && u64::from(g) * dst_block + dst_reach <= dst.len()
    };
    let Some(p) = blocks.iter().position(|b| !fits(b)) else {
        return Ok(());
    };
    let (c, g) = blocks[p];
    for (i, f) in frags.iter().enumerate() {
        for (side, offset, size) in [
            ("source", u64::from(c) * src_block + f.src_offset, src.len()),
            (
                "destination",
                u64::from(g) * dst_block + f.dst_offset,
                dst.len(),
            ),
        ] {
            if offset + f.len > size {
                return Err(CudaError::OutOfBounds {
                    index: p * frags.len() + i,
                    side,
                    offset,
                    len: f.len,
                    size,
                });
            }
        }
    }
    unreachable!("pair {p} fails the reach check, so one of its fragments is outside")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::single_rank;
    use kvferry_core::layout::CacheLayout;

    fn region(len: u64) -> Region {
        // SAFETY: never dereferenced; only base and length are read here.
        unsafe { Region::from_raw(1 << 40, len) }
    }

    /// Expanding the encoded legs the way the kernel does gives back exactly the plan's
    /// fragments of those ranks (as pieces), in the plan's order: TP4 → TP1, every source.
    #[test]
    fn expansion_reproduces_the_plan() {
        let ctx = CacheLayout {
            tp_size: 4,
            ..single_rank(4, 8, 16, 4, 2)
        };
        let gen = single_rank(4, 8, 16, 4, 2);
        let blocks = [(3, 0), (0, 5), (7, 2)];
        let plan = TransferPlan::new(&ctx, &gen, &blocks).unwrap();
        let (src, dst) = (region(8 * ctx.block_bytes()), region(8 * gen.block_bytes()));
        let mut e = Expansion::default();
        let mut want = Vec::new();
        for r in plan.sources() {
            let bytes = e.add_leg(&plan, r, (&src, &dst), 48).unwrap();
            assert_eq!(bytes, plan.bytes_from(r));
            for f in plan.fragments_from(r) {
                split_into_pieces(
                    src.base() + f.src_offset,
                    dst.base() + f.dst_offset,
                    f.len,
                    48,
                    &mut want,
                );
            }
        }
        let mut got = Vec::new();
        for i in 0..e.items() {
            let l = e.legs.iter().position(|l| i < l.items_end).unwrap();
            let g = e.legs[l];
            let local = i - if l == 0 { 0 } else { e.legs[l - 1].items_end };
            let (p, t) = (
                local / u64::from(g.tmpl_count),
                local % u64::from(g.tmpl_count),
            );
            let [c, d] = e.pairs[g.pair_start as usize + p as usize];
            let t = e.tmpl[g.tmpl_start as usize + t as usize];
            got.push(CopyPiece {
                src: g.src_base + u64::from(c) * g.src_block + t.src,
                dst: g.dst_base + u64::from(d) * g.dst_block + t.dst,
                len: t.len,
            });
        }
        let total = |v: &[CopyPiece]| v.iter().map(|p| p.len).sum::<u64>();
        assert_eq!(total(&got), plan.total_bytes());
        // Pieces are cut relative to the block, not the pool: compare byte maps, not cuts.
        let bytes = |v: &[CopyPiece]| -> Vec<(u64, u64)> {
            let mut m: Vec<(u64, u64)> = v
                .iter()
                .flat_map(|p| (0..p.len).map(move |k| (p.src + k, p.dst + k)))
                .collect();
            m.sort_unstable();
            m
        };
        assert!(
            bytes(&got) == bytes(&want),
            "the expansion moves other bytes than the plan"
        );
        // Two heads of 16 × 4 × 2 bytes per (layer, kv) and rank, cut at 48 bytes.
        assert_eq!(e.largest_piece(), 48);
        let mut out = vec![0u8; e.encoded_len()];
        let args = e.encode(&mut out, 4096);
        assert_eq!(args.n_legs, 4);
        assert_eq!(
            args.pairs,
            4096 + (e.encoded_len() - 3 * 4 * PAIR_BYTES) as u64
        );
        assert_eq!(&out[..8], &src.base().to_ne_bytes());
    }

    /// A pool too small for the last block pair: the error names that pair's first fragment
    /// outside, as the host expansion did, and nothing is added.
    #[test]
    fn out_of_bounds_names_the_first_fragment_outside() {
        let l = single_rank(2, 2, 16, 4, 2);
        let plan = TransferPlan::new(&l, &l, &[(0, 0), (1, 1), (2, 0)]).unwrap();
        let (src, dst) = (region(2 * l.block_bytes()), region(4 * l.block_bytes()));
        let mut e = Expansion::default();
        let err = e.add_leg(&plan, 0, (&src, &dst), 1 << 16).unwrap_err();
        let first = plan
            .fragments_from(0)
            .position(|f| f.src_offset + f.len > src.len());
        match err {
            CudaError::OutOfBounds { index, side, .. } => {
                assert_eq!(Some(index), first);
                assert_eq!(side, "source");
            }
            other => panic!("{other}"),
        }
        assert!(e.is_empty() && e.encoded_len() == 0);
    }
}
