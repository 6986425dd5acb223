//! Seeded synthetic KV bytes: the ctx node fills a request's blocks from a per-request seed,
//! and the gen node recomputes them to verify every byte it received.
//!
//! The bytes of each (layer, kv, head) run are a function of the request's seed, the block's
//! position in the request and the run's *global* coordinates, never of where the run sits in
//! a rank's block: a ctx rank of TP2 and a gen rank of TP1 hold the same head at different
//! offsets, and agree on its bytes.

use kvferry_core::layout::CacheLayout;

/// One 64-bit mixing step (splitmix64): distinct seeds give unrelated streams.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Every (layer, kv, head) run of a block of `layout`'s rank: its seed and its byte range.
fn runs(
    seed: u64,
    index: u32,
    layout: &CacheLayout,
) -> impl Iterator<Item = (u64, std::ops::Range<usize>)> + '_ {
    let len = layout.head_run_bytes() as usize;
    let block = mix(seed ^ mix(u64::from(index) + 1));
    layout.local_layers().flat_map(move |layer| {
        (0..layout.kv_factor()).flat_map(move |kv| {
            layout.local_heads().map(move |head| {
                let at = layout.offset_in_block(layer, kv, head, 0) as usize;
                let coord = (u64::from(layer) << 40) | (u64::from(kv) << 32) | u64::from(head);
                (mix(block ^ mix(coord)), at..at + len)
            })
        })
    })
}

/// Fills `out` with the bytes of one run.
fn fill_run(mut state: u64, out: &mut [u8]) {
    for chunk in out.chunks_mut(8) {
        // xorshift64: fast and good enough to catch misplaced or stale bytes.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

/// Fills `out`, one block of `layout`'s rank, with the bytes of block `index` (position in
/// the request) of request `seed`.
pub fn fill(seed: u64, index: u32, layout: &CacheLayout, out: &mut [u8]) {
    assert_eq!(
        out.len() as u64,
        layout.block_bytes(),
        "one block of this rank"
    );
    for (state, range) in runs(seed, index, layout) {
        fill_run(state, &mut out[range]);
    }
}

/// True if `data` holds exactly the bytes `fill(seed, index, layout, ..)` writes.
pub fn verify(
    seed: u64,
    index: u32,
    layout: &CacheLayout,
    data: &[u8],
    scratch: &mut Vec<u8>,
) -> bool {
    scratch.resize(data.len(), 0);
    fill(seed, index, layout, scratch);
    scratch[..] == data[..]
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::layout::sharded;

    #[test]
    fn blocks_and_seeds_differ_and_verify() {
        let l = sharded(2, 2, 4, 3, 2, 1);
        let n = l.block_bytes() as usize;
        let (mut a, mut b) = (vec![0; n], vec![0; n]);
        fill(1, 0, &l, &mut a);
        fill(1, 1, &l, &mut b);
        assert_ne!(a, b);
        let mut s = Vec::new();
        assert!(verify(1, 0, &l, &a, &mut s));
        assert!(!verify(2, 0, &l, &a, &mut s));
    }

    /// A head's bytes are the same on whichever rank holds it: TP2's two blocks, laid side by
    /// side per (layer, kv), are TP1's block.
    #[test]
    fn a_head_has_the_same_bytes_on_every_rank() {
        let tp1 = sharded(3, 4, 8, 5, 2, 1);
        let tp2 = sharded(3, 4, 8, 5, 2, 2);
        let mut whole = vec![0; tp1.block_bytes() as usize];
        fill(9, 2, &tp1, &mut whole);
        let half = (tp2.block_bytes() / 6) as usize; // per (layer, kv): 2 heads of 4
        for rank in 0..2 {
            let l = tp2.with_rank(rank);
            let mut part = vec![0; l.block_bytes() as usize];
            fill(9, 2, &l, &mut part);
            for (i, run) in part.chunks(half).enumerate() {
                let at = i * 2 * half + rank as usize * half;
                assert_eq!(run, &whole[at..at + half], "rank {rank} run {i}");
            }
        }
    }
}
