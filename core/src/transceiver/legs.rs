//! Leg execution: a staging slot, pins, the agent's job, and its fence (I1, I2, I5, I6).

use super::abort::abort_message;
use super::*;

impl Transceiver {
    /// Starts a leg waiting for its slot: slot, pins, job. A leg that cannot get a slot (or
    /// would pass the job bound) joins the wait queue once.
    pub(super) fn try_start_leg(&mut self, now: Duration, id: RequestId, key: u32) {
        let Some(e) = self.entries.get(&id) else {
            return;
        };
        let leg = &e.legs[&key];
        let LegState::WaitingSlot { queued, .. } = leg.state else {
            return;
        };
        let want = leg.bytes.min(self.staging.slot_bytes());
        let slot = if self.transfers.len() >= self.job_bound {
            None
        } else if self.config.staging_fallback {
            Some(self.staging.acquire_or_fallback(want))
        } else {
            self.staging.try_acquire(want).ok()
        };
        let Some(slot) = slot else {
            if !queued {
                self.wait_for_slot(now, id, key);
            }
            return;
        };
        let local = e.req.blocks.clone();
        let pinned = self.blocks.lock().expect("block pool lock").pin(&local);
        if let Err(err) = pinned {
            if self.bugs.has(Bug::EvictedBeforeSend) {
                // The historical bug: the error is swallowed and the send reads the evicted
                // blocks; nothing was pinned, so the fence unpins nothing.
                self.submit_leg(now, id, key, slot, (local, Vec::new()));
                return;
            }
            tracing::warn!(request = %id, error = %err, "blocks gone before transfer");
            drop(slot);
            self.abort_entry(now, id, FailCause::BlocksGone);
            return;
        }
        self.submit_leg(now, id, key, slot, (local.clone(), local));
    }

    /// Queues a leg for the next free slot, or fails its request if the queue is full.
    fn wait_for_slot(&mut self, now: Duration, id: RequestId, key: u32) {
        if self.slot_waiters.len() >= MAX_SLOT_WAITERS {
            tracing::warn!(request = %id, "staging wait queue full");
            self.abort_entry(now, id, FailCause::NoSlot);
            return;
        }
        self.slot_waiters.push_back((id, key));
        let e = self.entries.get_mut(&id).expect("checked by the caller");
        if let Some(LegState::WaitingSlot { queued, .. }) =
            e.legs.get_mut(&key).map(|l| &mut l.state)
        {
            *queued = true;
        }
    }

    /// Hands a leg holding its slot and pins to the agent: the job's blocks and those of them
    /// pinned (the same, but for the `evicted-before-send` bug). A generation rank asks the
    /// leg's context rank for bytes only now that the receive is posted (I10).
    fn submit_leg(
        &mut self,
        now: Duration,
        id: RequestId,
        key: u32,
        slot: SlotGuard,
        (local, pinned): (Vec<BlockRef>, Vec<BlockRef>),
    ) {
        let tid = TransferId(self.next_transfer);
        self.next_transfer += 1;
        let e = &self.entries[&id];
        let leg = &e.legs[&key];
        let (side, peer, bytes) = (e.side, leg.peer, leg.bytes);
        let direction = match side {
            Side::Context => Direction::Send { to: peer },
            Side::Generation => Direction::Receive { from: peer },
        };
        let job = TransferJob {
            id: tid,
            request: id,
            token: e.req.token,
            direction,
            plan: leg.plan.clone(),
            local_blocks: local,
            remote_blocks: leg.remote_blocks.clone(),
            bytes,
            staging: slot.buffer().clone(),
        };
        let status = match TransferStatus::submit(&self.agent, job, &self.completions) {
            Ok(status) => status,
            Err(err) => {
                tracing::warn!(request = %id, peer = %peer, error = %err, "agent refused the job");
                self.blocks.lock().expect("block pool lock").unpin(&pinned);
                drop(slot);
                let e = self.entries.get_mut(&id).expect("checked");
                e.legs.get_mut(&key).expect("checked").state = LegState::Failed;
                self.abort_entry(now, id, FailCause::Agent);
                return;
            }
        };
        self.transfers.insert(tid, (id, key));
        self.counters.transfers_started += 1;
        let e = self.entries.get_mut(&id).expect("checked");
        e.legs.get_mut(&key).expect("checked").state = LegState::InFlight {
            status,
            slot,
            pinned,
        };
        self.emit(TxEvent::Submitted {
            transfer: tid,
            request: id,
            peer,
            bytes,
        });
        if side == Side::Generation && !self.bugs.has(Bug::AskBeforePosted) {
            self.ask(now, id, key);
        }
    }

    pub(super) fn drain_completions(&mut self, now: Duration) {
        let mut done = std::mem::take(&mut self.scratch);
        self.completions.drain_into(&mut done);
        for c in done.drain(..) {
            self.on_completion(now, c);
        }
        self.scratch = done;
    }

