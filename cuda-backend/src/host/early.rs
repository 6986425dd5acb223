//! Data chunks that arrive before their receive job is posted. A generation rank asks every
//! context rank for a request even while its own leg still waits for a staging slot, so on a
//! busy node the first chunks can beat the receive. They wait here, bounded in bytes; the
//! oldest go first when the bound is hit (chunks of cancelled requests end up there too).

use bytes::Bytes;
use kvferry_core::{PeerId, RequestId};
use std::collections::VecDeque;

/// Bytes of early chunks kept per node.
pub const MAX_EARLY_BYTES: usize = 64 << 20;

pub type Key = (RequestId, u32);

#[derive(Debug)]
pub struct Early {
    pub key: Key,
    pub from: PeerId,
    pub offset: u64,
    pub payload: Bytes,
}

#[derive(Debug, Default)]
pub struct EarlyData {
    q: VecDeque<Early>,
    bytes: usize,
    /// Chunks dropped to stay under the bound.
    pub dropped: u64,
}

impl EarlyData {
    pub fn push(&mut self, e: Early) {
        self.bytes += e.payload.len();
        self.q.push_back(e);
        while self.bytes > MAX_EARLY_BYTES {
            let old = self.q.pop_front().expect("bytes > 0 means entries");
            self.bytes -= old.payload.len();
            self.dropped += 1;
        }
    }

    /// Removes and returns the chunks of `key`, in arrival order.
    pub fn take(&mut self, key: Key) -> Vec<Early> {
        self.take_where(|e| e.key == key)
    }

    /// Forgets the chunks of a peer that is gone.
    pub fn forget_peer(&mut self, peer: PeerId) {
        self.take_where(|e| e.from == peer);
    }

    fn take_where(&mut self, pred: impl Fn(&Early) -> bool) -> Vec<Early> {
        if !self.q.iter().any(&pred) {
            return Vec::new();
        }
        let (hit, keep): (Vec<Early>, Vec<Early>) = self.q.drain(..).partition(|e| pred(e));
        self.q = keep.into();
        self.bytes -= hit.iter().map(|e| e.payload.len()).sum::<usize>();
        hit
    }
}
