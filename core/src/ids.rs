//! Small identifier types shared by every module.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A request, unique within a cluster for its lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "req#{}", self.0)
    }
}

/// An unguessable per-request secret. A context rank serves blocks only to a peer that
/// presents the token the scheduler attached to the request (invariant I9).
/// The core never generates one (it has no randomness); drivers draw it from their RNG.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct TransferToken(pub u128);

impl TransferToken {
    /// Whether `other` is this token, in time that does not depend on where they differ (no
    /// early exit on the first differing byte), so a peer guessing a token learns nothing from
    /// how long a refusal took.
    pub fn matches(self, other: TransferToken) -> bool {
        let x = self.0 ^ other.0;
        x.to_le_bytes().iter().fold(0u8, |acc, b| acc | b) == 0
    }
}

impl fmt::Debug for TransferToken {
    // Never print a secret in full: logs travel further than the cluster.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TransferToken({:04x}…)", (self.0 >> 112) as u16)
    }
}

/// A rank of an instance: `rank = pp_rank * tp_size + tp_rank` within `instance`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct PeerId {
    pub instance: u32,
    pub rank: u32,
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "i{}r{}", self.instance, self.rank)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_when_every_byte_does() {
        let t = |v| TransferToken(v);
        assert!(t(0).matches(t(0)));
        assert!(t(u128::MAX).matches(t(u128::MAX)));
        assert!(!t(5).matches(t(6)));
        // Two differing bytes whose differences cancel under xor still differ.
        assert!(!t(0).matches(t(0x0101)));
        assert!(!t(1 << 127).matches(t(0)));
    }
}
