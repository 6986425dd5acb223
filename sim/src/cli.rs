//! Command-line definitions of the `kvferry` binary: `sim`, `replay`, `shrink` and `plan`.
//!
//! Scenario flags are shared by `sim` and `replay` so that the replay command printed for a
//! failing seed is the campaign's own flags, and so reproduces the same seed exactly.

use crate::plan_cmd::PlanArgs;
use crate::report::Invariant;
use crate::scenario::{Scenario, SCENARIOS};
use crate::shrink::MAX_RUNS;
use crate::transfer_mode::TransferMode;
use anyhow::{ensure, Context, Result};
use clap::{Args, Parser, Subcommand};
use kvferry_core::bugs::Bug;
use kvferry_core::config::TransceiverConfig;
use std::ops::Range;
use std::path::PathBuf;

/// Default `--seeds` of `kvferry sim`.
pub const DEFAULT_SEEDS: Range<u64> = 0..500;

/// Moves KV caches between prefill and decode instances; proves it under deterministic
/// simulation with injected faults.
#[derive(Parser, Debug)]
#[command(name = "kvferry", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a seed campaign: simulate many seeds, check every invariant, print a summary.
    Sim(SimArgs),
    /// Re-run one seed, print its report and optionally write a Perfetto timeline.
    Replay(ReplayArgs),
    Shrink(ShrinkArgs),
    Plan(PlanArgs),
}

#[derive(Args, Debug)]
pub struct SimArgs {
    /// Seeds to run: `A..B` (half-open) or `N` (meaning 0..N).
    #[arg(long, value_name = "RANGE", default_value = "0..500", value_parser = parse_seeds)]
    pub seeds: Range<u64>,
    /// Seeds simulated in parallel (one madsim runtime per thread). Defaults to the number of
    /// CPUs. Results do not depend on it.
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
    /// Stop at the lowest failing seed instead of running the whole range.
    #[arg(long)]
    pub fail_fast: bool,
    /// Run every Nth seed twice and compare trace hashes (invariant I8); 0 turns it off.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub recheck_every: u64,
    /// Print the summary as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Fail the campaign (exit 1) if no seed reached one of the dangerous windows its
    /// scenario requires (see sim/README.md).
    #[arg(long)]
    pub require_coverage: bool,
    #[command(flatten)]
    pub scenario: ScenarioArgs,
}

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// The seed to re-run.
    pub seed: u64,
    /// Write the seed's timeline as Chrome-trace JSON (open it in ui.perfetto.dev).
    #[arg(long, value_name = "PATH")]
    pub trace: Option<PathBuf>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Run the seed under this schedule (written by `kvferry shrink`) instead of its own
    /// fault draws and requests.
    #[arg(long, value_name = "PATH")]
    pub schedule: Option<PathBuf>,
    #[command(flatten)]
    pub scenario: ScenarioArgs,
}

/// Reduce a failing seed's faults and requests to a small schedule that still breaks the
/// same invariant, write it, and print the command that replays it.
#[derive(Args, Debug)]
pub struct ShrinkArgs {
    /// The failing seed.
    pub seed: u64,
    /// The invariant to keep broken (e.g. I5); the seed's earliest violation by default.
    #[arg(long, value_name = "ID", value_parser = parse_invariant)]
    pub invariant: Option<Invariant>,
    /// Where to write the reduced schedule (default: shrink-seed-SEED.json).
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
    /// Most seeds to simulate while shrinking.
    #[arg(long, value_name = "N", default_value_t = MAX_RUNS)]
    pub max_runs: u32,
    #[command(flatten)]
    pub scenario: ScenarioArgs,
}

/// Every invariant, for `--invariant`.
const INVARIANTS: [Invariant; 10] = [
    Invariant::I1,
    Invariant::I2,
    Invariant::I3,
    Invariant::I4,
    Invariant::I5,
    Invariant::I6,
    Invariant::I7,
    Invariant::I8,
    Invariant::I9,
    Invariant::I10,
];

/// An invariant by its id (`I5`, `i5`).
pub fn parse_invariant(s: &str) -> Result<Invariant, String> {
    INVARIANTS
        .into_iter()
        .find(|i| i.id().eq_ignore_ascii_case(s))
        .ok_or_else(|| format!("{s:?} is not an invariant (I1 to I10)"))
}

