//! Who gets a seat in a ctx's connection table.
//!
//! Connections cost an attacker nothing, so the table is shared out by source IP (a host), and
//! a seat is only safe once its connection has sent a whole frame ("proven"). When a new
//! connection finds its host's share (`max_conns_per_ip`) or the whole table full, the oldest
//! unproven connection (of that host, or of anyone) gives way to it; only when every seat in
//! the way is proven is the newcomer refused. So connections that never speak can never lock
//! a real peer out: they are evicted by it, and they cannot take another host's seats beyond
//! the table's free room. What stays possible: a host that proves its connections (sends
//! heartbeats) keeps its share, and enough such hosts fill the table; and a newcomer that
//! does not send its first frame before as many newer connections of its host arrive as
//! there are older unproven ones can be evicted in turn (a real gen speaks within
//! milliseconds of its connect).

use kvferry_core::PeerId;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// A seated connection as its task sees it.
#[derive(Clone, Debug, Default)]
pub struct SeatSignals {
    /// Set by the connection's reader on its first whole frame.
    pub proven: Arc<AtomicBool>,
    /// Notified when the connection is evicted; its task then closes it.
    pub evict: Arc<Notify>,
}

#[derive(Debug)]
struct Seat {
    ip: IpAddr,
    /// Accept order: the oldest unproven seat is evicted first.
    order: u64,
    signals: SeatSignals,
}

/// What `Admission::admit` decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Seated, evicting these (at most one) to make room.
    Seated { evicted: Option<PeerId> },
    /// Every seat in the way is proven: the newcomer is refused.
    Refused { reason: &'static str },
}

#[derive(Debug)]
pub struct Admission {
    total: usize,
    per_ip: usize,
    seats: HashMap<PeerId, Seat>,
    per_ip_count: HashMap<IpAddr, usize>,
    next_order: u64,
}

impl Admission {
    pub fn new(total: usize, per_ip: usize) -> Admission {
        Admission {
            total,
            per_ip: per_ip.min(total),
            seats: HashMap::new(),
            per_ip_count: HashMap::new(),
            next_order: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.seats.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seats.is_empty()
    }

    /// Seats `peer` from `ip`, evicting an unproven seat when its host's share or the table is
    /// full. The evicted seat is gone from the table at once (its `evict` is notified).
    pub fn admit(&mut self, peer: PeerId, ip: IpAddr, signals: SeatSignals) -> Admit {
        let mut evicted = None;
        if self.per_ip_count.get(&ip).copied().unwrap_or(0) >= self.per_ip {
            match self.oldest_unproven(Some(ip)) {
                Some(victim) => evicted = Some(self.evict(victim)),
                None => {
                    return Admit::Refused {
                        reason: "this host's connections are all in use",
                    }
                }
            }
        } else if self.seats.len() >= self.total {
            match self.oldest_unproven(None) {
                Some(victim) => evicted = Some(self.evict(victim)),
                None => {
                    return Admit::Refused {
                        reason: "the connection table is full",
                    }
                }
            }
        }
        let order = self.next_order;
        self.next_order += 1;
        self.seats.insert(peer, Seat { ip, order, signals });
        *self.per_ip_count.entry(ip).or_default() += 1;
        Admit::Seated { evicted }
    }

    /// Frees `peer`'s seat (its connection ended); a no-op for one already evicted.
    pub fn leave(&mut self, peer: PeerId) {
        let Some(seat) = self.seats.remove(&peer) else {
            return;
        };
        let n = self
            .per_ip_count
            .get_mut(&seat.ip)
            .expect("a seated host is counted");
        *n -= 1;
        if *n == 0 {
            self.per_ip_count.remove(&seat.ip);
        }
    }

    fn oldest_unproven(&self, ip: Option<IpAddr>) -> Option<PeerId> {
        self.seats
            .iter()
            .filter(|(_, s)| ip.is_none_or(|ip| s.ip == ip))
            .filter(|(_, s)| !s.signals.proven.load(Ordering::Relaxed))
            .min_by_key(|(_, s)| s.order)
            .map(|(p, _)| *p)
    }

    fn evict(&mut self, victim: PeerId) -> PeerId {
        if let Some(s) = self.seats.get(&victim) {
            // `notify_one` stores a permit: the task sees it even if not waiting yet.
            s.signals.evict.notify_one();
        }
        self.leave(victim);
        victim
    }
}

/// Frees its connection's seat when dropped, however the connection task ends (closed,
/// evicted, aborted with its accept loop, or panicking).
#[derive(Debug)]
pub struct SeatGuard {
    pub table: Arc<Mutex<Admission>>,
    pub peer: PeerId,
}

impl Drop for SeatGuard {
    fn drop(&mut self) {
        if let Ok(mut t) = self.table.lock() {
            t.leave(self.peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u32) -> PeerId {
        PeerId {
            instance: n,
            rank: 0,
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    fn seat(t: &mut Admission, n: u32, host: u8, proven: bool) -> (Admit, SeatSignals) {
        let s = SeatSignals::default();
        s.proven.store(proven, Ordering::Relaxed);
        (t.admit(peer(n), ip(host), s.clone()), s)
    }

    #[test]
    fn a_full_host_evicts_its_own_oldest_unproven_seat_and_nobody_elses() {
        let mut t = Admission::new(10, 2);
        let (_, other) = seat(&mut t, 0, 1, false);
        let (_, first) = seat(&mut t, 1, 2, false);
        seat(&mut t, 2, 2, false);
        let (a, _) = seat(&mut t, 3, 2, false);
        assert_eq!(
            a,
            Admit::Seated {
                evicted: Some(peer(1))
            }
        );
        assert!(first.evict.notified().now_or_never_is_ready());
        assert!(!other.evict.notified().now_or_never_is_ready());
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn proven_seats_are_kept_and_the_newcomer_refused() {
        let mut t = Admission::new(3, 2);
        seat(&mut t, 0, 2, true);
        seat(&mut t, 1, 2, true);
        assert!(matches!(seat(&mut t, 2, 2, false).0, Admit::Refused { .. }));
        // Another host still finds the free seat.
        assert_eq!(seat(&mut t, 3, 1, false).0, Admit::Seated { evicted: None });
        // The table is full; the only unproven seat is evicted for a newcomer of a third host.
        let (a, newcomer) = seat(&mut t, 4, 3, false);
        assert_eq!(
            a,
            Admit::Seated {
                evicted: Some(peer(3))
            }
        );
        // Once it speaks, nothing in the table can give way.
        newcomer.proven.store(true, Ordering::Relaxed);
        assert!(matches!(seat(&mut t, 5, 1, false).0, Admit::Refused { .. }));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn leaving_frees_the_host_share() {
        let mut t = Admission::new(4, 1);
        seat(&mut t, 0, 2, true);
        assert!(matches!(seat(&mut t, 1, 2, false).0, Admit::Refused { .. }));
        t.leave(peer(0));
        t.leave(peer(0)); // idempotent
        assert!(t.is_empty());
        assert_eq!(seat(&mut t, 1, 2, false).0, Admit::Seated { evicted: None });
    }

    trait ReadyNow {
        fn now_or_never_is_ready(self) -> bool;
    }

    impl<F: std::future::Future> ReadyNow for F {
        /// Polls once with a no-op waker: was a stored permit there?
        fn now_or_never_is_ready(self) -> bool {
            let mut f = std::pin::pin!(self);
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            f.as_mut().poll(&mut cx).is_ready()
        }
    }
}
