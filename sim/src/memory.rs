//! Simulated KV memory of one rank: every block is a byte array, and every byte a request's
//! prefill writes is a pure function of (request, block index, layer, kv, head, position), so
//! the generation side can verify every byte it received (I6) without keeping a copy.

use kvferry_core::layout::CacheLayout;

/// Upper bound on one rank's simulated KV memory, so a bad scenario fails loudly, not slowly.
pub const MAX_MEMORY_BYTES: u64 = 64 << 20;

#[derive(Debug)]
pub struct RankMemory {
    layout: CacheLayout,
    bytes: Vec<u8>,
}

/// The byte a request's prefill puts at `pos` of the run (layer, kv, head) of its block `index`.
pub fn expected_byte(request: u64, index: u32, layer: u32, kv: u32, head: u32, pos: u64) -> u8 {
    // FNV-1a over the coordinates, then a cheap per-position mix: distinct requests and
    // positions give distinct bytes with overwhelming probability over a whole run.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in [
        request,
        u64::from(index),
        u64::from(layer),
        u64::from(kv),
        u64::from(head),
    ] {
        h ^= v;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let x = h ^ pos.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x ^ (x >> 29) ^ (x >> 47)) as u8
}

impl RankMemory {
    pub fn new(layout: CacheLayout, blocks: u32) -> RankMemory {
        let total = layout.block_bytes() * u64::from(blocks);
        assert!(
            total <= MAX_MEMORY_BYTES,
            "simulated KV memory of {total} bytes is too large"
        );
        RankMemory {
            layout,
            bytes: vec![0; total as usize],
        }
    }

    pub fn read(&self, offset: u64, out: &mut [u8]) {
        let o = offset as usize;
        out.copy_from_slice(&self.bytes[o..o + out.len()]);
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.bytes[o..o + data.len()].copy_from_slice(data);
    }

    /// Every (layer, kv, head) run of this rank in block-relative order: (layer, kv, head, offset).
    fn runs(&self) -> Vec<(u32, u32, u32, u64)> {
        let l = &self.layout;
        let mut out = Vec::new();
        for layer in l.local_layers() {
            for kv in 0..l.kv_factor() {
                for head in l.local_heads() {
                    out.push((layer, kv, head, l.offset_in_block(layer, kv, head, 0)));
                }
            }
        }
        out
    }

    /// "Prefill": writes the request's seeded bytes into its blocks (ids in token order).
    pub fn fill(&mut self, request: u64, block_ids: &[u32]) {
        let run = self.layout.head_run_bytes();
        let bb = self.layout.block_bytes();
        for (layer, kv, head, off) in self.runs() {
            for (index, id) in block_ids.iter().enumerate() {
                let base = (u64::from(*id) * bb + off) as usize;
                for pos in 0..run {
                    self.bytes[base + pos as usize] =
                        expected_byte(request, index as u32, layer, kv, head, pos);
                }
            }
        }
    }

    /// The first byte that differs from the request's seeded bytes, as a description.
    pub fn verify(&self, request: u64, block_ids: &[u32]) -> Option<String> {
        let run = self.layout.head_run_bytes();
        let bb = self.layout.block_bytes();
        for (layer, kv, head, off) in self.runs() {
            for (index, id) in block_ids.iter().enumerate() {
                let base = (u64::from(*id) * bb + off) as usize;
                for pos in 0..run {
                    let want = expected_byte(request, index as u32, layer, kv, head, pos);
                    let got = self.bytes[base + pos as usize];
                    if got != want {
                        return Some(format!(
                            "block {id} (index {index}) layer {layer} kv {kv} head {head} byte \
                             {pos}: got {got:#04x}, want {want:#04x}"
                        ));
                    }
                }
            }
        }
        None
    }
}
