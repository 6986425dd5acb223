//! Runtime bug switches.
//!
//! Each switch re-introduces one historical lifecycle bug so the simulator can prove that its
//! invariant checker catches it. Switches are runtime flags, all off by default, and they can
//! only be turned on when the crate is built with the `bug-switches` feature: cargo unifies
//! features across a workspace, so a compile-time bug would leak into every test binary.

use std::fmt;
use std::str::FromStr;

/// One historical bug. The invariant it breaks is in `invariant()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bug {
    /// Release a request's resources on terminate while its transfer still runs (I1).
    ReleaseEarly,
    /// Skip the staging-slot release when a transfer fails mid-way (I2).
    LeakSlotOnError,
    /// Tear the agent down on executor recycle while statuses are pending (I3).
    DropAgentEarly,
    /// Warn on every poll past the timeout, not once per enqueue (I4).
    WarnNoDedup,
    /// Check elapsed time before readiness, so ready transfers get warned (I4).
    WarnBeforeReady,
    /// Free a request's blocks on error while a transfer still writes into them (I5).
    FreeBlocksDuringTransfer,
    /// Put a poisoned staging slot straight back into circulation (I6).
    ReusePoisonedSlot,
    /// A rank with nothing to report skips the completion collective (I7).
    SkipIdleCollective,
    /// Serve blocks without checking the transfer token (I9).
    SkipTokenCheck,
    /// End a request on any peer's abort, token or not (I9).
    AcceptAnyAbort,
    /// A generation rank asks the context rank for bytes before its receive is posted, so
    /// the send can start first and be refused (I10).
    AskBeforePosted,
    /// Heartbeats are neither sent nor checked: a peer that goes silent without a reset is
    /// never noticed, and what waits on it waits for ever (I7).
    IgnoreHeartbeats,
    /// On an in-flight abort, unpin the evicted write's blocks at once instead of at its
    /// fence, so the pages are freed and reused under the still-landing write (I5; SGLang
    /// #24527).
    AbortDuringWrite,
    /// A generation rank takes a failed receive for a finished one and serves the request as
    /// complete (I6; vLLM #52234).
    FailedTransferServed,
    /// In pull mode the context side's cancel (its timeout) completes the parked send at once,
    /// without waiting for the generation side's reads in flight: blocks are freed under a
    /// read (I5; vLLM #21570). Lives in the simulator's agent.
    TimeoutFreesWhileReading,
    /// A context request whose send waits for the peer's completion notification is exempt
    /// from every timeout, so one lost notification hangs it forever (I10; TensorRT-LLM
    /// #17665).
    LostNotification,
    /// A context rank whose blocks were evicted before its send swallows the pin error and
    /// sends from the evicted blocks anyway (I5; TensorRT-LLM #12542).
    EvictedBeforeSend,
    /// A generation rank reaches a restarted context peer through its cached endpoint (same
    /// address, new incarnation) and reads whatever that incarnation holds there (I6; vLLM
    /// #49238). Lives in the simulator's agent.
    StaleEndpoint,
    /// The fence of an evicted (aborted) transfer never unpins its blocks, so they are never
    /// reclaimed (I2; vLLM #46283).
    AbortNeverReclaimed,
    /// A job's completion is looked up in the transfer table but never removed from it, so
    /// the table grows with every transfer the rank ever ran (I11).
    TransferTableLeak,
}

impl Bug {
    pub const ALL: [Bug; 20] = [
        Bug::ReleaseEarly,
        Bug::LeakSlotOnError,
        Bug::DropAgentEarly,
        Bug::WarnNoDedup,
        Bug::WarnBeforeReady,
        Bug::FreeBlocksDuringTransfer,
        Bug::ReusePoisonedSlot,
        Bug::SkipIdleCollective,
        Bug::SkipTokenCheck,
        Bug::AcceptAnyAbort,
        Bug::AskBeforePosted,
        Bug::IgnoreHeartbeats,
        Bug::AbortDuringWrite,
        Bug::FailedTransferServed,
        Bug::TimeoutFreesWhileReading,
        Bug::LostNotification,
        Bug::EvictedBeforeSend,
        Bug::StaleEndpoint,
        Bug::AbortNeverReclaimed,
        Bug::TransferTableLeak,
    ];

