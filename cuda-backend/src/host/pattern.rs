//! Seeded synthetic KV bytes: the ctx node fills a request's blocks from a per-request seed,
//! and the gen node recomputes them to verify every byte it received.

/// One 64-bit mixing step (splitmix64): distinct seeds give unrelated streams.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `out` with the bytes of block `index` (position in the request) of request `seed`.
pub fn fill(seed: u64, index: u32, out: &mut [u8]) {
    let mut state = mix(seed ^ mix(u64::from(index) + 1));
    for chunk in out.chunks_mut(8) {
        // xorshift64: fast and good enough to catch misplaced or stale bytes.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

/// True if `data` holds exactly the bytes `fill(seed, index, ..)` writes.
pub fn verify(seed: u64, index: u32, data: &[u8], scratch: &mut Vec<u8>) -> bool {
    scratch.resize(data.len(), 0);
    fill(seed, index, scratch);
    scratch[..] == data[..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_and_seeds_differ_and_verify() {
        let mut a = vec![0; 100];
        let mut b = vec![0; 100];
        fill(1, 0, &mut a);
        fill(1, 1, &mut b);
        assert_ne!(a, b);
        let mut s = Vec::new();
        assert!(verify(1, 0, &a, &mut s));
        assert!(!verify(2, 0, &a, &mut s));
    }
}
