//! The soak scenario's growth rule (I11): on a small soak (the production timers and the
//! sampler, a shorter fault window and workload, so that a seed runs in seconds in a debug
//! build) a clean seed converges with every sampled size within its bound, and a table that
//! is never pruned is caught.

use kvferry_core::transceiver::TxSizes;
use kvferry_sim::cluster::{run_seed, BLOCKS_PER_INSTANCE};
use kvferry_sim::horizon::Horizon;
use kvferry_sim::scenario::Scenario;

/// A soak shrunk in its workload and fault window, not in its timers.
fn small_soak() -> Scenario {
    Scenario {
        requests: 150,
        horizon: Horizon {
            heal_at_ms: 12_000,
            max_fault_span_ms: 10_000,
            arrival_gap_us: 50_000,
            ..Horizon::SOAK
        },
        ..Scenario::named("soak").expect("named")
    }
}

#[test]
fn a_clean_soak_seed_reports_peaks_within_bounds() {
    let s = small_soak();
    let bounds = TxSizes::bounds(&s.tx_config());
    for seed in 0..2 {
        let r = run_seed(seed, &s, false);
        assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
        assert_eq!(r.requests_issued, u64::from(s.requests), "seed {seed}");
        // The sampler saw the work, not only the idle ranks.
        for busy in ["requests", "transfers", "kv_blocks_in_use", "tombstones"] {
            assert!(r.peaks[busy] > 0, "seed {seed}: {busy}: {:?}", r.peaks);
        }
        for (name, bound) in bounds.named() {
            assert!(
                r.peaks[name] <= bound as u64,
                "seed {seed}: {name} peaked at {}, bound {bound}",
                r.peaks[name]
            );
        }
        assert!(r.peaks["kv_blocks_in_use"] <= u64::from(BLOCKS_PER_INSTANCE));
    }
}

#[cfg(feature = "bug-switches")]
#[test]
fn a_transfer_table_never_pruned_is_memory_growth() {
    use kvferry_core::bugs::{Bug, BugSet};
    use kvferry_sim::report::Invariant;
    let s = Scenario {
        bugs: BugSet::NONE.with(Bug::TransferTableLeak),
        ..small_soak()
    };
    let r = run_seed(0, &s, false);
    let growth: Vec<_> = r
        .violations
        .iter()
        .filter(|v| v.invariant == Invariant::I11)
        .collect();
    assert!(
        growth.iter().any(|v| v.detail.contains("transfers ")),
        "{:?}",
        r.violations
    );
    assert_eq!(Bug::TransferTableLeak.invariant(), Invariant::I11.id());
}

/// The summary (`--json`'s `peaks`) keeps the largest of each size over the seeds.
#[test]
fn the_summary_keeps_each_peak_over_the_seeds() {
    use kvferry_sim::campaign::Campaign;
    use kvferry_sim::report::SeedReport;
    let runner = |seed: u64, _: &Scenario, _: bool| SeedReport {
        seed,
        peaks: [("transfers".to_string(), [3, 9, 4][seed as usize])].into(),
        ..SeedReport::default()
    };
    let campaign = Campaign {
        scenario: small_soak(),
        seeds: 0..3,
        jobs: 2,
        fail_fast: false,
        recheck_every: 0,
        replay_flags: Vec::new(),
    };
    let s = campaign.run(&runner, &mut |_| {});
    assert_eq!(s.peaks["transfers"], 9);
    let json = serde_json::to_value(&s).expect("serializes");
    assert_eq!(json["peaks"]["transfers"], 9);
}