    /// The CLI name (`kvferry sim --inject-bug NAME`).
    pub fn name(self) -> &'static str {
        match self {
            Bug::ReleaseEarly => "release-early",
            Bug::LeakSlotOnError => "leak-slot-on-error",
            Bug::DropAgentEarly => "drop-agent-early",
            Bug::WarnNoDedup => "warn-no-dedup",
            Bug::WarnBeforeReady => "warn-before-ready",
            Bug::FreeBlocksDuringTransfer => "free-blocks-during-transfer",
            Bug::ReusePoisonedSlot => "reuse-poisoned-slot",
            Bug::SkipIdleCollective => "skip-idle-collective",
            Bug::SkipTokenCheck => "skip-token-check",
            Bug::AcceptAnyAbort => "accept-any-abort",
            Bug::AskBeforePosted => "ask-before-posted",
            Bug::IgnoreHeartbeats => "ignore-heartbeats",
            Bug::AbortDuringWrite => "abort-during-write",
            Bug::FailedTransferServed => "failed-transfer-served",
            Bug::TimeoutFreesWhileReading => "timeout-frees-while-reading",
            Bug::LostNotification => "lost-notification",
            Bug::EvictedBeforeSend => "evicted-before-send",
            Bug::StaleEndpoint => "stale-endpoint",
            Bug::AbortNeverReclaimed => "abort-never-reclaimed",
            Bug::TransferTableLeak => "transfer-table-leak",
        }
    }

    /// The invariant of DESIGN.md that this bug violates.
    pub fn invariant(self) -> &'static str {
        match self {
            Bug::ReleaseEarly => "I1",
            Bug::LeakSlotOnError => "I2",
            Bug::DropAgentEarly => "I3",
            Bug::WarnNoDedup | Bug::WarnBeforeReady => "I4",
            Bug::FreeBlocksDuringTransfer => "I5",
            Bug::ReusePoisonedSlot => "I6",
            Bug::SkipIdleCollective => "I7",
            Bug::SkipTokenCheck | Bug::AcceptAnyAbort => "I9",
            Bug::AskBeforePosted => "I10",
            Bug::IgnoreHeartbeats => "I7",
            Bug::AbortDuringWrite | Bug::TimeoutFreesWhileReading | Bug::EvictedBeforeSend => "I5",
            Bug::FailedTransferServed | Bug::StaleEndpoint => "I6",
            Bug::LostNotification => "I10",
            Bug::AbortNeverReclaimed => "I2",
            Bug::TransferTableLeak => "I11",
        }
    }
}

impl fmt::Display for Bug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown bug switch {0:?}; known: release-early, leak-slot-on-error, drop-agent-early, warn-no-dedup, warn-before-ready, free-blocks-during-transfer, reuse-poisoned-slot, skip-idle-collective, skip-token-check, accept-any-abort, ask-before-posted, ignore-heartbeats, abort-during-write, failed-transfer-served, timeout-frees-while-reading, lost-notification, evicted-before-send, stale-endpoint, abort-never-reclaimed, transfer-table-leak")]
pub struct UnknownBug(pub String);

impl FromStr for Bug {
    type Err = UnknownBug;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Bug::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| UnknownBug(s.to_string()))
    }
}

/// The set of switches turned on for one component. Without the `bug-switches` feature it is
/// always empty and `has` compiles to `false`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BugSet {
    #[cfg(feature = "bug-switches")]
    bits: u32,
}

impl BugSet {
    pub const NONE: BugSet = BugSet {
        #[cfg(feature = "bug-switches")]
        bits: 0,
    };

    #[inline]
    pub fn has(&self, bug: Bug) -> bool {
        #[cfg(feature = "bug-switches")]
        {
            self.bits & (1 << bug as u32) != 0
        }
        #[cfg(not(feature = "bug-switches"))]
        {
            let _ = bug;
            false
        }
    }

    /// Turns one switch on. Only exists with the `bug-switches` feature.
    #[cfg(feature = "bug-switches")]
    pub fn with(self, bug: Bug) -> BugSet {
        BugSet {
            bits: self.bits | (1 << bug as u32),
        }
    }

    pub fn is_empty(&self) -> bool {
        Bug::ALL.iter().all(|b| !self.has(*b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for b in Bug::ALL {
            assert_eq!(b.name().parse::<Bug>(), Ok(b));
        }
        assert!("nope".parse::<Bug>().is_err());
    }

    #[test]
    fn empty_set_has_nothing() {
        assert!(Bug::ALL.iter().all(|b| !BugSet::NONE.has(*b)));
    }

    #[test]
    fn every_switch_has_its_own_name_and_an_invariant() {
        let mut names: Vec<&str> = Bug::ALL.iter().map(|b| b.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Bug::ALL.len());
        for b in Bug::ALL {
            assert_eq!(b.to_string(), b.name());
            assert!(b.invariant().starts_with('I'), "{b}");
            // The error lists every known name.
            assert!(UnknownBug("x".into()).to_string().contains(b.name()), "{b}");
        }
        assert_eq!(Bug::WarnBeforeReady.invariant(), "I4");
        assert_eq!(Bug::AcceptAnyAbort.invariant(), "I9");
        assert_eq!("nope".parse::<Bug>(), Err(UnknownBug("nope".to_string())));
        assert!(BugSet::NONE.is_empty());
        assert_eq!(BugSet::default(), BugSet::NONE);
    }

    #[cfg(feature = "bug-switches")]
    #[test]
    fn with_turns_on_only_that_switch() {
        for b in Bug::ALL {
            let s = BugSet::NONE.with(b);
            assert!(!s.is_empty());
            for other in Bug::ALL {
                assert_eq!(s.has(other), other == b, "{b} set, {other} asked");
            }
            let two = s.with(Bug::SkipTokenCheck);
            assert!(two.has(b) && two.has(Bug::SkipTokenCheck));
        }
    }
}
