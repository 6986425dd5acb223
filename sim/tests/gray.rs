//! Gray failures: seeds that once broke the progress check (I10), replayed exactly as found
//! (`kvferry replay SEED --scenario NAME --transfer-mode MODE`).
//!
//! A fix elsewhere can change a seed's run (the heartbeat fix of seed 272 changed the path of
//! seed 674: fewer silent deaths, none leaving a side without an instance), so these seeds
//! need not take the path they took when found; the unit tests beside each fix
//! (`attribution`, `core/tests/liveness.rs`) pin the mechanism itself.

use kvferry_sim::cluster::run_seed;
use kvferry_sim::report::SeedReport;
use kvferry_sim::scenario::Scenario;
use kvferry_sim::transfer_mode::TransferMode;

fn replay(seed: u64, name: &str, mode: TransferMode) -> SeedReport {
    let scenario = Scenario {
        transfer_mode: mode,
        ..Scenario::named(name).expect("named scenario")
    };
    let r = run_seed(seed, &scenario, false);
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
fn seed_674_silent_death_push_attributes_refusals_to_the_silent_death() {
    let r = replay(674, "silent-death", TransferMode::Push);
    assert!(r.faults.get("silent-death").is_some_and(|n| *n > 0));
    assert!(!r.failures_by_cause.contains_key("unattributed"));
}

/// A generation rank idle for ~80 ms cut the context ranks of its next request as silent
/// at once (its liveness table was stale from before the idle spell).
#[test]
fn seed_272_asymmetric_partition_pull_is_clean() {
    let r = replay(272, "asymmetric-partition", TransferMode::Pull);
    assert!(r.faults.get("one-way-partition").is_some_and(|n| *n > 0));
    assert!(!r.failures_by_cause.contains_key("unattributed"));
}
