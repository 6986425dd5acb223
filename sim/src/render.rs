//! Human-readable output of the CLI: the campaign summary table, failing seeds, and the report
//! of one replayed seed. The JSON forms are the serde encodings of the same structs.

use crate::campaign::Summary;
use crate::report::SeedReport;
use crate::scenario::Scenario;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Failing seeds printed before the rest are only counted (`--json` lists them all).
const SHOWN_FAILURES: usize = 20;

fn ms(us: u64) -> String {
    format!("{}.{:03} ms", us / 1000, us % 1000)
}

fn describe(s: &Scenario) -> String {
    let timeout = s
        .timeout_ms
        .map_or("off".to_string(), |t| format!("{t} ms"));
    format!(
        "{}: {} ctx x TP{} PP{}{}, {} gen x TP{} PP{}, {} requests/seed, fault rate {}, \
         timeout {timeout}, inflight-cancel {}",
        s.name,
        s.ctx_instances,
        s.ctx_tp,
        s.ctx_pp,
        if s.mla { " (MLA)" } else { "" },
        s.gen_instances,
        s.gen_tp,
        s.gen_pp,
        s.requests,
        s.fault_rate,
        if s.inflight_cancel { "on" } else { "off" },
    )
}

fn counts<K: std::fmt::Display>(m: &BTreeMap<K, u64>) -> String {
    if m.is_empty() {
        return "none".to_string();
    }
    let parts: Vec<String> = m.iter().map(|(k, n)| format!("{k} {n}")).collect();
    parts.join(", ")
}

/// The summary table of `kvferry sim`.
pub fn summary_table(s: &Summary) -> String {
    let mut t = String::new();
    let mut row = |k: &str, v: String| {
        let _ = writeln!(t, "  {k:<22}{v}");
    };
    row("scenario", describe(&s.scenario));
    row(
        "seeds",
        format!(
            "{} of {}..{} on {} threads",
            s.seeds, s.seed_range[0], s.seed_range[1], s.jobs
        ),
    );
    row(
        "simulated time",
        format!("{:.3} s", s.sim_time_us as f64 / 1e6),
    );
    row("wall time", format!("{:.2} s", s.wall_time_s));
    row("events", s.events.to_string());
    row(
        "requests",
        format!(
            "{} of {} issued: {} completed, {} failed, {} cancelled",
            s.requests_issued,
            s.requests_planned,
            s.requests_completed,
            s.requests_failed,
            s.requests_cancelled
        ),
    );
    row("faults injected", counts(&s.faults));
    row("failures by cause", counts(&s.failures_by_cause));
    row("  by core cause", counts(&s.failures_by_core_cause));
    row("violations", counts(&s.violations));
    row("dangerous windows", counts(&s.coverage));
    let missed = s.missed_windows();
    if !missed.is_empty() {
        row("  not reached", missed.join(", "));
    }
    if let Some(seed) = s.worst_convergence_seed {
        row(
            "convergence",
            format!(
                "worst {:.1} ms after faults healed and the last request arrived (seed {seed})",
                s.worst_convergence_us as f64 / 1000.0
            ),
        );
    }
    if !s.peaks.is_empty() {
        row("peak sizes", counts(&s.peaks));
    }
    if !s.panicked_seeds.is_empty() {
        row("panicked seeds", s.panicked_seeds.len().to_string());
    }
    row(
        "throughput",
        format!(
            "{:.1} seeds/min, {:.1} simulated s per wall s",
            s.seeds_per_minute, s.sim_seconds_per_wall_second
        ),
    );
    format!("kvferry sim summary\n{t}")
}

/// Each failing seed: the invariant, its first breaking event and the replay command.
pub fn failures(s: &Summary) -> String {
    let mut t = String::new();
    for f in s.failing_seeds.iter().take(SHOWN_FAILURES) {
        let _ = writeln!(
            t,
            "FAIL seed {}: {} violated at {}: {}\n  replay: {}",
            f.seed,
            f.invariant.id(),
            ms(f.at_us),
            f.detail,
            f.replay
        );
    }
    if s.failing_seeds.len() > SHOWN_FAILURES {
        let _ = writeln!(
            t,
            "... and {} more failing seeds (--json lists them all)",
            s.failing_seeds.len() - SHOWN_FAILURES
        );
    }
    for p in &s.panicked_seeds {
        let _ = writeln!(
            t,
            "PANIC seed {}: {}\n  replay: {}",
            p.seed, p.message, p.replay
        );
    }
    t
}

/// The report of one replayed seed.
pub fn seed_report(r: &SeedReport, scenario: &Scenario) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "seed {} ({})", r.seed, describe(scenario));
    let _ = writeln!(
        t,
        "  simulated {}, {} events, trace hash {:#018x}",
        ms(r.sim_time_us),
        r.events,
        r.trace_hash
    );
    let _ = writeln!(
        t,
        "  requests: {} of {} issued: {} completed, {} failed, {} cancelled",
        r.requests_issued,
        r.requests_planned,
        r.requests_completed,
        r.requests_failed,
        r.requests_cancelled
    );
    let _ = writeln!(t, "  faults: {}", counts(&r.faults));
    let _ = writeln!(
        t,
        "  failures by cause: {} (core: {})",
        counts(&r.failures_by_cause),
        counts(&r.failures_by_core_cause)
    );
    let _ = writeln!(t, "  dangerous windows: {}", counts(&r.coverage));
    if !r.peaks.is_empty() {
        let _ = writeln!(t, "  peak sizes: {}", counts(&r.peaks));
    }
    if r.violations.is_empty() {
        let _ = writeln!(t, "  violations: none");
    }
    for v in &r.violations {
        let _ = writeln!(
            t,
            "  VIOLATION {} at {}: {}",
            v.invariant.id(),
            ms(v.at_us),
            v.detail
        );
    }
    t
}