    /// A job's completion: its fence. The leg's slot and pins go back only now (I1, I2, I5).
    pub(super) fn on_completion(&mut self, now: Duration, c: Completion) {
        if let Some((_status, pinned)) = self.abandoned.remove(&c.id) {
            // The fence of an evicted job: its writer is gone, so its agent may go too.
            self.transfers.remove(&c.id);
            self.staging.fence_passed(Fence(c.id.0));
            if !self.bugs.has(Bug::AbortNeverReclaimed) {
                self.blocks.lock().expect("block pool lock").unpin(&pinned);
            }
            self.serve_slot_waiters(now);
            return;
        }
        let found = if self.bugs.has(Bug::TransferTableLeak) {
            // The leak: the job is looked up, never forgotten.
            self.transfers.get(&c.id).copied()
        } else {
            self.transfers.remove(&c.id)
        };
        let Some((id, key)) = found else {
            return; // forgotten by the release-early bug
        };
        let served = self.bugs.has(Bug::FailedTransferServed)
            && self
                .entries
                .get(&id)
                .is_some_and(|e| e.side == Side::Generation);
        let c = if served {
            // The historical bug: a failed receive is taken for a finished one.
            Completion {
                id: c.id,
                result: c.result.or(Ok(0)),
            }
        } else {
            c
        };
        let ok = c.result.is_ok();
        self.emit(TxEvent::TransferDone {
            transfer: c.id,
            request: id,
            ok,
        });
        let (side, token, peer) = self.release_leg(id, key, ok);
        match c.result {
            // Nothing goes to the peer: the generation side's own receive completes when its
            // last byte lands (wire version 3 has no `Done`).
            Ok(bytes) => {
                self.counters.transfers_completed += 1;
                self.counters.bytes += bytes;
            }
            Err(err) => {
                self.counters.transfers_failed += 1;
                tracing::warn!(request = %id, peer = %peer, error = %err, "transfer failed");
                // The peer of the failed leg must hear it: its side cannot tell a slow sender
                // from a dead one. Peers of still-open legs are told by `abort_entry`.
                let _ = self.transmit(peer, abort_message(side, id, token));
                self.abort_entry(now, id, FailCause::Agent);
            }
        }
        self.serve_slot_waiters(now);
        self.check_finished(id);
    }

    /// Ends a fenced leg: done if it moved its bytes and the request still stands, else failed;
    /// its pins and slot go back. Returns the request's side, token and the leg's peer.
    fn release_leg(&mut self, id: RequestId, key: u32, ok: bool) -> (Side, TransferToken, PeerId) {
        let leak = !ok && self.bugs.has(Bug::LeakSlotOnError);
        let e = self.entries.get_mut(&id).expect("transfer of a live entry");
        let leg = e.legs.get_mut(&key).expect("transfer of a live leg");
        // A leg is done when its bytes moved; whether the request still stands is the
        // entry's `cause`, which `check_finished` weighs on its own.
        let next = if ok { LegState::Done } else { LegState::Failed };
        let prev = std::mem::replace(&mut leg.state, next);
        let LegState::InFlight { slot, pinned, .. } = prev else {
            panic!("completion for leg in state {prev:?}");
        };
        self.blocks.lock().expect("block pool lock").unpin(&pinned);
        if leak {
            #[cfg(feature = "bug-switches")]
            slot.leak();
            #[cfg(not(feature = "bug-switches"))]
            drop(slot);
        } else {
            drop(slot);
        }
        (e.side, e.req.token, leg.peer)
    }

    /// When the front of the slot wait queue (in arrival order) runs out of time: once strictly
    /// more than `staging_wait_ms` has passed. A front that no longer waits is due at once, so
    /// `serve_slot_waiters` drops it.
    pub(super) fn next_slot_deadline(&self) -> Option<Duration> {
        let &(id, key) = self.slot_waiters.front()?;
        let leg = self.entries.get(&id).and_then(|e| e.legs.get(&key));
        let wait = Duration::from_millis(self.config.staging_wait_ms);
        match leg.map(|l| &l.state) {
            Some(LegState::WaitingSlot { since, .. }) => {
                Some(*since + wait + Duration::from_micros(1))
            }
            _ => Some(Duration::ZERO),
        }
    }

    pub(super) fn serve_slot_waiters(&mut self, now: Duration) {
        let wait = Duration::from_millis(self.config.staging_wait_ms);
        while let Some(&(id, key)) = self.slot_waiters.front() {
            let since = match self.entries.get(&id).and_then(|e| e.legs.get(&key)) {
                Some(Leg {
                    state: LegState::WaitingSlot { since, .. },
                    ..
                }) => *since,
                _ => {
                    self.slot_waiters.pop_front();
                    continue;
                }
            };
            if now.saturating_sub(since) > wait {
                self.slot_waiters.pop_front();
                tracing::warn!(request = %id, "no staging slot within staging_wait_ms");
                self.abort_entry(now, id, FailCause::NoSlot);
                continue;
            }
            self.slot_waiters.pop_front();
            self.try_start_leg(now, id, key);
            if self.waits_for_slot(id, key) {
                // Still no slot (or at the job bound): it keeps its place at the front.
                self.slot_waiters.push_front((id, key));
                return;
            }
        }
    }

    fn waits_for_slot(&self, id: RequestId, key: u32) -> bool {
        let leg = self.entries.get(&id).and_then(|e| e.legs.get(&key));
        matches!(leg.map(|l| &l.state), Some(LegState::WaitingSlot { .. }))
    }
}
