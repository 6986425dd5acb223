//! The `kvferry` binary end to end: output formats, exit codes and one-line errors.

use serde_json::Value;
use std::collections::BTreeSet;
use std::process::{Command, Output};

fn kvferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvferry"))
        .args(args)
        .output()
        .expect("the kvferry binary runs")
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Asserts a failure with exit code 2 and a one-line `error: ...` on stderr; returns it.
fn one_line_error(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains('\n'), "not one line: {err}");
    err
}

#[test]
fn plan_json_covers_every_gen_rank() {
    let out = kvferry(&[
        "plan",
        "--ctx-tp",
        "4",
        "--ctx-pp",
        "2",
        "--gen-tp",
        "2",
        "--gen-pp",
        "2",
        "--layers",
        "8",
        "--kv-heads",
        "8",
        "--head-dim",
        "16",
        "--tokens-per-block",
        "4",
        "--dtype-bytes",
        "2",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let v = stdout_json(&out);
    let gen_ranks: BTreeSet<u64> = v["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["gen_rank"].as_u64().unwrap())
        .collect();
    assert_eq!(gen_ranks, (0..4).collect());
    assert!(v["fragments"].as_u64().unwrap() > 0);
    assert_eq!(v["bytes_per_block"], 8 * 2 * 8 * 4 * 16 * 2);
}

#[test]
fn invalid_plan_is_a_one_line_error() {
    let out = kvferry(&[
        "plan",
        "--ctx-pp",
        "3",
        "--layers",
        "8",
        "--kv-heads",
        "2",
        "--head-dim",
        "4",
        "--tokens-per-block",
        "2",
        "--dtype-bytes",
        "1",
    ]);
    let err = one_line_error(&out);
    assert!(err.contains("--ctx-pp"), "{err}");
}

#[test]
fn sim_json_has_the_documented_keys() {
    let out = kvferry(&["sim", "--seeds", "0..3", "--jobs", "2", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v = stdout_json(&out);
    for key in [
        "seeds",
        "seed_range",
        "sim_time_us",
        "wall_time_s",
        "events",
        "requests_planned",
        "requests_issued",
        "requests_completed",
        "requests_failed",
        "requests_cancelled",
        "faults",
        "violations",
        "failing_seeds",
        "panicked_seeds",
        "seeds_per_minute",
        "sim_seconds_per_wall_second",
        "scenario",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    assert_eq!(v["seeds"], 3);
    assert_eq!(v["requests_planned"], 3 * 64);
    assert_eq!(v["requests_issued"], v["requests_planned"]);
    assert_eq!(v["violations"], serde_json::json!({}));
    assert_eq!(v["failing_seeds"], serde_json::json!([]));
}

#[test]
fn replay_writes_a_chrome_trace() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed-1.json");
    let out = kvferry(&["replay", "1", "--trace", path.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("seed 1 "));
    let doc: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(doc["displayTimeUnit"], "ms");
    let events = doc["traceEvents"].as_array().unwrap();
    assert!(events.iter().any(|e| e["name"] == "thread_name"));
    // Every non-metadata event has a numeric microsecond timestamp.
    assert!(events
        .iter()
        .filter(|e| e["ph"] != "M")
        .all(|e| e["ts"].is_u64()));
    assert!(events.iter().any(|e| e["ph"] == "b"), "no transfer spans");
}

#[test]
fn unknown_scenario_lists_the_known_ones() {
    let err = one_line_error(&kvferry(&["sim", "--scenario", "nope", "--seeds", "1"]));
    for name in kvferry_sim::scenario::SCENARIOS {
        assert!(err.contains(name), "{err}");
    }
}

#[test]
fn bad_seed_range_is_a_one_line_error() {
    let out = kvferry(&["sim", "--seeds", "5..2"]);
    assert!(one_line_error(&out).contains("5..2"));
}

#[cfg(not(feature = "bug-switches"))]
#[test]
fn inject_bug_needs_the_feature() {
    let out = kvferry(&["sim", "--inject-bug", "release-early", "--seeds", "1"]);
    let err = one_line_error(&out);
    assert!(
        err.contains("rebuild with --features bug-switches"),
        "{err}"
    );
}

/// A failing seed's replay command reproduces its violation.
#[cfg(feature = "bug-switches")]
#[test]
fn replay_command_reproduces_the_failure() {
    let out = kvferry(&[
        "sim",
        "--inject-bug",
        "skip-token-check",
        "--seeds",
        "200",
        "--fail-fast",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v = stdout_json(&out);
    let first = &v["failing_seeds"][0];
    let replay = first["replay"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("t.json");
    // Run the command's arguments after `--`, with our own trace path.
    let (_, args) = replay
        .split_once(" -- ")
        .expect("cargo run ... -- replay ...");
    let mut args: Vec<&str> = args.split_whitespace().collect();
    let at = args.iter().position(|a| *a == "--trace").unwrap();
    args[at + 1] = trace.to_str().unwrap();
    args.push("--json");
    let again = kvferry(&args);
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    let report = stdout_json(&again);
    assert_eq!(report["seed"], first["seed"]);
    assert!(report["violations"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["invariant"] == first["invariant"]));
    assert!(trace.exists());
}

/// Layouts the transfer plan cannot serve are refused before any seed runs: one line, exit 2,
/// naming the flags to change (`--ctx-tp 3` used to panic in every seed).
#[test]
fn unservable_layouts_are_a_one_line_error() {
    let cases: [(&[&str], &str); 4] = [
        (&["sim", "--ctx-tp", "3", "--seeds", "2"], "--ctx-tp"),
        (&["sim", "--gen-tp", "3", "--seeds", "2"], "--gen-tp"),
        (
            &["sim", "--scenario", "hetero-tp", "--ctx-pp", "3"],
            "--ctx-pp",
        ),
        (&["replay", "1", "--gen-pp", "5"], "--gen-pp"),
    ];
    for (args, flag) in cases {
        let err = one_line_error(&kvferry(args));
        assert!(err.contains(flag), "{args:?}: {err}");
    }
}
