//! Seed campaigns: run a range of seeds on a pool of threads and fold their reports, in seed
//! order, into one [`Summary`].
//!
//! Every number in a summary except the wall-clock ones depends only on the scenario and the
//! seed range, never on `jobs`: each seed runs in its own madsim runtime, and reports are folded
//! in seed order whatever order the threads finish in.

use crate::coverage;
use crate::report::{Invariant, SeedReport, Violation};
use crate::scenario::Scenario;
use serde::Serialize;
use std::collections::BTreeMap;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;

/// Simulates one seed: `kvferry_sim::cluster::run_seed` or a stand-in in tests.
pub trait SeedRunner: Sync {
    fn run(&self, seed: u64, scenario: &Scenario, keep_trace: bool) -> SeedReport;
}

impl<F: Fn(u64, &Scenario, bool) -> SeedReport + Sync> SeedRunner for F {
    fn run(&self, seed: u64, scenario: &Scenario, keep_trace: bool) -> SeedReport {
        self(seed, scenario, keep_trace)
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Campaign {
    pub scenario: Scenario,
    pub seeds: Range<u64>,
    /// Threads (at most one per seed; 0 counts as 1).
    pub jobs: usize,
    /// Stop at the lowest failing seed: seeds above it are not run, or are dropped.
    pub fail_fast: bool,
    /// Every seed that is a multiple of this runs twice and must give the same trace hash (I8).
    /// 0 turns the check off.
    pub recheck_every: u64,
    /// Scenario flags for the replay command of a failing seed (`ScenarioArgs::to_flags`).
    pub replay_flags: Vec<String>,
}

/// One invariant broken in one seed: its first breaking event and how to reproduce it.
#[derive(Clone, Debug, Serialize)]
pub struct FailingSeed {
    pub seed: u64,
    pub invariant: Invariant,
    pub at_us: u64,
    pub detail: String,
    pub replay: String,
}

/// A seed whose simulation panicked: a simulator bug, reported like a failure.
#[derive(Clone, Debug, Serialize)]
pub struct PanickedSeed {
    pub seed: u64,
    pub message: String,
    pub replay: String,
}

/// The folded outcome of a campaign. Serialized as the `kvferry sim --json` object.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub scenario: Scenario,
    /// The requested range `[start, end)`.
    pub seed_range: [u64; 2],
    /// Seeds folded in: the whole range, or up to the first failure with fail-fast.
    pub seeds: u64,
    /// Threads used.
    pub jobs: usize,
    pub sim_time_us: u64,
    pub wall_time_s: f64,
    pub events: u64,
    pub requests_planned: u64,
    pub requests_issued: u64,
    pub requests_completed: u64,
    pub requests_failed: u64,
    pub requests_cancelled: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// Requests that failed or were cancelled, by attributed cause (I10; see `SeedReport`).
    pub failures_by_cause: BTreeMap<String, u64>,
    /// The same requests by the core's `FailCause` of the first rank that failed them.
    pub failures_by_core_cause: BTreeMap<String, u64>,
    /// Violations reported, by invariant id ("I5").
    pub violations: BTreeMap<&'static str, u64>,
    /// One entry per (seed, invariant), the invariant's earliest violation in that seed.
    pub failing_seeds: Vec<FailingSeed>,
    pub panicked_seeds: Vec<PanickedSeed>,
    pub seeds_per_minute: f64,
    pub sim_seconds_per_wall_second: f64,
    /// The worst convergence time of any seed (`SeedReport::convergence_us`), and its seed.
    pub worst_convergence_us: u64,
    pub worst_convergence_seed: Option<u64>,
    /// Dangerous windows reached, summed over the seeds, every window listed (`coverage`).
    pub coverage: BTreeMap<String, u64>,
    /// The peak of each sampled size over every seed (`SeedReport::peaks`; I11).
    pub peaks: BTreeMap<String, u64>,
}

impl Summary {
    pub fn failed(&self) -> bool {
        !self.failing_seeds.is_empty() || !self.panicked_seeds.is_empty()
    }

