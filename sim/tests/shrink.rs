//! Shrinking (`kvferry shrink`): for bug switches of several invariants, a failing seed
//! shrinks to no more fault events than it drew (strictly fewer when it drew several), the
//! reduced schedule replays to the same invariant, and a seed that breaks nothing is refused.
//! The full set of bug switches runs in the ignored `every_bug_switch_shrinks` (release).
#![cfg(feature = "bug-switches")]

use kvferry_core::bugs::Bug;
use kvferry_sim::cli::{parse_invariant, ScenarioArgs, TimeoutMs};
use kvferry_sim::cluster::{run_schedule, run_seed};
use kvferry_sim::scenario::Scenario;
use kvferry_sim::shrink::{shrink, ShrinkJob, Shrunk, MAX_RUNS};
use std::process::Command;

/// Seeds searched for one that breaks the bug's invariant.
const MAX_SEEDS: u64 = 200;
/// Fewer requests than the scenarios' 64, and a lower run bound, keep the debug run short.
const REQUESTS: u32 = 16;
const TEST_RUNS: u32 = 150;

fn args(scenario: &str) -> ScenarioArgs {
    ScenarioArgs {
        scenario: scenario.to_string(),
        ..ScenarioArgs::default()
    }
}

fn with_timeout(inflight_cancel: bool) -> ScenarioArgs {
    ScenarioArgs {
        timeout_ms: Some(TimeoutMs(Some(20))),
        inflight_cancel: Some(inflight_cancel),
        ..args("default")
    }
}

/// Every bug switch with the scenario `tests/bugs.rs` catches it in.
fn cases() -> Vec<(Bug, ScenarioArgs)> {
    let d = || args("default");
    vec![
        (Bug::ReleaseEarly, d()),
        (Bug::LeakSlotOnError, d()),
        (Bug::DropAgentEarly, d()),
        (Bug::WarnNoDedup, with_timeout(false)),
        (Bug::WarnBeforeReady, with_timeout(false)),
        (Bug::FreeBlocksDuringTransfer, with_timeout(true)),
        (Bug::ReusePoisonedSlot, with_timeout(true)),
        (Bug::SkipIdleCollective, d()),
        (Bug::SkipTokenCheck, d()),
        (Bug::AcceptAnyAbort, d()),
        (Bug::AskBeforePosted, d()),
        (Bug::IgnoreHeartbeats, args("silent-death")),
        (Bug::AbortDuringWrite, args("abort-during-write")),
        (Bug::FailedTransferServed, args("failed-transfer-served")),
        (
            Bug::TimeoutFreesWhileReading,
            args("timeout-frees-while-reading"),
        ),
        (Bug::LostNotification, args("lost-notification")),
        (Bug::EvictedBeforeSend, args("evicted-before-send")),
        (Bug::StaleEndpoint, args("stale-endpoint")),
        (Bug::AbortNeverReclaimed, args("abort-never-reclaimed")),
    ]
}

/// The lowest seed that breaks `bug`'s invariant.
fn failing_seed(bug: Bug, scenario: &Scenario) -> u64 {
    (0..MAX_SEEDS)
        .find(|&seed| {
            let r = run_seed(seed, scenario, false);
            r.violations
                .iter()
                .any(|v| v.invariant.id() == bug.invariant())
        })
        .unwrap_or_else(|| {
            panic!(
                "{bug}: no seed below {MAX_SEEDS} breaks {}",
                bug.invariant()
            )
        })
}

/// Shrinks `bug`'s failing seed and checks the result; returns it with its job.
fn shrinks(
    bug: Bug,
    args: ScenarioArgs,
    requests: Option<u32>,
    max_runs: u32,
) -> (ShrinkJob, Shrunk) {
    let args = ScenarioArgs {
        inject_bug: vec![bug],
        requests,
        ..args
    };
    let scenario = args.build().expect("valid scenario");
    let job = ShrinkJob {
        seed: failing_seed(bug, &scenario),
        scenario,
        invariant: Some(parse_invariant(bug.invariant()).expect("an invariant")),
        max_runs,
    };
    let s = shrink(&job, &mut |_| {}).unwrap_or_else(|e| panic!("{bug}: {e:#}"));
    let (before, after) = (s.before.faults.len(), s.after.faults.len());
    assert!(after <= before, "{bug}: {before} -> {after} fault events");
    if before > 1 {
        assert!(after < before, "{bug}: {before} fault events not reduced");
    }
    assert!(
        s.after.requests.len() <= s.before.requests.len(),
        "{bug}: requests grew"
    );
    let (report, _) = run_schedule(job.seed, &job.scenario, Some(&s.after), false);
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.invariant.id() == bug.invariant()),
        "{bug}: the reduced schedule of seed {} does not break {}",
        job.seed,
        bug.invariant()
    );
    (job, s)
}

