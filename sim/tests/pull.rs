//! Pull mode: the generation side reads, the context side parks its send until "finished" or
//! the reader's loss. It keeps every invariant under every fault, and `mixed` (the default)
//! draws push or pull per seed, deterministically.

use kvferry_sim::campaign::Campaign;
use kvferry_sim::cluster::run_seed;
use kvferry_sim::scenario::Scenario;
use kvferry_sim::transfer_mode::TransferMode;

fn campaign(scenario: Scenario, seeds: u64) -> Campaign {
    Campaign {
        scenario,
        seeds: 0..seeds,
        jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
        fail_fast: false,
        recheck_every: 4,
        replay_flags: Vec::new(),
    }
}

fn pull(name: &str) -> Scenario {
    Scenario {
        transfer_mode: TransferMode::Pull,
        ..Scenario::named(name).expect("named scenario")
    }
}

#[test]
fn pull_is_clean_under_every_fault() {
    for name in ["default", "crashy", "partition-heavy", "hetero-tp", "mla"] {
        let s = campaign(pull(name), 8).run(&run_seed, &mut |_| {});
        assert!(!s.failed(), "{name}: {}", kvferry_sim::render::failures(&s));
        assert!(s.requests_completed > 0, "{name}");
        assert!(s.faults.values().sum::<u64>() > 0, "{name}");
    }
}

#[test]
fn pull_with_deadline_eviction_is_clean() {
    let sc = Scenario {
        timeout_ms: Some(20),
        inflight_cancel: true,
        ..pull("default")
    };
    let s = campaign(sc, 16).run(&run_seed, &mut |_| {});
    assert!(!s.failed(), "{}", kvferry_sim::render::failures(&s));
}

#[test]
fn pull_without_faults_completes_every_request() {
    let sc = Scenario {
        fault_rate: 0.0,
        ..pull("hetero-tp")
    };
    let s = campaign(sc, 8).run(&run_seed, &mut |_| {});
    assert!(!s.failed(), "{}", kvferry_sim::render::failures(&s));
    assert_eq!(s.requests_completed, s.requests_planned);
}

/// The mode of a seed, from its trace.
fn mode_of(seed: u64, sc: &Scenario) -> String {
    let r = run_seed(seed, sc, true);
    r.trace
        .iter()
        .find_map(|e| e.name.strip_prefix("transfer mode ").map(str::to_string))
        .expect("every seed traces its transfer mode")
}

#[test]
fn mixed_draws_both_modes_per_seed_deterministically() {
    let sc = Scenario {
        requests: 4,
        ..Scenario::named("default").expect("named")
    };
    assert_eq!(sc.transfer_mode, TransferMode::Mixed, "the default");
    let modes: Vec<String> = (0..12).map(|seed| mode_of(seed, &sc)).collect();
    assert!(modes.iter().any(|m| m == "Pull"), "{modes:?}");
    assert!(modes.iter().any(|m| m == "Push"), "{modes:?}");
    assert_eq!(mode_of(3, &sc), modes[3]);
    let forced = Scenario {
        transfer_mode: TransferMode::Push,
        ..sc
    };
    assert!((0..4).all(|seed| mode_of(seed, &forced) == "Push"));
}