/// A named scenario and the knobs that override its fields.
#[derive(Args, Debug, Clone, Default)]
pub struct ScenarioArgs {
    /// Starting point: default, crashy, partition-heavy, hetero-tp, mla, a gray failure
    /// (asymmetric-partition, silent-death, wedged-agent, stalled-reader), or a field hazard
    /// (abort-during-write, failed-transfer-served, timeout-frees-while-reading,
    /// lost-notification, evicted-before-send, stale-endpoint, abort-never-reclaimed).
    #[arg(long, value_name = "NAME", default_value = "default")]
    pub scenario: String,
    /// Context (prefill) instances.
    #[arg(long, value_name = "N")]
    pub ctx_instances: Option<u32>,
    /// Generation (decode) instances.
    #[arg(long, value_name = "N")]
    pub gen_instances: Option<u32>,
    /// Tensor-parallel size of each context instance.
    #[arg(long, value_name = "N")]
    pub ctx_tp: Option<u32>,
    /// Pipeline-parallel size of each context instance.
    #[arg(long, value_name = "N")]
    pub ctx_pp: Option<u32>,
    /// Tensor-parallel size of each generation instance.
    #[arg(long, value_name = "N")]
    pub gen_tp: Option<u32>,
    /// Pipeline-parallel size of each generation instance.
    #[arg(long, value_name = "N")]
    pub gen_pp: Option<u32>,
    /// Requests per seed.
    #[arg(long, value_name = "N")]
    pub requests: Option<u32>,
    /// Scales every fault probability; 0 turns faults off.
    #[arg(long, value_name = "X")]
    pub fault_rate: Option<f64>,
    /// Deadline eviction of wedged transfers: `--inflight-cancel` or `--inflight-cancel=false`.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true")]
    pub inflight_cancel: Option<bool>,
    /// kv_transfer_timeout_ms, or `off` to leave the timeout WARN unconfigured.
    #[arg(long, value_name = "MS|off", value_parser = parse_timeout)]
    pub timeout_ms: Option<TimeoutMs>,
    /// Turn a bug switch on (repeatable); needs a build with `--features bug-switches`.
    #[arg(long, value_name = "NAME")]
    pub inject_bug: Vec<Bug>,
    /// push, pull or mixed (each seed draws one); the scenario's own when not given.
    #[arg(long, value_name = "MODE")]
    pub transfer_mode: Option<TransferMode>,
}

/// `--timeout-ms` value; `None` is `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeoutMs(pub Option<u64>);

fn parse_seeds(s: &str) -> Result<Range<u64>, String> {
    let num = |t: &str| {
        t.trim()
            .parse::<u64>()
            .map_err(|_| format!("{t:?} is not a seed number (expected A..B or N)"))
    };
    let range = match s.split_once("..") {
        Some((a, b)) => num(a)?..num(b)?,
        None => 0..num(s)?,
    };
    if range.is_empty() {
        return Err(format!("seed range {s} is empty"));
    }
    Ok(range)
}

fn parse_timeout(s: &str) -> Result<TimeoutMs, String> {
    if s == "off" {
        return Ok(TimeoutMs(None));
    }
    s.parse()
        .map(|ms| TimeoutMs(Some(ms)))
        .map_err(|_| format!("{s:?} is neither milliseconds nor `off`"))
}

impl ScenarioArgs {
    /// The named scenario with every given knob applied.
    pub fn build(&self) -> Result<Scenario> {
        let mut s = Scenario::named(&self.scenario).with_context(|| {
            format!(
                "unknown scenario {:?}; known: {}",
                self.scenario,
                SCENARIOS.join(", ")
            )
        })?;
        let sizes = [
            (&mut s.ctx_instances, self.ctx_instances, "--ctx-instances"),
            (&mut s.gen_instances, self.gen_instances, "--gen-instances"),
            (&mut s.ctx_tp, self.ctx_tp, "--ctx-tp"),
            (&mut s.ctx_pp, self.ctx_pp, "--ctx-pp"),
            (&mut s.gen_tp, self.gen_tp, "--gen-tp"),
            (&mut s.gen_pp, self.gen_pp, "--gen-pp"),
            (&mut s.requests, self.requests, "--requests"),
        ];
        for (field, knob, flag) in sizes {
            if let Some(v) = knob {
                ensure!(v >= 1, "{flag} must be at least 1");
                *field = v;
            }
        }
        if let Some(rate) = self.fault_rate {
            ensure!(
                rate.is_finite() && rate >= 0.0,
                "--fault-rate must be a finite number >= 0, got {rate}"
            );
            s.fault_rate = rate;
        }
        if let Some(on) = self.inflight_cancel {
            s.inflight_cancel = on;
        }
        if let Some(TimeoutMs(ms)) = self.timeout_ms {
            s.timeout_ms = ms;
        }
        if let Some(mode) = self.transfer_mode {
            s.transfer_mode = mode;
        }
        // The simulator builds every rank's transceiver from these two; reject a bad pair here
        // as one line instead of a panic in every seed.
        TransceiverConfig {
            kv_transfer_timeout_ms: s.timeout_ms,
            inflight_cancel: s.inflight_cancel,
            ..TransceiverConfig::default()
        }
        .validate()
        .context("invalid --timeout-ms / --inflight-cancel")?;
        self.apply_bugs(&mut s)?;
        s.check()?;
        Ok(s)
    }

