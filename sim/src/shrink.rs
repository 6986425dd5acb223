//! Shrinking: reduces a failing seed's schedule (`schedule`) to a small one that still
//! breaks the same invariant.
//!
//! Delta debugging (ddmin) over the fault events, then over the requests, then each remaining
//! event and request is simplified (a shorter span, an earlier draw, fewer blocks). A
//! candidate is kept only if its run breaks the target invariant. Runs are bounded
//! (`MAX_RUNS`) and every candidate is a pure function of the seed, the scenario and the
//! schedule, so shrinking the same seed twice gives the same result.

use crate::cluster::run_schedule;
use crate::report::{Invariant, Violation};
use crate::scenario::Scenario;
use crate::schedule::{FaultEvent, RequestSpec, Schedule};
use anyhow::{bail, ensure, Result};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Default bound on the seeds a shrink simulates.
pub const MAX_RUNS: u32 = 2000;

/// What to shrink.
#[derive(Clone, Debug)]
pub struct ShrinkJob {
    pub seed: u64,
    pub scenario: Scenario,
    /// The invariant to keep broken; the seed's earliest violation when `None`.
    pub invariant: Option<Invariant>,
    pub max_runs: u32,
}

/// A shrink's outcome.
#[derive(Clone, Debug)]
pub struct Shrunk {
    pub invariant: Invariant,
    /// The seed's own schedule.
    pub before: Schedule,
    /// The reduced schedule, as its last run followed it (times it struck).
    pub after: Schedule,
    /// The target invariant's first violation under `after`.
    pub violation: Violation,
    /// Seeds simulated.
    pub runs: u32,
}

/// Runs candidates, each at most once, within the run bound.
struct Oracle<'a> {
    job: &'a ShrinkJob,
    invariant: Invariant,
    runs: u32,
    seen: HashMap<Schedule, bool>,
    log: &'a mut dyn FnMut(String),
}

impl Oracle<'_> {
    /// Whether `candidate` breaks the target invariant; false once the runs are spent.
    fn fails(&mut self, candidate: &Schedule) -> bool {
        if let Some(&f) = self.seen.get(candidate) {
            return f;
        }
        if self.runs >= self.job.max_runs {
            return false;
        }
        self.runs += 1;
        let f = self
            .run(candidate)
            .is_some_and(|(v, _)| v.invariant == self.invariant);
        self.seen.insert(candidate.clone(), f);
        f
    }

    /// The target invariant's first violation under `candidate` (or the first violation of
    /// any other invariant), and the schedule the run followed. A run that panicked with no
    /// violation (a simulator bug the candidate reaches) counts as passing.
    fn run(&self, candidate: &Schedule) -> Option<(Violation, Schedule)> {
        let (job, inv) = (self.job, self.invariant);
        let (report, ran) = catch_unwind(AssertUnwindSafe(|| {
            run_schedule(job.seed, &job.scenario, Some(candidate), false)
        }))
        .ok()?;
        let mut vs = report.violations;
        vs.sort_by_key(|v| (v.invariant != inv, v.at_us));
        Some((vs.into_iter().next()?, ran))
    }

    fn progress(&mut self, phase: &str, s: &Schedule) {
        (self.log)(format!(
            "shrink: {phase}: {} fault events, {} requests ({} runs)",
            s.faults.len(),
            s.requests.len(),
            self.runs
        ));
    }
}

/// Shrinks `job`'s seed, logging progress lines to `log`. Errs if the seed breaks no
/// invariant (or not the one asked for).
pub fn shrink(job: &ShrinkJob, log: &mut dyn FnMut(String)) -> Result<Shrunk> {
    let (report, before) = run_schedule(job.seed, &job.scenario, None, false);
    let Some(first) = report.violations.iter().min_by_key(|v| v.at_us) else {
        bail!(
            "seed {} breaks no invariant of scenario {}: nothing to shrink",
            job.seed,
            job.scenario.name
        );
    };
    let invariant = job.invariant.unwrap_or(first.invariant);
    ensure!(
        report.violations.iter().any(|v| v.invariant == invariant),
        "seed {} breaks {} but not {}: nothing to shrink",
        job.seed,
        ids(&report.violations),
        invariant.id()
    );
    let mut o = Oracle {
        job,
        invariant,
        runs: 1,
        seen: HashMap::new(),
        log,
    };
    ensure!(
        o.fails(&before),
        "seed {} does not break {} again under its own recorded schedule (nondeterminism)",
        job.seed,
        invariant.id()
    );
    o.progress("start", &before);
    let after = reduce(&mut o, before.clone());
    // Keep what the last run followed when it still fails: it is what a replay reads.
    let (violation, ran) = o.run(&after).expect("the reduced schedule fails");
    let after = if o.fails(&ran) { ran } else { after };
    Ok(Shrunk {
        invariant,
        before,
        after,
        violation,
        runs: o.runs,
    })
}

fn ids(vs: &[Violation]) -> String {
    let mut ids: Vec<&str> = vs.iter().map(|v| v.invariant.id()).collect();
    ids.sort_unstable();
    ids.dedup();
    ids.join(", ")
}

