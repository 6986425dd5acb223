//! Chrome Trace Event Format writer for one seed's timeline (opens in ui.perfetto.dev).
//!
//! Every [`TraceEvent::track`] becomes its own process with one thread, both named after the
//! track: Perfetto draws a process's async spans under it, so transfers stay next to the rank
//! that ran them. Transfers are async spans (`b`/`e` paired by id) because several may be in
//! flight on one rank and overlap, which `B`/`E` on one thread cannot express. Faults, warnings
//! and state changes are thread-scoped instants, and each violation the checker reported is an
//! instant on a `violations` track. Timestamps are the simulated microseconds.

use crate::report::{SeedReport, TraceEvent, TraceKind};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// The track that carries the checker's violations.
const VIOLATIONS_TRACK: &str = "violations";

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot write trace {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The `{"traceEvents": [...], "displayTimeUnit": "ms"}` document of one seed.
pub fn chrome_trace(report: &SeedReport) -> Value {
    let tracks = track_ids(report);
    let mut out = Vec::with_capacity(report.trace.len() + 2 * tracks.len());
    for (name, &pid) in &tracks {
        let meta = |what: &str, args: Value| json!({"ph": "M", "pid": pid, "tid": pid, "name": what, "args": args});
        out.push(meta("process_name", json!({ "name": name })));
        out.push(meta("process_sort_index", json!({ "sort_index": pid })));
        out.push(meta("thread_name", json!({ "name": name })));
    }
    let last_us = report.trace.iter().map(|e| e.at_us).max().unwrap_or(0);
    // Open spans, so that an end carries its begin's name (Perfetto pairs on it) and spans
    // still open when the seed ended can be closed at its last event.
    let mut open: HashMap<(u64, u64), (&str, u64)> = HashMap::new();
    for ev in &report.trace {
        let pid = tracks[ev.track.as_str()];
        out.push(match ev.kind {
            TraceKind::Begin { id } => {
                open.insert((pid, id), (ev.name.as_str(), ev.at_us));
                span("b", pid, id, &ev.name, ev.at_us, json!({}))
            }
            TraceKind::End { id } => match open.remove(&(pid, id)) {
                Some((begin, _)) => span("e", pid, id, begin, ev.at_us, json!({"end": ev.name})),
                None => instant(pid, ev, json!({"unmatched_end": id})),
            },
            TraceKind::Instant => instant(pid, ev, json!({})),
        });
    }
    let mut unfinished: Vec<_> = open.into_iter().collect();
    unfinished.sort_unstable_by_key(|&((pid, id), (_, at))| (at, pid, id));
    for ((pid, id), (name, _)) in unfinished {
        out.push(span(
            "e",
            pid,
            id,
            name,
            last_us,
            json!({"unfinished": true}),
        ));
    }
    if let Some(&pid) = tracks.get(VIOLATIONS_TRACK) {
        for v in &report.violations {
            out.push(json!({
                "ph": "i", "s": "t", "pid": pid, "tid": pid, "ts": v.at_us,
                "cat": "violation", "name": format!("{} violated", v.invariant.id()),
                "args": {"detail": v.detail},
            }));
        }
    }
    json!({
        "traceEvents": out,
        "displayTimeUnit": "ms",
        "otherData": {"seed": report.seed, "trace_hash": format!("{:#018x}", report.trace_hash)},
    })
}

/// Writes [`chrome_trace`] to `path`.
pub fn write_chrome_trace(report: &SeedReport, path: &Path) -> Result<(), TraceError> {
    let io = |source| TraceError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut w = BufWriter::new(File::create(path).map_err(io)?);
    serde_json::to_writer(&mut w, &chrome_trace(report)).map_err(|e| io(e.into()))?;
    w.flush().map_err(io)
}

/// Track name → pid (= tid), numbered from 1 in name order so the layout is stable.
fn track_ids(report: &SeedReport) -> BTreeMap<&str, u64> {
    let mut names: Vec<&str> = report.trace.iter().map(|e| e.track.as_str()).collect();
    if !report.violations.is_empty() {
        names.push(VIOLATIONS_TRACK);
    }
    names.sort_unstable();
    names.dedup();
    names.into_iter().zip(1..).collect()
}

fn span(ph: &str, pid: u64, id: u64, name: &str, ts: u64, args: Value) -> Value {
    json!({
        "ph": ph, "cat": "transfer", "id": format!("{id:#x}"), "pid": pid, "tid": pid,
        "ts": ts, "name": name, "args": args,
    })
}

fn instant(pid: u64, ev: &TraceEvent, args: Value) -> Value {
    json!({
        "ph": "i", "s": "t", "cat": "event", "pid": pid, "tid": pid, "ts": ev.at_us,
        "name": ev.name, "args": args,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Invariant, Violation};

    fn ev(at_us: u64, track: &str, kind: TraceKind, name: &str) -> TraceEvent {
        TraceEvent {
            at_us,
            track: track.to_string(),
            kind,
            name: name.to_string(),
        }
    }

    fn report() -> SeedReport {
        SeedReport {
            seed: 7,
            trace: vec![
                ev(10, "gen0/r0", TraceKind::Begin { id: 1 }, "req 1"),
                ev(12, "gen0/r0", TraceKind::Begin { id: 2 }, "req 2"),
                ev(15, "faults", TraceKind::Instant, "crash ctx0/r0"),
                ev(20, "gen0/r0", TraceKind::End { id: 1 }, "done"),
                ev(30, "ctx0/r0", TraceKind::End { id: 9 }, "stray"),
            ],
            violations: vec![Violation {
                invariant: Invariant::I5,
                at_us: 25,
                detail: "block 3 written after free".to_string(),
            }],
            ..SeedReport::default()
        }
    }

    fn events<'a>(doc: &'a Value, ph: &str) -> Vec<&'a Value> {
        let all = doc["traceEvents"].as_array().unwrap();
        all.iter().filter(|e| e["ph"] == ph).collect()
    }

    #[test]
    fn one_named_track_per_trace_track() {
        let doc = chrome_trace(&report());
        assert_eq!(doc["displayTimeUnit"], "ms");
        let names: Vec<_> = events(&doc, "M")
            .into_iter()
            .filter(|e| e["name"] == "thread_name")
            .map(|e| {
                (
                    e["tid"].as_u64().unwrap(),
                    e["args"]["name"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                (1, "ctx0/r0"),
                (2, "faults"),
                (3, "gen0/r0"),
                (4, "violations")
            ]
        );
    }

    #[test]
    fn spans_pair_and_unfinished_ones_close_at_the_end() {
        let doc = chrome_trace(&report());
        let begins = events(&doc, "b");
        let ends = events(&doc, "e");
        assert_eq!(begins.len(), 2);
        assert_eq!(ends.len(), 2);
        // Span 1 ends with its begin's name; span 2 never ended and closes at the last event.
        assert_eq!(
            (ends[0]["id"].as_str(), ends[0]["name"].as_str()),
            (Some("0x1"), Some("req 1"))
        );
        assert_eq!(
            (ends[1]["id"].as_str(), ends[1]["ts"].as_u64()),
            (Some("0x2"), Some(30))
        );
        assert_eq!(ends[1]["args"]["unfinished"], true);
    }

    #[test]
    fn instants_are_thread_scoped_and_include_violations() {
        let doc = chrome_trace(&report());
        let instants = events(&doc, "i");
        assert!(instants.iter().all(|e| e["s"] == "t"));
        let names: Vec<_> = instants
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["crash ctx0/r0", "stray", "I5 violated"]);
        assert_eq!(instants[2]["ts"], 25);
    }
}