    /// The windows this campaign's scenario requires that no seed reached.
    pub fn missed_windows(&self) -> Vec<&'static str> {
        coverage::missed(&self.coverage, &self.scenario)
    }
}

/// Campaign progress, reported after each seed in completion order.
#[derive(Clone, Copy, Debug)]
pub struct Tick {
    pub done: u64,
    pub total: u64,
    pub failing: u64,
}

/// The replay command of one seed, runnable from a checkout.
pub fn replay_command(seed: u64, flags: &[String], bug_switches: bool) -> String {
    let features = if bug_switches {
        " --features bug-switches"
    } else {
        ""
    };
    format!(
        "cargo run --release -p kvferry-sim{features} --bin kvferry -- replay {seed} {} \
         --trace seed-{seed}.json",
        flags.join(" ")
    )
}

/// A seed's outcome as a worker hands it over.
type Outcome = Result<SeedReport, String>;

impl Campaign {
    /// Runs the campaign, calling `on_tick` on this thread after every seed.
    pub fn run(&self, runner: &dyn SeedRunner, on_tick: &mut dyn FnMut(Tick)) -> Summary {
        let start = Instant::now();
        let next = AtomicU64::new(self.seeds.start);
        // Seeds at or above `limit` are not started; fail-fast lowers it to just past the
        // lowest failing seed seen so far.
        let limit = AtomicU64::new(self.seeds.end);
        let (tx, rx) = mpsc::channel::<(u64, Outcome)>();
        let total = self.seeds.end - self.seeds.start;
        let threads = self
            .jobs
            .clamp(1, usize::try_from(total).unwrap_or(usize::MAX));
        let mut fold = Fold::new(self, threads);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                let tx = tx.clone();
                let (next, limit) = (&next, &limit);
                scope.spawn(move || loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= limit.load(Ordering::Relaxed) {
                        break;
                    }
                    let outcome = self.run_one(runner, seed);
                    if self.fail_fast && outcome.as_ref().map_or(true, |r| !r.violations.is_empty())
                    {
                        limit.fetch_min(seed + 1, Ordering::Relaxed);
                    }
                    if tx.send((seed, outcome)).is_err() {
                        break;
                    }
                });
            }
            drop(tx);
            for (done, (seed, outcome)) in (1..).zip(rx) {
                fold.offer(seed, outcome);
                on_tick(Tick {
                    done,
                    total,
                    failing: fold.failing,
                });
            }
        });
        fold.finish(start.elapsed().as_secs_f64())
    }

    fn run_one(&self, runner: &dyn SeedRunner, seed: u64) -> Outcome {
        let run = || runner.run(seed, &self.scenario, false);
        let mut report = catch_unwind(AssertUnwindSafe(run)).map_err(panic_message)?;
        if self.recheck_every != 0 && seed.is_multiple_of(self.recheck_every) {
            let again = catch_unwind(AssertUnwindSafe(run)).map_err(panic_message)?;
            if again.trace_hash != report.trace_hash {
                report.violations.push(Violation {
                    invariant: Invariant::I8,
                    at_us: 0,
                    detail: format!(
                        "trace hash {:#018x} on the first run, {:#018x} on the second",
                        report.trace_hash, again.trace_hash
                    ),
                });
            }
        }
        Ok(report)
    }

    fn replay(&self, seed: u64) -> String {
        replay_command(seed, &self.replay_flags, !self.scenario.bugs.is_empty())
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-text payload".to_string())
}

/// Folds outcomes in seed order: out-of-order ones wait in `pending`.
struct Fold<'a> {
    campaign: &'a Campaign,
    summary: Summary,
    next: u64,
    pending: BTreeMap<u64, Outcome>,
    /// Failing seeds received so far, in any order (for progress only).
    failing: u64,
    stopped: bool,
}

