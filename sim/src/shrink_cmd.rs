//! `kvferry shrink SEED`: shrinks a failing seed (`shrink`), writes the reduced schedule
//! as JSON and prints it with the command that replays it.

use crate::campaign::replay_command;
use crate::cli::{ScenarioArgs, ShrinkArgs};
use crate::schedule::{FaultEvent, Schedule};
use crate::shrink::{shrink, ShrinkJob, Shrunk};
use anyhow::Result;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Shrinks, writes the schedule and prints the result; progress goes to stderr.
pub fn run(args: &ShrinkArgs) -> Result<()> {
    let job = ShrinkJob {
        seed: args.seed,
        scenario: args.scenario.build()?,
        invariant: args.invariant,
        max_runs: args.max_runs,
    };
    // Bug switches make the core panic after the violation it is caught by (the run keeps
    // its report, `run_seed`); a shrink runs hundreds of such seeds, and their backtraces
    // would bury its progress lines.
    std::panic::set_hook(Box::new(|_| {}));
    let shrunk = shrink(&job, &mut |line| eprintln!("{line}"));
    drop(std::panic::take_hook());
    let shrunk = shrunk?;
    let default_out = PathBuf::from(format!("shrink-seed-{}.json", args.seed));
    let out = args.out.as_ref().unwrap_or(&default_out);
    shrunk.after.write(out)?;
    print!("{}", render(&job, &shrunk, &args.scenario, out));
    Ok(())
}

/// The replay command of a shrunk seed: its scenario flags and `--schedule PATH`.
pub fn replay_line(seed: u64, scenario: &ScenarioArgs, schedule: &Path) -> String {
    let mut flags = scenario.to_flags();
    flags.extend(["--schedule".to_string(), schedule.display().to_string()]);
    replay_command(seed, &flags, !scenario.inject_bug.is_empty())
}

fn render(job: &ShrinkJob, s: &Shrunk, scenario: &ScenarioArgs, out: &Path) -> String {
    let (b, a) = (&s.before, &s.after);
    let mut t = String::new();
    let _ = writeln!(
        t,
        "shrunk seed {} ({}): {}",
        job.seed,
        job.scenario.name,
        s.invariant.id()
    );
    let _ = writeln!(
        t,
        "  fault events: {} -> {}",
        b.faults.len(),
        a.faults.len()
    );
    let _ = writeln!(
        t,
        "  requests:     {} -> {}",
        b.requests.len(),
        a.requests.len()
    );
    let _ = writeln!(t, "  runs:         {} (at most {})", s.runs, job.max_runs);
    let v = &s.violation;
    let _ = writeln!(
        t,
        "  {} violated at {}: {}",
        v.invariant.id(),
        ms(v.at_us),
        v.detail
    );
    for e in &a.faults {
        let _ = writeln!(t, "  fault {}", event(e));
    }
    let _ = writeln!(t, "  requests {}", requests(a));
    let _ = writeln!(t, "  schedule: {}", out.display());
    let _ = writeln!(t, "  replay: {}", replay_line(job.seed, scenario, out));
    t
}

fn ms(us: u64) -> String {
    format!("{}.{:03} ms", us / 1000, us % 1000)
}

fn event(e: &FaultEvent) -> String {
    let span = e
        .span_ms
        .map(|s| format!(" for {s} ms"))
        .unwrap_or_default();
    format!(
        "{} (draw {}) at {}{span}",
        e.kind.name(),
        e.nth,
        ms(e.at_us)
    )
}

fn requests(s: &Schedule) -> String {
    let each: Vec<String> = s
        .requests
        .iter()
        .map(|r| format!("r{} ({} blocks at {})", r.id, r.blocks, ms(r.at_us)))
        .collect();
    if each.is_empty() {
        "none".to_string()
    } else {
        each.join(", ")
    }
}
