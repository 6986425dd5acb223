//! Terminal statuses on their way from the driver to the program: the driver pushes one per
//! request once the request has ended and its blocks are the engine's again; the program takes
//! them, waiting (on a condition variable, off any async runtime) for at least as many as it
//! asks, never more than can still come.

use kvferry_core::request::RequestState;
use kvferry_core::transceiver::FailCause;
use kvferry_core::RequestId;
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Statuses waiting for the program at most; past it new requests are refused
/// (`CommandError::Unclaimed`) until the program takes some.
pub const MAX_UNCLAIMED: usize = 1 << 16;

/// How one request ended. `id` is the engine's request id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub id: RequestId,
    pub state: RequestState,
    /// Why it failed, where the core named it.
    pub cause: Option<FailCause>,
    /// More about the failure, where the driver knows it (a peer's words, a lost connection).
    pub detail: Option<String>,
}

#[derive(Debug, Default)]
struct Inner {
    ready: VecDeque<Outcome>,
    /// Registered requests whose outcome is not pushed yet.
    pending: usize,
    /// Set when the driver stopped: nothing more will come.
    closed: bool,
}

#[derive(Debug, Default)]
pub struct Outcomes {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl Outcomes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("outcomes lock")
    }

    /// Statuses not taken yet.
    pub fn unclaimed(&self) -> usize {
        self.lock().ready.len()
    }

    /// Requests registered whose outcome is not pushed yet.
    pub fn pending(&self) -> usize {
        self.lock().pending
    }

    /// A request was registered: its outcome will come.
    pub fn expect_one(&self) {
        self.lock().pending += 1;
    }

    pub fn push(&self, o: Outcome) {
        let mut g = self.lock();
        g.pending = g.pending.saturating_sub(1);
        g.ready.push_back(o);
        self.changed.notify_all();
    }

    /// The driver stopped.
    pub fn close(&self) {
        let mut g = self.lock();
        g.closed = true;
        g.pending = 0;
        self.changed.notify_all();
    }

    /// Takes every status ready, first waiting until at least `at_least` are (fewer if fewer
    /// requests are still pending) or until `timeout` passes.
    pub fn take(&self, at_least: usize, timeout: Option<Duration>) -> Vec<Outcome> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut g = self.lock();
        loop {
            let reachable = at_least.min(g.ready.len() + g.pending);
            if g.ready.len() >= reachable || g.closed {
                break;
            }
            g = match deadline {
                None => self.changed.wait(g).expect("outcomes lock"),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    self.changed.wait_timeout(g, left).expect("outcomes lock").0
                }
            };
        }
        g.ready.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn done(id: u64) -> Outcome {
        Outcome {
            id: RequestId(id),
            state: RequestState::ContextComplete,
            cause: None,
            detail: None,
        }
    }

    #[test]
    fn waits_for_at_least_what_can_still_come() {
        let o = Arc::new(Outcomes::default());
        o.expect_one();
        o.expect_one();
        // Two pending: asking for five waits for both, not for ever.
        let taker = {
            let o = o.clone();
            std::thread::spawn(move || o.take(5, None))
        };
        o.push(done(1));
        o.push(done(2));
        assert_eq!(taker.join().unwrap().len(), 2);
        assert!(o.take(0, None).is_empty());
    }

    #[test]
    fn a_timeout_or_a_close_ends_the_wait() {
        let o = Outcomes::default();
        o.expect_one();
        let t = Instant::now();
        assert!(o.take(1, Some(Duration::from_millis(30))).is_empty());
        assert!(t.elapsed() >= Duration::from_millis(30));
        o.close();
        assert!(o.take(1, None).is_empty());
    }
}
