//! Host references for tests and the bench: deterministic fill, plan application with memcpy,
//! and comparison. GPU results are checked against these, never against zeros.

use kvferry_core::plan::Fragment;

/// Destination poison: a byte no fill produces as a long run, and not zero (a copy that
/// silently does nothing must not pass).
pub const POISON: u8 = 0xA5;

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Pseudo-random bytes that depend on `seed` and the byte position, so another process can
/// regenerate a peer's pool from its seed alone.
pub fn fill_pattern(seed: u64, buf: &mut [u8]) {
    let key = splitmix64(seed);
    let mut chunks = buf.chunks_exact_mut(8);
    let mut i = 0u64;
    for c in &mut chunks {
        c.copy_from_slice(&splitmix64(key ^ i).to_le_bytes());
        i += 1;
    }
    let rest = chunks.into_remainder();
    let last = splitmix64(key ^ i).to_le_bytes();
    let n = rest.len();
    rest.copy_from_slice(&last[..n]);
}

/// Applies fragments with host memcpy: the reference result of a plan leg.
pub fn apply_fragments(src: &[u8], dst: &mut [u8], frags: impl IntoIterator<Item = Fragment>) {
    for f in frags {
        let (s, d, n) = (f.src_offset as usize, f.dst_offset as usize, f.len as usize);
        dst[d..d + n].copy_from_slice(&src[s..s + n]);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub first_offset: usize,
    pub bytes_differing: usize,
    pub expected: u8,
    pub actual: u8,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes differ, first at offset {} (expected {:#04x}, got {:#04x})",
            self.bytes_differing, self.first_offset, self.expected, self.actual
        )
    }
}

/// Byte-exact comparison.
pub fn compare(expected: &[u8], actual: &[u8]) -> Result<(), Mismatch> {
    assert_eq!(expected.len(), actual.len());
    if expected == actual {
        return Ok(());
    }
    let mut first = None;
    let mut count = 0;
    for (i, (e, a)) in expected.iter().zip(actual).enumerate() {
        if e != a {
            count += 1;
            first.get_or_insert((i, *e, *a));
        }
    }
    let (first_offset, expected, actual) = first.expect("slices differ");
    Err(Mismatch {
        first_offset,
        bytes_differing: count,
        expected,
        actual,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_seed_dependent() {
        let (mut a, mut b, mut c) = (vec![0u8; 1001], vec![0u8; 1001], vec![0u8; 1001]);
        fill_pattern(7, &mut a);
        fill_pattern(7, &mut b);
        fill_pattern(8, &mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().filter(|&&x| x == 0).count() < 20);
    }
}
