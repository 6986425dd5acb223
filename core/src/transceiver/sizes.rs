//! Sizes: how many entries each of the transceiver's tables and queues holds now, and the bound
//! each is kept under. Read-only, for metrics and for the simulator's growth check (a table
//! that grows with the requests it has seen, rather than with those it holds, is a leak).

use super::*;

/// Timer-wheel keys one registered request holds at most: the WARN, the sender budget and
/// its deadline (`admission`).
pub const MAX_TIMERS_PER_REQUEST: usize = 3;

/// Entries held now, per table or queue. Every field has a bound in [`TxSizes::bounds`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxSizes {
    /// Requests registered and not yet ended by the collective.
    pub requests: usize,
    /// Jobs submitted and not yet completed (evicted ones included).
    pub transfers: usize,
    /// Evicted jobs awaiting their fence.
    pub abandoned: usize,
    /// Parked `RequestInfo`s and aborts, and the peers holding a share of them (`early`).
    pub early_infos: usize,
    pub early_aborts: usize,
    pub early_peers: usize,
    /// Ended context requests remembered (`tombstones`).
    pub tombstones: usize,
    /// Legs waiting for a staging slot.
    pub slot_waiters: usize,
    /// Keys of the timeout wheel.
    pub timers: usize,
    /// Locally finished, not yet agreed.
    pub finished_local: usize,
    /// Events and control messages not yet taken by the driver.
    pub events: usize,
    pub outbox: usize,
    /// Agent completions not yet drained.
    pub completions: usize,
    /// Peers watched by heartbeats.
    pub watched_peers: usize,
    /// Staging slots in use.
    pub staging_in_use: usize,
}

impl TxSizes {
    /// Each size by name, in a fixed order.
    pub fn named(&self) -> [(&'static str, usize); 15] {
        [
            ("requests", self.requests),
            ("transfers", self.transfers),
            ("abandoned", self.abandoned),
            ("early_infos", self.early_infos),
            ("early_aborts", self.early_aborts),
            ("early_peers", self.early_peers),
            ("tombstones", self.tombstones),
            ("slot_waiters", self.slot_waiters),
            ("timers", self.timers),
            ("finished_local", self.finished_local),
            ("events", self.events),
            ("outbox", self.outbox),
            ("completions", self.completions),
            ("watched_peers", self.watched_peers),
            ("staging_in_use", self.staging_in_use),
        ]
    }

    /// Field by field, the larger of the two: a high-water mark.
    pub fn max(self, o: TxSizes) -> TxSizes {
        TxSizes {
            requests: self.requests.max(o.requests),
            transfers: self.transfers.max(o.transfers),
            abandoned: self.abandoned.max(o.abandoned),
            early_infos: self.early_infos.max(o.early_infos),
            early_aborts: self.early_aborts.max(o.early_aborts),
            early_peers: self.early_peers.max(o.early_peers),
            tombstones: self.tombstones.max(o.tombstones),
            slot_waiters: self.slot_waiters.max(o.slot_waiters),
            timers: self.timers.max(o.timers),
            finished_local: self.finished_local.max(o.finished_local),
            events: self.events.max(o.events),
            outbox: self.outbox.max(o.outbox),
            completions: self.completions.max(o.completions),
            watched_peers: self.watched_peers.max(o.watched_peers),
            staging_in_use: self.staging_in_use.max(o.staging_in_use),
        }
    }

    /// The bound of every size under `config`: a rank that holds more than this of anything
    /// has broken a limit it enforces, or grows a table nothing limits.
    pub fn bounds(config: &TransceiverConfig) -> TxSizes {
        let jobs = job_bound(config);
        TxSizes {
            requests: config.max_in_flight,
            transfers: jobs,
            abandoned: jobs,
            early_infos: MAX_EARLY_INFOS,
            early_aborts: MAX_EARLY_ABORTS,
            // Only a peer holding something has a share.
            early_peers: MAX_EARLY_INFOS + MAX_EARLY_ABORTS,
            tombstones: MAX_TOMBSTONES,
            slot_waiters: MAX_SLOT_WAITERS,
            timers: MAX_TIMERS_PER_REQUEST * config.max_in_flight,
            finished_local: config.max_in_flight,
            events: MAX_EVENTS,
            outbox: MAX_OUTBOX,
            completions: jobs,
            watched_peers: MAX_WATCHED_PEERS,
            staging_in_use: config.staging_slots,
        }
    }
}

/// Jobs in flight at most, evicted ones until their fence included (`Transceiver::job_bound`).
pub(super) fn job_bound(config: &TransceiverConfig) -> usize {
    2 * config.max_in_flight + MAX_SLOT_WAITERS
}

impl Transceiver {
    /// What every table and queue holds now.
    pub fn sizes(&self) -> TxSizes {
        let early = self.early.counts();
        TxSizes {
            requests: self.entries.len(),
            transfers: self.transfers.len(),
            abandoned: self.abandoned.len(),
            early_infos: early.infos,
            early_aborts: early.aborts,
            early_peers: self.early.peers(),
            tombstones: self.ended.len(),
            slot_waiters: self.slot_waiters.len(),
            timers: self.timeouts.len(),
            finished_local: self.finished_local.len(),
            events: self.events.len(),
            outbox: self.outbox.len(),
            completions: self.completions.len(),
            watched_peers: self.liveness.watched(),
            staging_in_use: self.staging.counters().in_use,
        }
    }
}
