//! The growth rule (I11, bounded memory): what a seed's sampled sizes must do.
//!
//! Every `Horizon::sample_every_ms` of simulated time the sampler (`sampler`) reads, on every
//! rank of every live instance, how much each table and queue of its transceiver holds
//! (`TxSizes`: requests, transfers, evicted jobs, parked early input and the peers holding it,
//! tombstones, slot waiters, timer keys, locally finished requests, events, outbox,
//! completions, watched peers, staging slots in use), and on every instance how many of its
//! KV blocks are in use. A rank's sizes are its high-water marks over its passes since the
//! previous sample (`Marks`), so a peak between samples counts. A seed breaks I11 when
//!
//! 1. **bound**: a sample exceeds the size's bound, derived from the config
//!    (`TxSizes::bounds`: `max_in_flight`, the job bound, `staging_slots`, `MAX_TOMBSTONES`,
//!    `MAX_WATCHED_PEERS`, ...) or the pool (its capacity), at any time; or
//! 2. **return**: once the seed has converged (every request terminal, every rank idle) and
//!    a tail has passed (`sampler::tail`: the longest timer that may still hold state at
//!    quiescence, the early-input TTL), a size is above its *baseline*, its largest value at
//!    the first sample (time 0, before any request: a fresh rank's). Exempt is the one table
//!    that keeps entries by design after their requests end, and is held to its bound
//!    instead: `tombstones` (ended requests, remembered so a late `RequestInfo` is answered
//!    at once).
//!
//! A table that grows with every request the rank has seen, rather than with those it holds,
//! breaks the second rule in any seed and the first in a long enough one. Each size's peak
//! over the seed is reported (`SeedReport::peaks`).

use kvferry_core::transceiver::TxSizes;
use std::collections::{BTreeMap, BTreeSet};

/// Sizes that keep entries after their requests end, by design (see the module docs).
pub const RETAINED: [&str; 1] = ["tombstones"];

/// What a rank publishes after each pass: its sizes now, and their high-water marks since
/// the sampler last read them, so that a peak between two samples is not missed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Marks {
    pub now: TxSizes,
    pub high: TxSizes,
}

impl Marks {
    pub fn publish(&mut self, now: TxSizes) {
        self.now = now;
        self.high = self.high.max(now);
    }

    /// The high-water marks since the last call; the next interval starts from now.
    pub fn take_high(&mut self) -> TxSizes {
        std::mem::replace(&mut self.high, self.now)
    }
}

/// One sampled size: where (rank track or instance name), what, how much, and its bound.
#[derive(Clone, Debug)]
pub struct Size {
    pub at: String,
    pub name: &'static str,
    pub value: usize,
    pub bound: usize,
}

/// The growth state of one seed: baseline, peaks, and the bounds already reported.
#[derive(Debug, Default)]
pub struct Growth {
    baseline: Option<BTreeMap<&'static str, usize>>,
    peaks: BTreeMap<&'static str, usize>,
    /// A size past its bound is reported once per seed, not once per sample.
    over: BTreeSet<&'static str>,
}

impl Growth {
    /// Rule 1 and the peaks; the first sample is the baseline. Returns what broke I11.
    pub fn observe(&mut self, sample: &[Size]) -> Vec<String> {
        if self.baseline.is_none() {
            let mut base = BTreeMap::new();
            for s in sample {
                let b = base.entry(s.name).or_insert(0);
                *b = (*b).max(s.value);
            }
            self.baseline = Some(base);
        }
        let mut broken = Vec::new();
        for s in sample {
            let peak = self.peaks.entry(s.name).or_insert(0);
            *peak = (*peak).max(s.value);
            if s.value > s.bound && self.over.insert(s.name) {
                broken.push(format!(
                    "memory growth: {} on {} holds {}, past its bound {}",
                    s.name, s.at, s.value, s.bound
                ));
            }
        }
        broken
    }

    /// Rule 2, on the last sample (taken after convergence and the tail). Returns what broke
    /// I11.
    pub fn settled(&mut self, sample: &[Size]) -> Vec<String> {
        let mut broken = self.observe(sample);
        let base = self.baseline.clone().unwrap_or_default();
        for s in sample {
            let b = base.get(s.name).copied().unwrap_or(0);
            if s.value > b && !RETAINED.contains(&s.name) {
                broken.push(format!(
                    "memory growth: {} on {} holds {} after convergence and the tail, baseline \
                     {b}: never returned",
                    s.name, s.at, s.value
                ));
            }
        }
        broken
    }

    /// The largest value of each size over the seed.
    pub fn peaks(&self) -> BTreeMap<String, u64> {
        self.peaks
            .iter()
            .map(|(k, v)| (k.to_string(), *v as u64))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(name: &'static str, value: usize) -> Size {
        Size {
            at: "ctx0/r0".to_string(),
            name,
            value,
            bound: 10,
        }
    }

    #[test]
    fn past_the_bound_once_and_not_back_at_the_end() {
        let mut g = Growth::default();
        assert!(g
            .observe(&[size("transfers", 0), size("tombstones", 0)])
            .is_empty());
        assert_eq!(g.observe(&[size("transfers", 11)]).len(), 1);
        assert!(g.observe(&[size("transfers", 12)]).is_empty(), "once");
        // Tombstones stay by design; transfers must be back at 0.
        let end = g.settled(&[size("transfers", 2), size("tombstones", 5)]);
        assert_eq!(end.len(), 1, "{end:?}");
        assert!(end[0].contains("transfers"));
        assert_eq!(g.peaks()["transfers"], 12);
        assert_eq!(g.peaks()["tombstones"], 5);
    }
}
