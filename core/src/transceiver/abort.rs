//! Ending a request early: the caller's cancel, a peer's abort (only with authority: I9),
//! and the one path every failure takes (`abort_entry`).

use super::*;

/// What a side tells its peer when it gives a request up.
pub(super) fn abort_message(side: Side, id: RequestId, token: TransferToken) -> Message {
    match side {
        Side::Generation => Message::Cancel { request: id, token },
        Side::Context => Message::Error {
            request: id,
            code: ErrorCode::Cancelled,
            detail: "context side aborted the transfer".into(),
        },
    }
}

impl Transceiver {
    /// Cancels a request. Legs not started end at once; legs in flight are asked to stop and
    /// end at their fence, or at once with `inflight_cancel` (slot poisoned, pins kept).
    /// Returns false if the request is unknown here.
    pub fn cancel(&mut self, now: Duration, id: RequestId) -> bool {
        let Some(e) = self.entries.get_mut(&id) else {
            return false;
        };
        e.cancelled = true;
        self.abort_entry(now, id, FailCause::Cancelled);
        true
    }

    /// A peer asks to end `id`. Only a peer with authority over the request can (I9): one that
    /// presents its token (`Cancel`), or, for an `Error` (no token), a peer the request is
    /// bound to (see `is_bound`). Aborts for requests not registered yet are parked, bounded and
    /// expiring, and end the request on registration only if their token is its own.
    pub(super) fn on_peer_abort(
        &mut self,
        now: Duration,
        from: PeerId,
        id: RequestId,
        token: Option<TransferToken>,
    ) {
        if self.ended.get(id).is_some() {
            return; // already over here: nothing to stop, nothing to remember
        }
        let any = self.bugs.has(Bug::AcceptAnyAbort);
        let Some(e) = self.entries.get(&id) else {
            if token.is_some() || any {
                if let Err(why) = self.early.park_abort(now, from, id, token) {
                    tracing::debug!(request = %id, peer = %from, ?why, "early abort dropped");
                }
            }
            return;
        };
        let proven = match token {
            Some(t) => t.matches(e.req.token),
            None => is_bound(e, from),
        };
        if !proven && !any {
            // Debug, not warn: a stranger could otherwise flood the log at will.
            tracing::debug!(request = %id, peer = %from, "abort without authority ignored");
            return;
        }
        tracing::warn!(request = %id, peer = %from, "peer aborted the request");
        self.abort_entry(now, id, FailCause::PeerAborted);
    }

    /// Fails or cancels an entry: stops its open legs (evicting them with inflight_cancel).
    pub(super) fn abort_entry(&mut self, _now: Duration, id: RequestId, cause: FailCause) {
        let mode = StopMode {
            evict: self.config.inflight_cancel,
            release_early: self.bugs.has(Bug::ReleaseEarly),
            unpin_at_evict: self.bugs.has(Bug::AbortDuringWrite),
        };
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        // Peers hear of an abort once. Telling them again on every echo would make two sides
        // whose legs are both still fencing bounce Cancel and Error at each other forever.
        let first_abort = e.cause.is_none();
        e.cause.get_or_insert(cause);
        if cause == FailCause::Cancelled {
            e.cancelled = true;
        }
        let mut notify: Vec<PeerId> = Vec::new();
        let mut evicted: Vec<(TransferStatus, Vec<BlockRef>)> = Vec::new();
        for leg in e.legs.values_mut() {
            let (told, abandoned) = stop_leg(leg, mode, &self.blocks);
            notify.extend(told);
            evicted.extend(abandoned);
        }
        if let Some(source) = &e.req.source {
            // A generation rank tells every context rank of its source, asked or not yet
            // asked: its Cancel carries the token, so each can end the request at once.
            notify = (0..source.layout.world_size())
                .map(|rank| PeerId {
                    instance: source.instance,
                    rank,
                })
                .collect();
        }
        let abort = abort_message(e.side, id, e.req.token);
        for (status, pinned) in evicted {
            let tid = status.id();
            self.counters.evictions += 1;
            self.abandoned.insert(tid, (status, pinned));
            self.emit(TxEvent::Evicted {
                transfer: tid,
                request: id,
            });
        }
        if mode.release_early {
            // Forget the jobs: their fences will find nothing to release.
            self.transfers.retain(|_, (r, _)| *r != id);
        }
        self.slot_waiters.retain(|(r, _)| *r != id);
        if first_abort {
            for peer in notify {
                let _ = self.transmit(peer, abort.clone());
            }
        }
        self.check_finished(id);
    }
}

/// How `abort_entry` stops a leg in flight.
#[derive(Clone, Copy)]
struct StopMode {
    /// In-flight cancel: poison the slot, keep the pins, end the request now.
    evict: bool,
    /// The `release-early` bug switch.
    release_early: bool,
    /// The `abort-during-write` bug switch.
    unpin_at_evict: bool,
}

/// Stops one leg: the peer to tell (an open leg's), and the job to keep fenced if evicted.
fn stop_leg(
    leg: &mut Leg,
    mode: StopMode,
    blocks: &Mutex<BlockPool>,
) -> (Option<PeerId>, Option<(TransferStatus, Vec<BlockRef>)>) {
    match std::mem::replace(&mut leg.state, LegState::Failed) {
        LegState::WaitingSlot { .. } => (Some(leg.peer), None),
        LegState::InFlight {
            status,
            slot,
            pinned,
        } => {
            status.cancel();
            if mode.evict {
                slot.poison(Fence(status.id().0));
                leg.state = LegState::Abandoned;
                if mode.unpin_at_evict {
                    // The historical bug: the pages go back while the write still lands.
                    blocks.lock().expect("block pool lock").unpin(&pinned);
                    return (Some(leg.peer), Some((status, Vec::new())));
                }
                (Some(leg.peer), Some((status, pinned)))
            } else if mode.release_early {
                // The historical bug: resources go back while the transfer runs.
                blocks.lock().expect("block pool lock").unpin(&pinned);
                drop(slot);
                leg.state = LegState::Abandoned;
                (Some(leg.peer), None)
            } else {
                leg.state = LegState::InFlight {
                    status,
                    slot,
                    pinned,
                };
                (Some(leg.peer), None)
            }
        }
        other => {
            leg.state = other;
            (None, None)
        }
    }
}
