//! A ctx node and a gen node as two processes on loopback: a load completes byte-exact and
//! the metrics endpoint reports it.

use kvferry_tests::{scrape, NodeProc, SMALL_LAYOUT};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_kvferry-node-under-test");

#[test]
fn gen_load_completes_and_metrics_report_it() {
    let mut args = vec!["ctx", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"];
    args.extend(SMALL_LAYOUT);
    let ctx = NodeProc::spawn(BIN, &args);
    let metrics = ctx.addr("metrics ");
    let peer = ctx.addr("listening ").to_string();

    let mut args = vec![
        "gen",
        "--peer",
        &peer,
        "--requests",
        "50",
        "--max-blocks",
        "8",
    ];
    args.extend(SMALL_LAYOUT);
    let mut gen = NodeProc::spawn(BIN, &args);
    let status = gen.wait_exit(Duration::from_secs(120));
    let s = gen.summary();
    assert!(status.success(), "gen failed: {s}");
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
