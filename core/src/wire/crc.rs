//! The frames' CRC32C (Castagnoli). `crc-fast` folds with carry-less multiplies (PCLMULQDQ, or
//! VPCLMULQDQ where the CPU has it): on the host data plane every payload byte is checksummed
//! once on each side, and this runs about twice as fast as the SSE4.2 `crc32` loop of the
//! `crc32c` crate (19 vs 45 GiB/s for 64 KiB; see `benches/wire.rs`).

use crc_fast::{CrcAlgorithm, Digest};

/// A running CRC32C over bytes fed in order.
#[derive(Clone, Copy, Debug)]
pub struct Crc32c(Digest);

impl Crc32c {
    pub fn new() -> Crc32c {
        Crc32c(Digest::new(CrcAlgorithm::Crc32Iscsi))
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The CRC of everything fed so far.
    pub fn value(&self) -> u32 {
        // CRC-32 variants fit in the low 32 bits of crc-fast's u64 result.
        self.0.finalize() as u32
    }
}

impl Default for Crc32c {
    fn default() -> Self {
        Crc32c::new()
    }
}

/// CRC32C of `parts` laid end to end.
pub fn crc32c(parts: &[&[u8]]) -> u32 {
    let mut c = Crc32c::new();
    for p in parts {
        c.update(p);
    }
    c.value()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_implementation_across_splits() {
        let data: Vec<u8> = (0..70_000u32)
            .map(|i| i.wrapping_mul(2_654_435_761) as u8)
            .collect();
        let want = crc32c::crc32c(&data);
        for cut in [0, 1, 12, 4095, 65_536, data.len()] {
            assert_eq!(crc32c(&[&data[..cut], &data[cut..]]), want, "cut at {cut}");
        }
        // The standard check value of CRC-32/ISCSI.
        assert_eq!(crc32c(&[b"123456789"]), 0xE306_9283);
    }
}
