//! Status and agreement: what finished locally, this rank's contribution to the step's
//! collective, and the terminal states every rank agreed on (I7).

use super::*;

impl Transceiver {
    /// Marks the entry locally finished when no leg is open and every expected leg is known.
    pub(super) fn check_finished(&mut self, id: RequestId) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        if e.reported {
            return;
        }
        let open = e.legs.values().any(|l| l.is_open());
        let all_known = e.expected_legs.is_some_and(|n| e.legs.len() >= n);
        let done = !open && (all_known || e.cause.is_some());
        if !done {
            return;
        }
        let ok = e.cause.is_none() && e.legs.values().all(|l| matches!(l.state, LegState::Done));
        let cause = if ok {
            None
        } else {
            // Every failed leg set a cause on the way (abort_entry); a leg cannot fail alone.
            Some(e.cause.expect("a failed request has a cause"))
        };
        e.reported = true;
        for at in std::mem::take(&mut e.timeout_keys) {
            self.timeouts.remove(&(at, id));
        }
        self.finished_local.insert(id, ok);
        self.step_due = true;
        self.emit(TxEvent::LocallyFinished {
            request: id,
            ok,
            cause,
        });
    }

    /// Progress (`handle_timeout`), then this rank's contribution to the step's completion
    /// collective for `side`. The driver gathers every rank's contribution (every rank, every
    /// step, with or without anything to report: I7), `agree`s, and hands the outcome to
    /// `apply_agreed`.
    pub fn check_status(&mut self, now: Duration, side: Side, at_least: usize) -> StatusCheck {
        self.handle_timeout(now);
        // Everything finished so far goes into this contribution.
        self.step_due = false;
        self.step += 1;
        let mut c = Contribution {
            rank: self.me.rank,
            step: self.step,
            done: Vec::new(),
            failed: Vec::new(),
        };
        for (id, ok) in &self.finished_local {
            if self.entries.get(id).is_some_and(|e| e.side == side) {
                if *ok {
                    c.done.push(*id);
                } else {
                    c.failed.push(*id);
                }
            }
        }
        let satisfied = c.done.len() + c.failed.len() >= at_least;
        StatusCheck {
            contribution: c,
            satisfied,
        }
    }

    /// Context side: progress, then this rank's contribution to the step's collective.
    pub fn check_context_status(&mut self, now: Duration, at_least: usize) -> StatusCheck {
        self.check_status(now, Side::Context, at_least)
    }

    /// Generation side: progress, then this rank's contribution to the step's collective.
    pub fn check_gen_status(&mut self, now: Duration, at_least: usize) -> StatusCheck {
        self.check_status(now, Side::Generation, at_least)
    }

    /// Applies what every rank agreed: those requests reach their terminal state here.
    pub fn apply_agreed(&mut self, agreed: &Agreed) -> Vec<Finished> {
        let mut out = Vec::new();
        let ids = agreed
            .completed
            .iter()
            .map(|id| (*id, true))
            .chain(agreed.failed.iter().map(|id| (*id, false)));
        for (id, ok) in ids {
            let Some(e) = self.entries.remove(&id) else {
                continue;
            };
            assert!(
                self.finished_local.remove(&id).is_some(),
                "{id} agreed before this rank finished it"
            );
            let state = match (ok, e.side, e.cancelled) {
                (true, Side::Context, _) => RequestState::ContextComplete,
                (true, Side::Generation, _) => RequestState::GenComplete,
                (false, _, true) => RequestState::Cancelled,
                (false, _, false) => RequestState::TransferError,
            };
            e.req
                .advance(state)
                .expect("a request reaches exactly one terminal state");
            if e.side == Side::Context {
                self.ended.bury(id, e.req.token);
            }
            self.emit(TxEvent::Finished { request: id, state });
            out.push(Finished {
                request: e.req,
                state,
            });
        }
        if self.entries.is_empty() {
            // Idle: no tick runs until the next registration (`poll_timeout`), so the
            // watched peers are dropped now, not at a tick that never comes.
            self.liveness.stop();
        }
        out
    }
}
