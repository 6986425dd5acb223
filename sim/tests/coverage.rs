//! Coverage of the dangerous windows (`kvferry_sim::coverage`): the default campaign reaches
//! every window it requires, and a campaign that cannot reach one says which.

use kvferry_sim::campaign::Campaign;
use kvferry_sim::cluster::run_seed;
use kvferry_sim::coverage::Window;
use kvferry_sim::scenario::Scenario;
use std::process::Command;

/// Seeds of the default scenario that reach every window it requires (the rarest,
/// crash-during-collective, needs a crash inside an open round: seed 6 has one; the whole
/// default campaign, 500 seeds, has 6).
const SEEDS: u64 = 8;

#[test]
fn the_default_campaign_reaches_every_window_it_requires() {
    let scenario = Scenario::named("default").expect("the default scenario exists");
    let s = Campaign {
        scenario,
        seeds: 0..SEEDS,
        jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
        fail_fast: false,
        recheck_every: 0,
        replay_flags: Vec::new(),
    }
    .run(&run_seed, &mut |_| {});
    assert!(!s.failed(), "{}", kvferry_sim::render::failures(&s));
    assert_eq!(s.coverage.len(), Window::ALL.len(), "{:?}", s.coverage);
    assert!(s.missed_windows().is_empty(), "{:?}", s.coverage);
    for w in Window::ALL {
        if w.required_in(&s.scenario) {
            assert!(s.coverage[w.name()] > 0, "{}: {:?}", w.name(), s.coverage);
        }
    }
}

fn kvferry(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kvferry"))
        .args(args)
        .output()
        .expect("the kvferry binary runs")
}

/// Without faults no instance crashes, so no crash lands in a completion round: the campaign
/// is clean, yet fails under `--require-coverage`, naming what it missed on one line.
#[test]
fn require_coverage_fails_a_campaign_that_misses_a_window() {
    let args = ["sim", "--seeds", "3", "--fault-rate", "0", "--jobs", "1"];
    assert!(kvferry(&args).status.success(), "clean without the flag");
    let out = kvferry(&[&args[..], &["--require-coverage"]].concat());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.trim_end().lines().last().unwrap_or_default();
    assert!(last.starts_with("coverage: "), "{stderr}");
    assert!(last.contains("crash-during-collective"), "{last}");
    assert!(
        !last.contains("heartbeat-declared-dead"),
        "not required in the default scenario: {last}"
    );
}

#[test]
fn json_has_a_coverage_object_with_every_window() {
    let out = kvferry(&["sim", "--seeds", "2", "--jobs", "1", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let cov = v["coverage"].as_object().expect("a coverage object");
    for w in Window::ALL {
        assert!(cov[w.name()].is_u64(), "{}: {cov:?}", w.name());
    }
    assert_eq!(cov.len(), Window::ALL.len());
}
