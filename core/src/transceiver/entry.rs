//! A registered request and its legs: what the transceiver keeps per request.

use super::events::{FailCause, Side};
use crate::agent::TransferStatus;
use crate::blocks::BlockRef;
use crate::plan::TransferPlan;
use crate::request::Request;
use crate::staging::SlotGuard;
use crate::PeerId;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug)]
pub(super) enum LegState {
    /// Known, waiting for a staging slot since the given time; `queued` once in the wait queue.
    WaitingSlot {
        since: Duration,
        queued: bool,
    },
    InFlight {
        status: TransferStatus,
        slot: SlotGuard,
        pinned: Vec<BlockRef>,
    },
    Done,
    Failed,
    /// Evicted: slot poisoned, pins held until the agent's completion fences the job.
    Abandoned,
}

#[derive(Debug)]
pub(super) struct Leg {
    pub(super) peer: PeerId,
    pub(super) bytes: u64,
    pub(super) plan: Arc<TransferPlan>,
    pub(super) remote_blocks: Vec<BlockRef>,
    pub(super) state: LegState,
}

impl Leg {
    pub(super) fn is_open(&self) -> bool {
        matches!(
            self.state,
            LegState::WaitingSlot { .. } | LegState::InFlight { .. }
        )
    }
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) req: Arc<Request>,
    pub(super) side: Side,
    pub(super) enqueued_at: Duration,
    /// Legs keyed by the peer rank (generation rank on the context side and vice versa).
    pub(super) legs: BTreeMap<u32, Leg>,
    /// Context side: how many generation ranks will ask (known from the first RequestInfo).
    pub(super) expected_legs: Option<usize>,
    /// Set by the first abort: the request fails (or is cancelled) once no leg is open.
    pub(super) cause: Option<FailCause>,
    pub(super) cancelled: bool,
    pub(super) reported: bool,
    /// The timeout WARN fired for this enqueue (I4 dedup).
    pub(super) warned: bool,
    /// Keys of this entry in the timeout wheel, removed when it finishes.
    pub(super) timeout_keys: Vec<Duration>,
}

/// A peer the request is bound to may end it without presenting the token: a context rank the
/// generation side chose to read from (any rank of its source instance), or a generation rank
/// that proved the token in its `RequestInfo` (a leg's peer).
pub(super) fn is_bound(e: &Entry, from: PeerId) -> bool {
    let source = e.req.source.as_ref().map(|s| s.instance);
    source == Some(from.instance) || e.legs.values().any(|l| l.peer == from)
}

/// A request still needs `peer` when a leg with it is open: its bytes have not all moved.
/// A lost peer fails only such requests. A context rank whose part has landed (or that holds
/// no part for this rank) may go, as a context instance closing after its statuses does: its
/// ranks' connections end in any order, and a status means sent, not read by every reader.
pub(super) fn needs(e: &Entry, peer: PeerId) -> bool {
    e.legs.values().any(|l| l.peer == peer && l.is_open())
}
