//! Context requests remembered after they ended, so a late `RequestInfo` is told at once that
//! the request is over instead of parking until `early_info_ttl_ms`, and a late abort is
//! recognised as moot. Bounded: the oldest is forgotten first.

use crate::{RequestId, TransferToken};
use std::collections::{HashMap, VecDeque};

/// Context requests remembered after they ended.
pub const MAX_TOMBSTONES: usize = 4096;

#[derive(Debug, Default)]
pub(crate) struct Tombstones {
    /// Oldest first: the forgetting order.
    order: VecDeque<RequestId>,
    /// The token of every id in `order`: the index a lookup uses.
    tokens: HashMap<RequestId, TransferToken>,
}

impl Tombstones {
    /// Remembers `id` as ended, forgetting the oldest past the bound.
    pub fn bury(&mut self, id: RequestId, token: TransferToken) {
        self.forget(id);
        if self.order.len() >= MAX_TOMBSTONES {
            let old = self.order.pop_front().expect("full, so not empty");
            self.tokens.remove(&old);
        }
        self.order.push_back(id);
        self.tokens.insert(id, token);
        self.assert_index();
    }

    /// An id registered again is live again.
    pub fn forget(&mut self, id: RequestId) {
        if self.tokens.remove(&id).is_some() {
            self.order.retain(|r| *r != id);
        }
        self.assert_index();
    }

    /// The token of an ended request, if it is still remembered.
    pub fn get(&self, id: RequestId) -> Option<TransferToken> {
        self.tokens.get(&id).copied()
    }

    /// Ended requests remembered now (at most [`MAX_TOMBSTONES`]).
    pub fn len(&self) -> usize {
        self.order.len()
    }

    fn assert_index(&self) {
        assert_eq!(
            self.order.len(),
            self.tokens.len(),
            "tombstone index out of step"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_oldest_forgotten_first_and_reburial_keeps_one() {
        let mut t = Tombstones::default();
        for i in 0..MAX_TOMBSTONES as u64 {
            t.bury(RequestId(i), TransferToken(u128::from(i)));
        }
        t.bury(RequestId(0), TransferToken(7)); // buried again: moves to the back
        t.bury(RequestId(1 << 40), TransferToken(1));
        assert_eq!(t.get(RequestId(0)), Some(TransferToken(7)));
        assert_eq!(t.get(RequestId(1)), None, "the oldest went");
        assert_eq!(t.order.len(), MAX_TOMBSTONES);
        t.forget(RequestId(0));
        assert_eq!(t.get(RequestId(0)), None);
    }
}
