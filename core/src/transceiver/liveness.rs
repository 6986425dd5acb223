//! The table behind heartbeats (`heartbeats`): when each watched peer was last heard from,
//! and when the next tick is due. A leaf: it knows peers and instants, not requests.

use crate::PeerId;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Peers watched at most; a request depending on a further peer relies on its timeouts alone
/// (counted in `TxCounters::peers_unwatched`).
pub const MAX_WATCHED_PEERS: usize = 4096;

/// When each watched peer was last heard from, and the next tick.
#[derive(Debug, Default)]
pub(super) struct Liveness {
    last_heard: BTreeMap<PeerId, Duration>,
    next_tick: Option<Duration>,
    seq: u64,
}

/// What one tick decided.
pub(super) struct Tick {
    pub(super) ping: Vec<PeerId>,
    pub(super) lost: Vec<PeerId>,
    pub(super) unwatched: u64,
}

impl Liveness {
    /// A request registered: ticks run from one interval on, if they were not running.
    pub(super) fn arm(&mut self, now: Duration, interval: Duration) {
        self.next_tick.get_or_insert(now + interval);
    }

    pub(super) fn next_tick(&self) -> Option<Duration> {
        self.next_tick
    }

    /// The last request ended: ticks stop, and every peer is forgotten. A rank that kept
    /// them would, when a request next depends on one, judge it by when it was last heard
    /// before the idle spell, and lose it at once however alive it is.
    pub(super) fn stop(&mut self) {
        self.last_heard.clear();
        self.next_tick = None;
    }

    /// After a tick: the next one, or none while no request is registered.
    pub(super) fn reschedule(&mut self, at: Option<Duration>) {
        self.next_tick = at;
    }

    /// Any frame from `from` counts as a sign of life.
    pub(super) fn heard(&mut self, now: Duration, from: PeerId) {
        if let Some(t) = self.last_heard.get_mut(&from) {
            *t = now;
        }
    }

    pub(super) fn watches(&self, peer: PeerId) -> bool {
        self.last_heard.contains_key(&peer)
    }

    /// Peers watched now.
    pub(super) fn watched(&self) -> usize {
        self.last_heard.len()
    }

    /// Watches exactly `wanted` (new ones as heard `now`), then sorts them into the silent
    /// past `limit`, forgotten, and the rest, to ping.
    pub(super) fn tick(
        &mut self,
        now: Duration,
        wanted: &BTreeSet<PeerId>,
        limit: Duration,
    ) -> Tick {
        self.last_heard.retain(|p, _| wanted.contains(p));
        let mut unwatched = 0;
        for p in wanted {
            if self.last_heard.contains_key(p) {
                continue;
            }
            if self.last_heard.len() < MAX_WATCHED_PEERS {
                self.last_heard.insert(*p, now);
            } else {
                unwatched += 1;
            }
        }
        let silent = |heard: Duration| now.saturating_sub(heard) >= limit;
        let lost: Vec<PeerId> = self
            .last_heard
            .iter()
            .filter(|(_, h)| silent(**h))
            .map(|(p, _)| *p)
            .collect();
        for p in &lost {
            self.last_heard.remove(p);
        }
        let ping = self.last_heard.keys().copied().collect();
        Tick {
            ping,
            lost,
            unwatched,
        }
    }

    pub(super) fn next_seq(&mut self) -> u64 {
        // 0 marks an answer: a tick's heartbeats never use it.
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }
}
