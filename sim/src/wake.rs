//! A rank's doorbell: whoever gives a rank something to do (a message, a command, a recycle, an
//! agent completion, a collective round its instance wants) rings it, and the rank's driver
//! sleeps until the bell rings or its next deadline passes, instead of waking on a fixed tick.
//!
//! madsim 0.2 has no `sync` module, so this is a one-waiter notify over `std` parts. madsim runs
//! every task of a seed on one thread in an order drawn from the seed, so wake-ups are as
//! deterministic as the rest of the run. A ring with nobody waiting is kept (sticky), so a
//! ring between a driver's last look at its inputs and its next wait is never lost.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

#[derive(Debug, Default)]
struct Bell {
    rung: bool,
    waiter: Option<Waker>,
}

/// One rank's doorbell (one waiter: the rank's driver).
#[derive(Debug, Default)]
pub struct Wake {
    bell: Mutex<Bell>,
}

impl Wake {
    /// Rings the bell: the waiter, if any, runs at the current simulated instant.
    pub fn ring(&self) {
        let waiter = {
            let mut b = self.bell.lock().expect("wake lock");
            b.rung = true;
            b.waiter.take()
        };
        if let Some(w) = waiter {
            w.wake();
        }
    }

    /// Waits until the bell rings or `deadline` (simulated time since the seed started) passes,
    /// whichever is first; `None` waits for the bell alone. Consumes the ring.
    pub fn wait_until(&self, now: Duration, deadline: Option<Duration>) -> Waiting<'_> {
        Waiting {
            wake: self,
            sleep: deadline.map(|d| Box::pin(madsim::time::sleep(d.saturating_sub(now)))),
        }
    }
}

/// The future of `Wake::wait_until`.
pub struct Waiting<'a> {
    wake: &'a Wake,
    sleep: Option<Pin<Box<madsim::time::Sleep>>>,
}

impl Future for Waiting<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        {
            let mut b = self.wake.bell.lock().expect("wake lock");
            if b.rung {
                b.rung = false;
                b.waiter = None;
                return Poll::Ready(());
            }
            b.waiter = Some(cx.waker().clone());
        }
        let Some(sleep) = self.sleep.as_mut() else {
            return Poll::Pending;
        };
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        // Timed out: a later ring must not wake a task that waits on something else by then.
        self.wake.bell.lock().expect("wake lock").waiter = None;
        Poll::Ready(())
    }
}
