//! Heartbeats: noticing a peer that goes silent without a reset.
//!
//! A crashed peer resets its connections and the driver calls `handle_peer_lost`; a peer whose
//! host hangs, or whose links go quiet, resets nothing, and a rank that only waits on it would
//! wait for ever. So every `heartbeat_interval_ms` (a *tick*, on the timer of `poll_timeout`)
//! this rank sends a `Heartbeat` to each peer a live request depends on (the peer of an open
//! leg: the context rank it reads from, or the generation rank it serves) and checks when it
//! last heard from each: any frame from a peer counts. A peer silent for
//! `heartbeat_missed_limit` intervals is lost, the same path as a reset
//! (`handle_peer_lost`).
//!
//! A live peer is always heard within an interval: it either watches this rank too (it sends
//! its own heartbeats) or it answers each of this rank's heartbeats. Answers carry sequence
//! number 0 and are never answered, so two ranks cannot bounce heartbeats at each other; a
//! context rank that has not registered the request yet still answers, so a generation rank
//! waiting on a slow prefill is not cut.
//!
//! Detection bound: a peer watched since `w` and silent since `t >= w` is lost at the first
//! tick at or after `t + interval * missed_limit`, so at most one interval later. A peer is
//! watched from the first tick after a request starts depending on it.
//!
//! State is per watched peer, bounded by [`MAX_WATCHED_PEERS`], and a peer no live request
//! depends on any more is forgotten at the next tick. Ticks run while any request is
//! registered, and stop when none is; then every peer is forgotten at once (`Liveness::stop`),
//! since no tick comes to do it and a stale last-heard time would cut a live peer the moment
//! a request next depends on it.

use super::*;

impl Transceiver {
    /// A request registered: ticks run (none under the `ignore-heartbeats` switch, which
    /// would otherwise leave a tick due for ever).
    pub(super) fn arm_liveness(&mut self, now: Duration) {
        if !self.bugs.has(Bug::IgnoreHeartbeats) {
            let interval = Duration::from_millis(self.config.heartbeat_interval_ms);
            self.liveness.arm(now, interval);
        }
    }

    /// Every frame from `from`: it is alive. A tick's heartbeat from a peer this rank does
    /// not watch is answered (see the module docs).
    pub(super) fn on_frame_from(&mut self, now: Duration, from: PeerId, msg: &Message) {
        if self.bugs.has(Bug::IgnoreHeartbeats) {
            return;
        }
        self.liveness.heard(now, from);
        if let Message::Heartbeat { seq } = msg {
            if *seq != 0 && !self.liveness.watches(from) {
                let _ = self.transmit(from, Message::Heartbeat { seq: 0 });
            }
        }
    }

    /// A tick, if one is due: heartbeats out, silent peers lost.
    pub(super) fn check_liveness(&mut self, now: Duration) {
        if self.bugs.has(Bug::IgnoreHeartbeats) {
            return;
        }
        if self.liveness.next_tick().is_none_or(|at| now < at) {
            return;
        }
        let interval = Duration::from_millis(self.config.heartbeat_interval_ms);
        let wanted = self.depended_on();
        let tick = self
            .liveness
            .tick(now, &wanted, self.config.silence_limit());
        self.counters.peers_unwatched += tick.unwatched;
        let next = (!self.entries.is_empty()).then_some(now + interval);
        self.liveness.reschedule(next);
        for peer in tick.ping {
            let seq = self.liveness.next_seq();
            let _ = self.transmit(peer, Message::Heartbeat { seq });
        }
        for peer in tick.lost {
            tracing::warn!(%peer, "peer silent past heartbeat_missed_limit: lost");
            self.counters.peers_silent += 1;
            self.emit(TxEvent::PeerSilent { peer });
            self.handle_peer_lost(now, peer);
        }
    }

    /// Peers some live request waits on: those of its open legs.
    fn depended_on(&self) -> BTreeSet<PeerId> {
        self.entries
            .values()
            .filter(|e| e.cause.is_none() && !e.reported)
            .flat_map(|e| e.legs.values().filter(|l| l.is_open()).map(|l| l.peer))
            .collect()
    }

    /// Peers watched by heartbeats now (bounded by [`MAX_WATCHED_PEERS`]).
    pub fn watched_peers(&self) -> usize {
        self.liveness.watched()
    }
}
