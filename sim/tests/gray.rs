//! Gray failures: seeds that once broke the progress check (I10), replayed exactly as found
//! (`kvferry replay SEED --scenario NAME --transfer-mode MODE`).
//!
//! A fix elsewhere can change a seed's run (the heartbeat fix of seed 272 changed the path of
//! seed 674: fewer silent deaths, none leaving a side without an instance), so these seeds
//! need not take the path they took when found; the unit tests beside each fix
//! (`attribution`, `core/tests/liveness.rs`) pin the mechanism itself, and so does a seed
//! that still takes seed 674's path.

use kvferry_sim::cluster::run_seed;
use kvferry_sim::report::SeedReport;
use kvferry_sim::scenario::Scenario;
use kvferry_sim::transfer_mode::TransferMode;

fn replay(seed: u64, name: &str, mode: TransferMode) -> SeedReport {
    let scenario = Scenario {
        transfer_mode: mode,
        ..Scenario::named(name).expect("named scenario")
    };
    clean(seed, &scenario)
}

fn clean(seed: u64, scenario: &Scenario) -> SeedReport {
    let name = &scenario.name;
    let r = run_seed(seed, scenario, false);
    assert!(
        r.violations.is_empty(),
        "seed {seed} {name}: {:?}",
        r.violations
    );
    r
}

/// Both context incarnations died silently; requests refused for want of one were flagged
/// I10 because only a crash was taken to remove instances.
#[test]
fn seed_674_silent_death_push_is_clean() {
    let r = replay(674, "silent-death", TransferMode::Push);
    assert!(r.faults.get("silent-death").is_some_and(|n| *n > 0));
    assert!(!r.failures_by_cause.contains_key("unattributed"));
}

/// The path seed 674 took when found, on a seed that still takes it: the only context
/// instance dies silently (no crash in the seed), and the requests that arrive before its
/// successor is up are refused for want of an instance: the silent death's doing.
#[test]
fn a_refusal_after_a_silent_death_is_attributed_to_it() {
    let scenario = Scenario {
        ctx_instances: 1,
        transfer_mode: TransferMode::Push,
        ..Scenario::named("silent-death").expect("named scenario")
    };
    // `kvferry replay 5 --scenario silent-death --ctx-instances 1 --transfer-mode push`
    let r = clean(5, &scenario);
    assert!(!r.faults.contains_key("crash"), "{:?}", r.faults);
    let refused = r.failures_by_core_cause.get("not-admitted").copied();
    assert!(
        refused.is_some_and(|n| n >= 4),
        "{:?}",
        r.failures_by_core_cause
    );
    assert!(r.failures_by_cause["silent-death"] >= refused.unwrap_or(0));
}

/// A generation rank idle for ~80 ms cut the context ranks of its next request as silent
/// at once (its liveness table was stale from before the idle spell).
#[test]
fn seed_272_asymmetric_partition_pull_is_clean() {
    let r = replay(272, "asymmetric-partition", TransferMode::Pull);
    assert!(r.faults.get("one-way-partition").is_some_and(|n| *n > 0));
    assert!(!r.failures_by_cause.contains_key("unattributed"));
}
