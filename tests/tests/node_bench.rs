//! `kvferry-node bench` end to end: several gens against one ctx complete every request and
//! the bench reports their sum; a gen count out of range is refused before anything starts.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_kvferry-node-under-test");

/// The numbers of one per-round row: round, node MiB/s, …, failed (9th), …, requests/s (12th).
fn rows(stdout: &str) -> Vec<Vec<f64>> {
    stdout
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|w| w.parse::<u32>().is_ok())
        })
        .map(|l| {
            l.split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect()
        })
        .collect()
}

#[test]
fn several_gens_complete_every_request_and_are_summed() {
    let out = Command::new(BIN)
        .args([
            "bench",
            "--gens",
            "3",
            "--requests",
            "150",
            "--blocks-per-request",
            "1",
        ])
        .args(["--concurrency", "8", "--rounds", "2", "--blocks", "256"])
        .output()
        .expect("run the bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("3 gen(s) x 150 requests x 1 blocks"),
        "header does not name the loads:\n{stdout}"
    );
    assert!(
        stdout.contains("requests done per round: 450, 450 of 450"),
        "not every gen's requests done and counted:\n{stdout}"
    );
    let rows = rows(&stdout);
    assert_eq!(rows.len(), 2, "one row per round:\n{stdout}");
    for r in &rows {
        assert_eq!(r.len(), 14, "row columns:\n{stdout}");
        assert_eq!(r[8], 0.0, "failed requests in a round:\n{stdout}");
        assert!(r[11] > 0.0 && r[1] > 0.0, "nothing measured:\n{stdout}");
    }
}

#[test]
fn a_gen_count_out_of_range_is_refused() {
    for gens in ["0", "65"] {
        let out = Command::new(BIN)
            .args(["bench", "--gens", gens])
            .output()
            .expect("run the bench");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--gens {gens} was accepted");
        assert!(
            stderr.contains("--gens"),
            "the refusal does not name the flag:\n{stderr}"
        );
    }
}

/// All gens dial from one host: more blocks in flight than its share of the ctx's pool would
/// measure waiting for busy answers, so the bench refuses it and says what to raise.
#[test]
fn gens_past_one_hosts_share_are_refused() {
    let out = Command::new(BIN)
        .args(["bench", "--gens", "5", "--blocks", "1024"])
        .output()
        .expect("run the bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "5 x 8 x 16 blocks over a 512-block share was accepted"
    );
    assert!(
        stderr.contains("640 blocks") && stderr.contains("--max-blocks-per-ip"),
        "the refusal does not say why:\n{stderr}"
    );
}