/// The phases, each starting from the last one's (failing) result.
fn reduce(o: &mut Oracle, s: Schedule) -> Schedule {
    let requests = s.requests.clone();
    let faults = ddmin(s.faults, &mut |f| {
        o.fails(&Schedule {
            faults: f.to_vec(),
            requests: requests.clone(),
        })
    });
    let s = Schedule { faults, requests };
    o.progress("fault events", &s);
    let faults = s.faults.clone();
    let requests = ddmin(s.requests, &mut |r| {
        o.fails(&Schedule {
            faults: faults.clone(),
            requests: r.to_vec(),
        })
    });
    let s = Schedule { faults, requests };
    o.progress("requests", &s);
    let s = simplify(o, s);
    o.progress("simplified", &s);
    s
}

/// Delta debugging (Zeller's ddmin): a subsequence of `items` that still `fails` and from
/// which no single chunk at the finest granularity tried can be removed. `fails(items)` must
/// hold.
fn ddmin<T: Clone>(items: Vec<T>, fails: &mut dyn FnMut(&[T]) -> bool) -> Vec<T> {
    if fails(&[]) {
        return Vec::new();
    }
    let mut cur = items;
    let mut n = 2;
    while cur.len() >= 2 {
        let chunks: Vec<Vec<T>> = cur
            .chunks(cur.len().div_ceil(n))
            .map(<[T]>::to_vec)
            .collect();
        if let Some(c) = chunks.iter().find(|c| fails(c)) {
            (cur, n) = (c.clone(), 2);
            continue;
        }
        // With two chunks, each one's complement is the other, already tried.
        let complement = |i: usize| -> Vec<T> {
            let rest = chunks.iter().enumerate().filter(|(j, _)| *j != i);
            rest.flat_map(|(_, c)| c.iter().cloned()).collect()
        };
        let found = (chunks.len() > 2)
            .then(|| (0..chunks.len()).map(complement).find(|c| fails(c)))
            .flatten();
        if let Some(c) = found {
            (cur, n) = (c, (n - 1).max(2));
            continue;
        }
        if n >= cur.len() {
            break;
        }
        n = (2 * n).min(cur.len());
    }
    cur
}

/// Simpler variants of each event and request, tried in order until one still fails;
/// repeated until a pass changes nothing.
fn simplify(o: &mut Oracle, mut s: Schedule) -> Schedule {
    loop {
        let mut changed = false;
        for i in 0..s.faults.len() {
            for e in simpler_event(&s.faults[i]) {
                let mut c = s.clone();
                c.faults[i] = e;
                if o.fails(&c) {
                    (s, changed) = (c, true);
                    break;
                }
            }
        }
        for i in 0..s.requests.len() {
            for r in simpler_request(&s.requests[i]) {
                let mut c = s.clone();
                c.requests[i] = r;
                if o.fails(&c) {
                    (s, changed) = (c, true);
                    break;
                }
            }
        }
        if !changed {
            return s;
        }
    }
}

/// Shorter spans, then earlier draws (for a timed fault, an earlier tick), simplest first.
fn simpler_event(e: &FaultEvent) -> Vec<FaultEvent> {
    let mut out = Vec::new();
    if let Some(span) = e.span_ms.filter(|&s| s > 1) {
        for shorter in smaller(span, 1) {
            out.push(FaultEvent {
                span_ms: Some(shorter),
                ..e.clone()
            });
        }
    }
    for earlier in smaller(u64::from(e.nth), 0) {
        out.push(FaultEvent {
            nth: earlier as u32,
            ..e.clone()
        });
    }
    out
}

/// Fewer blocks, simplest first.
fn simpler_request(r: &RequestSpec) -> Vec<RequestSpec> {
    smaller(u64::from(r.blocks), 1)
        .into_iter()
        .map(|b| RequestSpec {
            blocks: b as u32,
            ..r.clone()
        })
        .collect()
}

/// Values below `v` down to `floor`, smallest first: the floor, a quarter, half, one less.
fn smaller(v: u64, floor: u64) -> Vec<u64> {
    let mut out: Vec<u64> = [floor, v / 4, v / 2, v.saturating_sub(1)]
        .into_iter()
        .filter(|&x| x >= floor && x < v)
        .collect();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddmin_finds_the_two_needed_items() {
        let items: Vec<u32> = (0..40).collect();
        let mut runs = 0;
        let got = ddmin(items, &mut |s| {
            runs += 1;
            s.contains(&7) && s.contains(&31)
        });
        assert_eq!(got, vec![7, 31]);
        assert!(runs < 100, "{runs} runs");
    }

    #[test]
    fn ddmin_keeps_nothing_when_nothing_is_needed() {
        assert!(ddmin(vec![1, 2, 3], &mut |_| true).is_empty());
    }

    #[test]
    fn smaller_values_are_below_and_above_the_floor() {
        assert_eq!(smaller(20, 1), vec![1, 5, 10, 19]);
        assert_eq!(smaller(2, 1), vec![1]);
        assert!(smaller(1, 1).is_empty());
        assert_eq!(smaller(3, 0), vec![0, 1, 2]);
    }
}
