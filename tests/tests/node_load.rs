//! A ctx node and a gen node as two processes on loopback: a load completes byte-exact and
//! the metrics endpoint reports it.

use kvferry_tests::{scrape, NodeProc, HETERO_LAYOUT, SMALL_LAYOUT};
use std::net::SocketAddr;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_kvferry-node-under-test");

/// A ctx (small layout, metrics on, `ctx_args` more) and a gen load against it (`gen_args`
/// more) that must exit 0; the ctx, still running, its metrics address and the gen's summary.
fn small_load(ctx_args: &[&str], gen_args: &[&str]) -> (NodeProc, SocketAddr, serde_json::Value) {
    let mut args = vec!["ctx", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"];
    args.extend(ctx_args);
    args.extend(SMALL_LAYOUT);
    let ctx = NodeProc::spawn(BIN, &args);
    let metrics = ctx.addr("metrics ");
    let peer = ctx.addr("listening ").to_string();
    let mut args = vec!["gen", "--peer", &peer];
    args.extend(gen_args);
    args.extend(SMALL_LAYOUT);
    let mut gen = NodeProc::spawn(BIN, &args);
    let status = gen.wait_exit(Duration::from_secs(120));
    let s = gen.summary();
    assert!(status.success(), "gen failed: {s}");
    (ctx, metrics, s)
}

#[test]
fn gen_load_completes_and_metrics_report_it() {
    let (_ctx, metrics, s) = small_load(&[], &["--requests", "50", "--max-blocks", "8"]);
    assert_eq!(s["done"], 50, "{s}");
    assert_eq!(s["failed"], 0, "{s}");
    assert_eq!(s["staging_free"], s["staging_slots"], "{s}");
    assert_eq!(s["blocks_free"], s["blocks_total"], "{s}");

    let m = scrape(metrics);
    assert_eq!(m["kvferry_requests_done_total"], 50.0, "{m:?}");
    assert_eq!(m["kvferry_transfers_completed_total"], 50.0);
    assert_eq!(m["kvferry_blocks_free"], m["kvferry_blocks_total"]);
    assert_eq!(m["kvferry_staging_free"], m["kvferry_staging_slots"]);
}

/// A ctx instance of `ctx_tp` ranks and a gen instance of `gen_tp` ranks, one process each:
/// every rank of the gen verifies its share of every request byte for byte, and both sides
/// end with every block and slot free.
fn hetero_load(ctx_tp: &str, gen_tp: &str) {
    let mut args = vec!["ctx", "--tp", ctx_tp, "--metrics", "127.0.0.1:0"];
    args.extend(HETERO_LAYOUT);
    let ctx = NodeProc::spawn(BIN, &args);
    let metrics = ctx.addr("metrics ");
    let peers = ctx.wait_line("listening ", kvferry_tests::START_TIMEOUT);
    assert_eq!(
        peers.split(',').count(),
        ctx_tp.parse::<usize>().unwrap(),
        "{peers}"
    );
    let mut args = vec!["gen", "--tp", gen_tp, "--peer", &peers, "--requests", "40"];
    args.extend(["--max-blocks", "6", "--concurrency", "4"]);
    args.extend(HETERO_LAYOUT);
    let mut gen = NodeProc::spawn(BIN, &args);
    let status = gen.wait_exit(Duration::from_secs(120));
    let s = gen.summary();
    assert!(
        status.success(),
        "ctx TP{ctx_tp} -> gen TP{gen_tp} failed: {s}"
    );
    assert_eq!(s["done"], 40, "{s}");
    assert_eq!(s["blocks_free"], s["blocks_total"], "{s}");
    assert_eq!(s["staging_free"], s["staging_slots"], "{s}");
    kvferry_tests::wait_released(metrics);
    let m = scrape(metrics);
    assert_eq!(m["kvferry_requests_done_total"], 40.0);
    // Each ctx rank has its own series, and they add up to the instance's.
    let per_rank = |name: &str| -> f64 {
        (0..ctx_tp.parse::<u32>().unwrap())
            .map(|r| m[&format!("{name}{{rank=\"{r}\"}}")])
            .sum()
    };
    assert_eq!(
        per_rank("kvferry_rank_blocks_free"),
        m["kvferry_blocks_free"]
    );
    assert_eq!(
        per_rank("kvferry_rank_transfers_completed_total"),
        m["kvferry_transfers_completed_total"]
    );
}

#[test]
fn hetero_tp_ctx2_to_gen1_verifies_every_byte() {
    hetero_load("2", "1");
}

#[test]
fn hetero_tp_ctx1_to_gen2_verifies_every_byte() {
    hetero_load("1", "2");
}

#[test]
fn hetero_tp_ctx4_to_gen2_verifies_every_byte() {
    hetero_load("4", "2");
}

/// A gen that keeps more blocks in flight than its host's share of the ctx's pool (16 × 8
/// blocks against a 64-block pool, of which a host may hold 32): the ctx answers the asks
/// past the share busy, the gen asks them again as its requests end, and every request
/// completes, verified, with every block free on both sides after.
#[test]
fn asks_past_the_hosts_share_wait_and_complete() {
    let load = ["--requests", "200", "--concurrency", "16"];
    let blocks = ["--min-blocks", "8", "--max-blocks", "8"];
    let (_ctx, metrics, s) = small_load(&["--blocks", "64"], &[&load[..], &blocks[..]].concat());
    assert_eq!(s["done"], 200, "{s}");
    assert_eq!(s["failed"], 0, "{s}");
    assert!(
        s["busy_answers"].as_u64().unwrap() > 0,
        "never over the share: {s}"
    );
    assert_eq!(s["blocks_free"], s["blocks_total"], "{s}");
    kvferry_tests::wait_released(metrics);
    let m = scrape(metrics);
    assert_eq!(m["kvferry_requests_done_total"], 200.0, "{m:?}");
    assert!(m["kvferry_prepares_refused_total"] > 0.0, "{m:?}");
}
