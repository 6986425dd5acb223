//! What a transceiver reports: events, failure causes, counters, status checks.

use crate::agent::TransferId;
use crate::collective::Contribution;
use crate::request::{Request, RequestState};
use crate::wire::ErrorCode;
use crate::{PeerId, RequestId};
use std::sync::Arc;
use std::time::Duration;

/// Which side of a transfer a request is on here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Context,
    Generation,
}

/// Why a request failed on this rank: the first thing that ended it. A driver's summary and the
/// simulator's progress check (I10) name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailCause {
    /// The caller cancelled it here (`cancel`).
    Cancelled,
    /// A peer ended it: a `Cancel` with the request's token, or an `Error` from a peer the
    /// request is bound to.
    PeerAborted,
    /// The agent failed a job, or refused to start one.
    Agent,
    /// No staging slot within `staging_wait_ms`, or the slot wait queue was full.
    NoSlot,
    /// The request's blocks were freed or reassigned before the transfer could pin them.
    BlocksGone,
    /// The generation side's plan or layout does not fit this rank's (no bytes can move).
    NoPlan,
    /// Past `kv_transfer_sender_future_timeout_ms`, or evicted past its deadline
    /// (`inflight_cancel`).
    Timeout,
    /// A control message the request depends on could not be sent.
    Unreachable,
}

impl FailCause {
    /// A short name for summaries and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            FailCause::Cancelled => "cancelled",
            FailCause::PeerAborted => "peer-aborted",
            FailCause::Agent => "agent",
            FailCause::NoSlot => "no-slot",
            FailCause::BlocksGone => "blocks-gone",
            FailCause::NoPlan => "no-plan",
            FailCause::Timeout => "timeout",
            FailCause::Unreachable => "unreachable",
        }
    }
}

/// What a driver may observe: for logs, metrics, traces and the simulator's checker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxEvent {
    Submitted {
        transfer: TransferId,
        request: RequestId,
        peer: PeerId,
        bytes: u64,
    },
    TransferDone {
        transfer: TransferId,
        request: RequestId,
        ok: bool,
    },
    /// The timeout WARN (I4): one per request per enqueue.
    TimeoutWarn {
        request: RequestId,
        side: Side,
        elapsed: Duration,
    },
    /// A transfer abandoned past its deadline: slot poisoned, pins kept until the fence.
    Evicted {
        transfer: TransferId,
        request: RequestId,
    },
    /// A peer's request was refused before any byte was served (I9).
    Rejected {
        peer: PeerId,
        request: RequestId,
        code: ErrorCode,
    },
    /// Finished on this rank; waits for the collective. `cause` is why it failed (None: ok).
    LocallyFinished {
        request: RequestId,
        ok: bool,
        cause: Option<FailCause>,
    },
    /// Agreed by every rank: the request is terminal and its resources may be released.
    Finished {
        request: RequestId,
        state: RequestState,
    },
    /// A peer live requests depended on was silent past `heartbeat_missed_limit`: lost, as if
    /// its connection had reset.
    PeerSilent { peer: PeerId },
}

/// Lifetime counters for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxCounters {
    pub transfers_started: u64,
    pub transfers_completed: u64,
    pub transfers_failed: u64,
    pub timeouts_warned: u64,
    pub evictions: u64,
    pub rejected: u64,
    pub bytes: u64,
    pub events_dropped: u64,
    /// Control messages dropped because the driver did not drain the outbox.
    pub transmits_dropped: u64,
    /// Peers lost because they stayed silent past `heartbeat_missed_limit` (`liveness`).
    pub peers_silent: u64,
    /// Peers a request depended on that were not watched: `MAX_WATCHED_PEERS` were already.
    pub peers_unwatched: u64,
}

/// The counters of several transceivers together (an instance's ranks, for its metrics). The
/// destructuring names every field, so a counter added later cannot be left out of the sum.
impl std::ops::AddAssign for TxCounters {
    fn add_assign(&mut self, o: TxCounters) {
        let TxCounters {
            transfers_started,
            transfers_completed,
            transfers_failed,
            timeouts_warned,
            evictions,
            rejected,
            bytes,
            events_dropped,
            transmits_dropped,
            peers_silent,
            peers_unwatched,
        } = o;
        self.transfers_started += transfers_started;
        self.transfers_completed += transfers_completed;
        self.transfers_failed += transfers_failed;
        self.timeouts_warned += timeouts_warned;
        self.evictions += evictions;
        self.rejected += rejected;
        self.bytes += bytes;
        self.events_dropped += events_dropped;
        self.transmits_dropped += transmits_dropped;
        self.peers_silent += peers_silent;
        self.peers_unwatched += peers_unwatched;
    }
}

/// What `check_*_status` hands the driver for this step's collective.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusCheck {
    pub contribution: Contribution,
    /// Locally finished count reached `at_least`. The driver may wait for more events before
    /// entering the collective, but it must enter it every step either way.
    pub satisfied: bool,
}

/// A request the collective ended, with its terminal state.
#[derive(Clone, Debug)]
pub struct Finished {
    pub request: Arc<Request>,
    pub state: RequestState,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cause_has_its_own_name() {
        let all = [
            FailCause::Cancelled,
            FailCause::PeerAborted,
            FailCause::Agent,
            FailCause::NoSlot,
            FailCause::BlocksGone,
            FailCause::NoPlan,
            FailCause::Timeout,
            FailCause::Unreachable,
        ];
        let mut names: Vec<&str> = all.iter().map(|c| c.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len());
        assert_eq!(FailCause::Timeout.name(), "timeout");
    }

    #[test]
    fn counters_add_field_by_field() {
        let a = TxCounters {
            transfers_started: 1,
            transfers_completed: 2,
            transfers_failed: 3,
            timeouts_warned: 4,
            evictions: 5,
            rejected: 6,
            bytes: 7,
            events_dropped: 8,
            transmits_dropped: 9,
            peers_silent: 10,
            peers_unwatched: 11,
        };
        let mut sum = a;
        sum += a;
        sum += TxCounters::default();
        assert_eq!(
            sum,
            TxCounters {
                transfers_started: 2,
                transfers_completed: 4,
                transfers_failed: 6,
                timeouts_warned: 8,
                evictions: 10,
                rejected: 12,
                bytes: 14,
                events_dropped: 16,
                transmits_dropped: 18,
                peers_silent: 20,
                peers_unwatched: 22,
            }
        );
    }
}
