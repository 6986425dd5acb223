//! One short simulated run per input: the input picks the madsim seed (which draws the swarm
//! fault mix and every fault's timing), the named scenario whose fault emphasis applies, a
//! small cluster shape, up to 8 requests, the fault rate and the timeout / `inflight_cancel`
//! knobs. `kvferry_sim::cluster::run_seed` runs it to quiescence and checks every invariant;
//! the target fails on any violation or panic. With `recheck` the seed runs twice and must
//! give the same trace hash (I8).
//!
//! Needs `--cfg madsim` (RUSTFLAGS="--cfg madsim", see fuzz/README.md): without it madsim
//! runs on real time and sockets, and a seed takes seconds of wall time instead of ~10 ms.
#![no_main]

use arbitrary::Arbitrary;
use kvferry_sim::cluster::run_seed;
use kvferry_sim::scenario::{Scenario, SCENARIOS};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    seed: u64,
    /// Index into `SCENARIOS`: the name sets which fault kinds are emphasised, and `mla` the
    /// MLA model (kept with the name so every input is a `kvferry replay` command line).
    scenario: u8,
    ctx_instances: u8,
    gen_instances: u8,
    /// TP folds into {1, 2, 4} (the simulated model has 4 kv heads), PP into {1, 2}.
    ctx_tp: u8,
    ctx_pp: u8,
    gen_tp: u8,
    gen_pp: u8,
    requests: u8,
    /// In tenths: 0.0..=2.5 (0 turns faults off).
    fault_rate: u8,
    /// `kv_transfer_timeout_ms` (folded to 1..=100) or unset.
    timeout_ms: Option<u8>,
    /// Only honoured with a timeout: the config requires one.
    inflight_cancel: bool,
    recheck: bool,
}

fn tp(v: u8) -> u32 {
    [1, 2, 4][usize::from(v % 3)]
}

fn scenario(i: &Input) -> Scenario {
    let name = SCENARIOS[usize::from(i.scenario) % SCENARIOS.len()];
    let base = Scenario::named(name).expect("SCENARIOS are all named");
    let timeout_ms = i.timeout_ms.map(|t| 1 + u64::from(t % 100));
    Scenario {
        ctx_instances: 1 + u32::from(i.ctx_instances % 2),
        gen_instances: 1 + u32::from(i.gen_instances % 2),
        ctx_tp: tp(i.ctx_tp),
        ctx_pp: 1 + u32::from(i.ctx_pp % 2),
        gen_tp: tp(i.gen_tp),
        gen_pp: 1 + u32::from(i.gen_pp % 2),
        requests: 1 + u32::from(i.requests % 8),
        fault_rate: f64::from(i.fault_rate % 26) / 10.0,
        inflight_cancel: i.inflight_cancel && timeout_ms.is_some(),
        timeout_ms,
        ..base
    }
}

fuzz_target!(|input: Input| {
    let s = scenario(&input);
    let report = run_seed(input.seed, &s, false);
    assert!(
        report.violations.is_empty(),
        "seed {} of {s:?}: {:#?}",
        input.seed,
        report.violations
    );
    if input.recheck {
        let again = run_seed(input.seed, &s, false);
        assert_eq!(
            report.trace_hash, again.trace_hash,
            "seed {}: same seed, other trace (I8)",
            input.seed
        );
    }
});
