//! The field-hazard scenarios are clean on their own: the faults each forces on strike, every
//! request ends, and no invariant breaks (their bug switches are in `bugs.rs`).

use kvferry_sim::campaign::Campaign;
use kvferry_sim::cluster::run_seed;
use kvferry_sim::scenario::Scenario;

const SEEDS: u64 = 24;

fn clean(name: &str, forced_fault: &str) {
    let campaign = Campaign {
        scenario: Scenario::named(name).expect("named scenario"),
        seeds: 0..SEEDS,
        jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
        fail_fast: false,
        recheck_every: 8,
        replay_flags: vec!["--scenario".into(), name.into()],
    };
    let s = campaign.run(&run_seed, &mut |_| {});
    // No violation: in particular none of I7 (every request terminal) and I10 (every failure
    // caused by a fault that reached it).
    assert!(!s.failed(), "{name}: {}", kvferry_sim::render::failures(&s));
    assert_eq!(s.requests_issued, s.requests_planned, "{name}");
    assert!(s.requests_completed > 0, "{name}");
    let struck = s.faults.get(forced_fault).copied().unwrap_or(0);
    assert!(
        struck >= SEEDS,
        "{name}: {forced_fault} struck {struck} times"
    );
}

#[test]
fn abort_during_write_is_clean() {
    clean("abort-during-write", "client-cancel");
}

#[test]
fn failed_transfer_served_is_clean() {
    clean("failed-transfer-served", "agent-error");
}

#[test]
fn timeout_frees_while_reading_is_clean() {
    clean("timeout-frees-while-reading", "partition");
}

#[test]
fn lost_notification_is_clean() {
    clean("lost-notification", "lost-notification");
}

#[test]
fn evicted_before_send_is_clean() {
    clean("evicted-before-send", "evict");
}

#[test]
fn stale_endpoint_is_clean() {
    clean("stale-endpoint", "crash");
}

#[test]
fn abort_never_reclaimed_is_clean() {
    clean("abort-never-reclaimed", "client-cancel");
}