    #[cfg(feature = "bug-switches")]
    fn apply_bugs(&self, s: &mut Scenario) -> Result<()> {
        s.bugs = self.inject_bug.iter().fold(s.bugs, |set, b| set.with(*b));
        Ok(())
    }

    #[cfg(not(feature = "bug-switches"))]
    fn apply_bugs(&self, _: &mut Scenario) -> Result<()> {
        if !self.inject_bug.is_empty() {
            anyhow::bail!("this build has no bug switches; rebuild with --features bug-switches");
        }
        Ok(())
    }

    /// The flags that rebuild this scenario, in a fixed order, for replay commands.
    pub fn to_flags(&self) -> Vec<String> {
        let mut out = vec!["--scenario".to_string(), self.scenario.clone()];
        let mut push = |flag: &str, v: Option<String>| {
            if let Some(v) = v {
                out.push(format!("--{flag}"));
                out.push(v);
            }
        };
        let s = |v: Option<u32>| v.map(|v| v.to_string());
        push("ctx-instances", s(self.ctx_instances));
        push("gen-instances", s(self.gen_instances));
        push("ctx-tp", s(self.ctx_tp));
        push("ctx-pp", s(self.ctx_pp));
        push("gen-tp", s(self.gen_tp));
        push("gen-pp", s(self.gen_pp));
        push("requests", s(self.requests));
        // `Display` of f64 prints the shortest text that parses back to the same value.
        push("fault-rate", self.fault_rate.map(|r| r.to_string()));
        push(
            "timeout-ms",
            self.timeout_ms
                .map(|TimeoutMs(t)| t.map_or("off".to_string(), |ms| ms.to_string())),
        );
        for bug in &self.inject_bug {
            push("inject-bug", Some(bug.name().to_string()));
        }
        push("transfer-mode", self.transfer_mode.map(|m| m.to_string()));
        // `require_equals` makes this flag one token.
        if let Some(on) = self.inflight_cancel {
            out.push(format!("--inflight-cancel={on}"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Cli {
        Cli::try_parse_from(line.split_whitespace()).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    #[test]
    fn seeds_accept_range_or_count() {
        assert_eq!(parse_seeds("3..7"), Ok(3..7));
        assert_eq!(parse_seeds("12"), Ok(0..12));
        assert!(parse_seeds("7..3").is_err());
        assert!(parse_seeds("0").is_err());
        assert!(parse_seeds("a..3").is_err());
    }

    #[test]
    fn flags_round_trip() {
        let line = "kvferry replay 4 --scenario crashy --ctx-tp 2 --requests 9 --fault-rate 0.25 \
                    --timeout-ms off --inflight-cancel=false";
        let Command::Replay(r) = parse(line).command else {
            panic!("not replay")
        };
        let flags = r.scenario.to_flags().join(" ");
        let Command::Replay(again) = parse(&format!("kvferry replay 4 {flags}")).command else {
            panic!("not replay")
        };
        assert_eq!(again.scenario.to_flags().join(" "), flags);
        assert_eq!(again.scenario.timeout_ms, Some(TimeoutMs(None)));
        assert_eq!(again.scenario.inflight_cancel, Some(false));
        assert_eq!(again.scenario.fault_rate, Some(0.25));
    }

    #[test]
    fn bare_inflight_cancel_means_on() {
        let Command::Sim(s) = parse("kvferry sim --inflight-cancel --seeds 3").command else {
            panic!("not sim")
        };
        assert_eq!(s.scenario.inflight_cancel, Some(true));
        assert_eq!(s.seeds, 0..3);
    }

    #[test]
    fn transfer_mode_round_trips_and_overrides_the_scenario() {
        let Command::Replay(r) = parse("kvferry replay 2 --transfer-mode pull").command else {
            panic!("not replay")
        };
        assert_eq!(r.scenario.transfer_mode, Some(TransferMode::Pull));
        assert!(r
            .scenario
            .to_flags()
            .join(" ")
            .ends_with("--transfer-mode pull"));
        assert_eq!(
            r.scenario.build().expect("valid").transfer_mode,
            TransferMode::Pull
        );
        let Command::Sim(s) = parse("kvferry sim --scenario stale-endpoint").command else {
            panic!("not sim")
        };
        assert_eq!(
            s.scenario.build().expect("valid").transfer_mode,
            TransferMode::Pull
        );
        assert!(Cli::try_parse_from(["kvferry", "sim", "--transfer-mode", "both"]).is_err());
    }

    #[test]
    fn unknown_bug_names_are_rejected_by_the_parser() {
        assert!(Cli::try_parse_from(["kvferry", "sim", "--inject-bug", "nope"]).is_err());
    }
}