/// A seed's recorded schedule replays it exactly (same trace hash) in every kind of scenario:
/// the schedule takes the seed's random numbers as the seed did.
#[test]
fn a_recorded_schedule_replays_its_seed_exactly() {
    for name in [
        "default",
        "crashy",
        "partition-heavy",
        "silent-death",
        "stalled-reader",
        "wedged-agent",
        "asymmetric-partition",
        "lost-notification",
        "evicted-before-send",
    ] {
        let scenario = ScenarioArgs {
            requests: Some(REQUESTS),
            ..args(name)
        }
        .build()
        .expect("valid");
        for seed in 0..3 {
            let (first, recorded) = run_schedule(seed, &scenario, None, false);
            let (again, ran) = run_schedule(seed, &scenario, Some(&recorded), false);
            assert_eq!(first.trace_hash, again.trace_hash, "{name} seed {seed}");
            assert_eq!(recorded, ran, "{name} seed {seed}");
        }
    }
}

#[test]
fn release_early_shrinks_to_an_i1_schedule() {
    shrinks(
        Bug::ReleaseEarly,
        args("default"),
        Some(REQUESTS),
        TEST_RUNS,
    );
}

#[test]
fn free_blocks_during_transfer_shrinks_to_an_i5_schedule() {
    shrinks(
        Bug::FreeBlocksDuringTransfer,
        with_timeout(true),
        Some(REQUESTS),
        TEST_RUNS,
    );
}

#[test]
fn skip_token_check_shrinks_to_an_i9_schedule_deterministically() {
    let (job, first) = shrinks(
        Bug::SkipTokenCheck,
        args("default"),
        Some(REQUESTS),
        TEST_RUNS,
    );
    let again = shrink(&job, &mut |_| {}).expect("shrinks again");
    assert_eq!(first.after, again.after);
    assert_eq!(first.runs, again.runs);
}

#[test]
fn leak_slot_on_error_shrinks_to_an_i2_schedule() {
    shrinks(
        Bug::LeakSlotOnError,
        args("default"),
        Some(REQUESTS),
        TEST_RUNS,
    );
}

#[test]
fn a_seed_that_breaks_nothing_is_refused() {
    let scenario = ScenarioArgs {
        requests: Some(4),
        ..args("default")
    };
    let job = ShrinkJob {
        seed: 0,
        scenario: scenario.build().expect("valid"),
        invariant: None,
        max_runs: TEST_RUNS,
    };
    let e = shrink(&job, &mut |_| {}).expect_err("nothing to shrink");
    assert!(e.to_string().contains("breaks no invariant"), "{e}");
    let out = Command::new(env!("CARGO_BIN_EXE_kvferry"))
        .args(["shrink", "0", "--requests", "4"])
        .output()
        .expect("the kvferry binary runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: seed 0 breaks no invariant"),
        "{stderr}"
    );
}

/// Every bug switch with its scenario's own workload and the full run bound; prints one row
/// per switch. Slow: `cargo nextest run --release -p kvferry-sim --all-features --run-ignored
/// only every_bug_switch_shrinks --no-capture`.
#[test]
#[ignore]
fn every_bug_switch_shrinks() {
    println!("| bug switch | invariant | seed | fault events | requests | runs |");
    for (bug, args) in cases() {
        let (job, s) = shrinks(bug, args, None, MAX_RUNS);
        println!(
            "| {bug} | {} | {} | {} -> {} | {} -> {} | {} |",
            s.invariant.id(),
            job.seed,
            s.before.faults.len(),
            s.after.faults.len(),
            s.before.requests.len(),
            s.after.requests.len(),
            s.runs
        );
    }
}
