//! The timeout wheel: the WARN (I4), the sender budget, and opt-in eviction past a deadline.

use super::*;

impl Transceiver {
    pub(super) fn check_timeouts(&mut self, now: Duration) {
        while let Some(&(at, id)) = self.timeouts.first() {
            if at > now {
                break;
            }
            self.timeouts.pop_first();
            let Some(e) = self.entries.get_mut(&id) else {
                continue;
            };
            // Pending until locally finished: a context rank whose known legs are done but
            // which still expects another generation rank is waiting too.
            if e.reported {
                continue;
            }
            let side = e.side;
            let elapsed = now.saturating_sub(e.enqueued_at);
            let deadline_passed = e.req.deadline.is_some_and(|d| now >= d);
            let already_warned = std::mem::replace(&mut e.warned, true);
            let sender_budget = self
                .config
                .kv_transfer_sender_future_timeout_ms
                .map(Duration::from_millis);
            let warn_budget = self
                .config
                .kv_transfer_timeout_ms
                .map(Duration::from_millis);
            let warn_due = warn_budget.is_some_and(|b| elapsed >= b);
            if !warn_due {
                // Not this entry's warn key (a deadline or the sender budget): keep the flag.
                self.entries.get_mut(&id).expect("checked").warned = already_warned;
            }
            if warn_due && (!already_warned || self.bugs.has(Bug::WarnNoDedup)) {
                tracing::warn!(
                    request = %id,
                    side = ?side,
                    elapsed_ms = elapsed.as_millis() as u64,
                    "KV cache transfer still pending past kv_transfer_timeout_ms"
                );
                self.counters.timeouts_warned += 1;
                self.emit(TxEvent::TimeoutWarn {
                    request: id,
                    side,
                    elapsed,
                });
                if self.bugs.has(Bug::WarnNoDedup) {
                    // The historical bug: warn again at every later poll.
                    self.timeouts.insert((now + Duration::from_millis(1), id));
                }
            }
            let sender_expired =
                side == Side::Context && sender_budget.is_some_and(|b| elapsed >= b);
            let exempt = self.bugs.has(Bug::LostNotification)
                && side == Side::Context
                && self.entries[&id]
                    .legs
                    .values()
                    .any(|l| matches!(l.state, LegState::InFlight { .. }));
            if exempt {
                // The historical bug: a send waiting for its notification never times out.
                continue;
            }
            if (self.config.inflight_cancel && (warn_due || deadline_passed)) || sender_expired {
                self.abort_entry(now, id, FailCause::Timeout);
            }
        }
    }
}
