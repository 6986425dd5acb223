//! `kvferry`: seed campaigns (`sim`), single-seed replays with a Perfetto timeline (`replay`),
//! shrinking a failing seed (`shrink`) and transfer-plan inspection (`plan`).
//!
//! Exit codes: 0 all good, 1 an invariant was violated (or a seed panicked, or under
//! `--require-coverage` a dangerous window was never reached), 2 bad input or another error,
//! printed as one `error: ...` line.

use anyhow::{ensure, Context, Result};
use clap::Parser;
use kvferry_sim::campaign::Campaign;
use kvferry_sim::cli::{Cli, Command, ReplayArgs, SimArgs};
use kvferry_sim::progress::Progress;
use kvferry_sim::schedule::Schedule;
use kvferry_sim::{cluster, plan_cmd, render, shrink_cmd, trace};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    init_tracing();
    let clean = match &cli.command {
        Command::Sim(args) => sim(args),
        Command::Replay(args) => replay(args),
        Command::Shrink(args) => shrink_cmd::run(args).map(|()| true),
        Command::Plan(args) => plan_cmd::run(args).map(|()| true),
    };
    match clean {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Prints clap's error as one line; help and version go out unchanged.
fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if !e.use_stderr() || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        e.exit();
    }
    // clap renders the message, then a blank line, tips and usage: keep the message.
    let text = e.render().to_string();
    let message: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty())
        .collect();
    eprintln!("{} (see --help)", message.join(" "));
    ExitCode::from(2)
}

/// Logs from the simulator (the timeout WARNs, …) only when asked for with `RUST_LOG`: a
/// campaign emits thousands of them.
fn init_tracing() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
}

/// Runs a campaign; true when no seed failed.
fn sim(args: &SimArgs) -> Result<bool> {
    let scenario = args.scenario.build()?;
    let jobs = match args.jobs {
        Some(n) => {
            ensure!(n >= 1, "--jobs must be at least 1");
            n
        }
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let campaign = Campaign {
        scenario,
        seeds: args.seeds.clone(),
        jobs,
        fail_fast: args.fail_fast,
        recheck_every: args.recheck_every,
        replay_flags: args.scenario.to_flags(),
    };
    let mut progress = Progress::new(args.seeds.end - args.seeds.start);
    let summary = campaign.run(&cluster::run_seed, &mut |tick| progress.tick(tick));
    progress.finish();
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        // Failures last, so that the replay commands end the output.
        print!("{}", render::summary_table(&summary));
        print!("{}", render::failures(&summary));
    }
    let missed = summary.missed_windows();
    if args.require_coverage && !missed.is_empty() {
        eprintln!(
            "coverage: seeds {}..{} of {} never reached: {}",
            args.seeds.start,
            args.seeds.end,
            summary.scenario.name,
            missed.join(", ")
        );
        return Ok(false);
    }
    Ok(!summary.failed())
}

/// Re-runs one seed with its trace kept; true when it broke no invariant.
fn replay(args: &ReplayArgs) -> Result<bool> {
    let mut scenario = args.scenario.build()?;
    let schedule = args.schedule.as_deref().map(Schedule::read).transpose()?;
    if let Some(s) = &schedule {
        // The schedule's workload is what runs; the report's header says so.
        scenario.requests = s.requests.len() as u32;
    }
    let (report, _) = cluster::run_schedule(args.seed, &scenario, schedule.as_ref(), true);
    if let Some(path) = &args.trace {
        trace::write_chrome_trace(&report, path)
            .with_context(|| format!("replay of seed {}", args.seed))?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", render::seed_report(&report, &scenario));
        if let Some(path) = &args.trace {
            println!(
                "  timeline: {} ({} events; open in ui.perfetto.dev)",
                path.display(),
                report.trace.len()
            );
        }
    }
    Ok(report.violations.is_empty())
}