impl<'a> Fold<'a> {
    fn new(campaign: &'a Campaign, threads: usize) -> Self {
        let summary = Summary {
            scenario: campaign.scenario.clone(),
            seed_range: [campaign.seeds.start, campaign.seeds.end],
            seeds: 0,
            jobs: threads,
            sim_time_us: 0,
            wall_time_s: 0.0,
            events: 0,
            requests_planned: 0,
            requests_issued: 0,
            requests_completed: 0,
            requests_failed: 0,
            requests_cancelled: 0,
            faults: BTreeMap::new(),
            failures_by_cause: BTreeMap::new(),
            failures_by_core_cause: BTreeMap::new(),
            violations: BTreeMap::new(),
            failing_seeds: Vec::new(),
            panicked_seeds: Vec::new(),
            seeds_per_minute: 0.0,
            sim_seconds_per_wall_second: 0.0,
            worst_convergence_us: 0,
            worst_convergence_seed: None,
            coverage: coverage::zero(),
            peaks: BTreeMap::new(),
        };
        Fold {
            campaign,
            summary,
            next: campaign.seeds.start,
            pending: BTreeMap::new(),
            failing: 0,
            stopped: false,
        }
    }

    fn offer(&mut self, seed: u64, outcome: Outcome) {
        if outcome.as_ref().map_or(true, |r| !r.violations.is_empty()) {
            self.failing += 1;
        }
        self.pending.insert(seed, outcome);
        while let Some(outcome) = self.pending.remove(&self.next) {
            // Under fail-fast, seeds past the first failure may still have been run by
            // another thread; dropping them keeps the summary independent of `jobs`.
            if !self.stopped {
                self.stopped = self.add(self.next, outcome) && self.campaign.fail_fast;
            }
            self.next += 1;
        }
    }

    /// Adds one seed; true if it failed.
    fn add(&mut self, seed: u64, outcome: Outcome) -> bool {
        let s = &mut self.summary;
        s.seeds += 1;
        let report = match outcome {
            Ok(r) => r,
            Err(message) => {
                let replay = self.campaign.replay(seed);
                s.panicked_seeds.push(PanickedSeed {
                    seed,
                    message,
                    replay,
                });
                return true;
            }
        };
        s.sim_time_us += report.sim_time_us;
        s.events += report.events;
        if s.worst_convergence_seed.is_none() || report.convergence_us > s.worst_convergence_us {
            s.worst_convergence_us = report.convergence_us;
            s.worst_convergence_seed = Some(seed);
        }
        s.requests_planned += report.requests_planned;
        s.requests_issued += report.requests_issued;
        s.requests_completed += report.requests_completed;
        s.requests_failed += report.requests_failed;
        s.requests_cancelled += report.requests_cancelled;
        for (into, from) in [
            (&mut s.faults, &report.faults),
            (&mut s.failures_by_cause, &report.failures_by_cause),
            (
                &mut s.failures_by_core_cause,
                &report.failures_by_core_cause,
            ),
            (&mut s.coverage, &report.coverage),
        ] {
            for (k, n) in from {
                *into.entry(k.clone()).or_default() += n;
            }
        }
        for (k, n) in &report.peaks {
            let peak = s.peaks.entry(k.clone()).or_default();
            *peak = (*peak).max(*n);
        }
        for v in &report.violations {
            *s.violations.entry(v.invariant.id()).or_default() += 1;
        }
        for v in first_per_invariant(&report.violations) {
            s.failing_seeds.push(FailingSeed {
                seed,
                invariant: v.invariant,
                at_us: v.at_us,
                detail: v.detail.clone(),
                replay: self.campaign.replay(seed),
            });
        }
        !report.violations.is_empty()
    }

    fn finish(mut self, wall_s: f64) -> Summary {
        let s = &mut self.summary;
        s.wall_time_s = wall_s;
        if wall_s > 0.0 {
            s.seeds_per_minute = s.seeds as f64 * 60.0 / wall_s;
            s.sim_seconds_per_wall_second = s.sim_time_us as f64 / 1e6 / wall_s;
        }
        self.summary
    }
}

/// The earliest violation of each invariant (the first listed on equal times).
fn first_per_invariant(violations: &[Violation]) -> Vec<&Violation> {
    let mut first: BTreeMap<Invariant, &Violation> = BTreeMap::new();
    for v in violations {
        first
            .entry(v.invariant)
            .and_modify(|f| {
                if v.at_us < f.at_us {
                    *f = v;
                }
            })
            .or_insert(v);
    }
    first.into_values().collect()
}
