//! The node over NIXL: a ctx and a gen `kvferry-node --backend nixl` as two processes, the gen
//! READing the ctx's host pool with NIXL over UCX on loopback only (`UCX_TLS=tcp`,
//! `UCX_NET_DEVICES=lo`). They need the runtime `.ci/install-nixl` puts under `target/nixl`
//! and fail without it: they never skip.
//!
//! A node process serves a whole instance (`--tp N`: one NIXL agent and one listener per rank),
//! so bytes are verified across TP1 → TP1 and across heterogeneous TP (ctx TP2 → gen TP1,
//! ctx TP1 → gen TP2).
#![cfg(feature = "nixl")]

use kvferry_tests::{
    assert_pools_free, assert_survived_ctx_restart, wait_released, write_config, NodeProc, BIG_CTX,
    BIG_GEN, BIG_LAYOUT, HETERO_LAYOUT, SMALL_LAYOUT,
};
use std::net::SocketAddr;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_kvferry-node-under-test");
/// Bound on a whole gen run (debug build, loaded CI).
const GEN_TIMEOUT: Duration = Duration::from_secs(240);
/// Loopback only: UCX would otherwise also use every other interface.
const UCX_LOOPBACK: [(&str, &str); 2] = [("UCX_TLS", "tcp"), ("UCX_NET_DEVICES", "lo")];

fn ctx(listen: &str, config: &str) -> NodeProc {
    ctx_with(listen, config, &SMALL_LAYOUT)
}

fn ctx_with(listen: &str, config: &str, layout: &[&str]) -> NodeProc {
    let mut args = vec!["ctx", "--backend", "nixl", "--listen", listen];
    args.extend(["--config", config, "--metrics", "127.0.0.1:0"]);
    args.extend(layout);
    NodeProc::spawn_env(BIN, &args, &UCX_LOOPBACK)
}

fn gen(peer: SocketAddr, requests: &str, config: &str) -> NodeProc {
    let shape = ["--concurrency", "8", "--max-blocks", "16"];
    gen_with(
        peer,
        requests,
        config,
        &[&SMALL_LAYOUT[..], &shape].concat(),
    )
}

fn gen_with(peer: SocketAddr, requests: &str, config: &str, layout: &[&str]) -> NodeProc {
    let peer = peer.to_string();
    let mut args = vec!["gen", "--backend", "nixl", "--peer", &peer];
    args.extend(["--requests", requests]);
    args.extend(["--progress-ms", "50", "--config", config]);
    args.extend(layout);
    NodeProc::spawn_env(BIN, &args, &UCX_LOOPBACK)
}

/// Waits until the gen reported at least `n` requests done.
fn wait_done(gen: &NodeProc, n: u64) {
    let ok = gen.wait_stderr(Duration::from_secs(120), |l| {
        l.strip_prefix("progress done=")
            .and_then(|r| r.split(' ').next())
            .and_then(|d| d.parse::<u64>().ok())
            .is_some_and(|d| d >= n)
    });
    assert!(ok, "gen made no progress:\n{}", gen.stderr_text());
}

#[test]
fn nixl_read_moves_verified_bytes_between_two_processes() {
    let cfg = write_config("");
    let cfg = cfg.to_str().unwrap();
    let c = ctx("127.0.0.1:0", cfg);
    let addr = c.addr("listening ");
    let metrics = c.addr("metrics ");
    let mut g = gen(addr, "200", cfg);
    let status = g.wait_exit(GEN_TIMEOUT);
    let s = g.summary();
    assert!(status.success(), "{s}\n{}", g.stderr_text());
    // The gen verifies every block against the ctx's seeded pattern (its default).
    assert_eq!(s["done"], 200, "{s}");
    assert_eq!(s["failed"], 0, "{s}");
    assert!(s["bytes"].as_u64().unwrap() > 0, "{s}");
    assert_pools_free(&s);
    // Every parked send was completed by a READ's notification: the ctx holds nothing.
    wait_released(metrics);
}

#[test]
fn nixl_killed_gen_mid_read_makes_ctx_free_every_slot_and_block() {
    let ctx_cfg = write_config("kv_transfer_sender_future_timeout_ms = 3000\n");
    let gen_cfg = write_config("kv_transfer_timeout_ms = 5000\ninflight_cancel = true\n");
    let (ctx_cfg, gen_cfg) = (ctx_cfg.to_str().unwrap(), gen_cfg.to_str().unwrap());
    let c = ctx("127.0.0.1:0", ctx_cfg);
    let metrics = c.addr("metrics ");
    let addr = c.addr("listening ");
    let mut g1 = gen(addr, "100000", gen_cfg);
    wait_done(&g1, 30);
    g1.kill();
    c.assert_gen_disconnect_seen();
    wait_released(metrics);

    // The ctx still serves: a new gen (a new NIXL agent) is sent the metadata again.
    let mut g2 = gen(addr, "20", gen_cfg);
    let status = g2.wait_exit(GEN_TIMEOUT);
    let s = g2.summary();
    assert!(status.success(), "{s}");
    assert_eq!(s["done"], 20, "{s}");
}

#[test]
fn nixl_killed_ctx_mid_read_fails_gen_requests_without_a_hang() {
    let ctx_cfg = write_config("kv_transfer_sender_future_timeout_ms = 5000\n");
    let gen_cfg = write_config("kv_transfer_timeout_ms = 5000\ninflight_cancel = true\n");
    let (ctx_cfg, gen_cfg) = (ctx_cfg.to_str().unwrap(), gen_cfg.to_str().unwrap());
    let mut ctx1 = ctx("127.0.0.1:0", ctx_cfg);
    let addr = ctx1.addr("listening ");
    let mut g = gen(addr, "2000", gen_cfg);
    wait_done(&g, 30);
    ctx1.kill();
    // The same port again: the gen knows only this address; the new ctx is a new agent.
    let ctx2 = ctx(&addr.to_string(), ctx_cfg);
    assert_eq!(ctx2.addr("listening "), addr);
    g.wait_exit(GEN_TIMEOUT);
    assert_survived_ctx_restart(&g.summary(), 2000);
}

#[test]
fn nixl_cancel_mid_read_reuses_no_block_before_the_read_is_over() {
    let ctx_cfg = write_config("kv_transfer_sender_future_timeout_ms = 30000\n");
    // Every request still moving after 15 ms is cancelled: most while their READ of 8 MiB is
    // in flight, some before it was posted.
    let gen_cfg = write_config("kv_transfer_timeout_ms = 15\ninflight_cancel = true\n");
    let (ctx_cfg, gen_cfg) = (ctx_cfg.to_str().unwrap(), gen_cfg.to_str().unwrap());
    let c = ctx_with(
        "127.0.0.1:0",
        ctx_cfg,
        &[&BIG_LAYOUT[..], &BIG_CTX].concat(),
    );
    let metrics = c.addr("metrics ");
    let addr = c.addr("listening ");
    // The gen's pool holds exactly the 4 requests it runs at once, so a block freed early
    // (before its READ is over) would go straight to the next request; the ctx's holds 16, so
    // a ctx that frees a cancelled send's blocks a little after the gen (at the READ's
    // notification) never turns a request away.
    let gen_layout = [&BIG_LAYOUT[..], &BIG_GEN].concat();
    let mut g = gen_with(addr, "100", gen_cfg, &gen_layout);
    let status = g.wait_exit(GEN_TIMEOUT);
    let s = g.summary();
    // Exit 1 is the gen's verdict on failed (here: cancelled) requests, not a crash.
    let verdict = if s["failed"] == 0 { 0 } else { 1 };
    assert_eq!(status.code(), Some(verdict), "{s}\n{}", g.stderr_text());
    let n = |k: &str| {
        s["backend"][k]
            .as_u64()
            .unwrap_or_else(|| panic!("no {k}: {s}"))
    };
    assert!(
        n("nixl_cancelled_in_flight") >= 1,
        "no READ was cancelled in flight: {s}"
    );
    // A cancelled READ ends (and lets its blocks go) only at its terminal status, and no
    // later READ was ever posted into a block an unfinished READ still targets.
    assert_eq!(
        n("nixl_cancelled_ended"),
        n("nixl_cancelled_in_flight"),
        "{s}"
    );
    assert_eq!(n("nixl_reused_in_flight"), 0, "{s}");
    // Requests that completed hold the ctx's bytes (the gen verifies): no late READ landed
    // in a block after it was handed to another request.
    assert_eq!(
        s["done"].as_u64().unwrap() + s["failed"].as_u64().unwrap(),
        100,
        "{s}"
    );
    let errors = s["errors"].as_object().unwrap();
    assert!(
        errors.keys().all(|k| k.contains("timed out")),
        "a failure other than the cancel: {s}"
    );
    assert_pools_free(&s);
    // The ctx kept each cancelled send's blocks pinned until the READ's notification or
    // failure, and then freed every one.
    wait_released(metrics);
}

/// A ctx instance of `ctx_tp` ranks and a gen instance of `gen_tp` ranks over NIXL: each gen
/// rank READs its share from every ctx rank that holds part of it, and verifies it byte for
/// byte; both sides end with every block and slot free.
fn nixl_hetero(ctx_tp: &str, gen_tp: &str) {
    let cfg = write_config("");
    let cfg = cfg.to_str().unwrap();
    let c = ctx_with(
        "127.0.0.1:0",
        cfg,
        &[&HETERO_LAYOUT[..], &["--tp", ctx_tp]].concat(),
    );
    let metrics = c.addr("metrics ");
    let peers = c.wait_line("listening ", kvferry_tests::START_TIMEOUT);
    assert_eq!(peers.split(',').count().to_string(), ctx_tp, "{peers}");
    let mut args = vec!["gen", "--backend", "nixl", "--peer", &peers, "--tp", gen_tp];
    args.extend([
        "--requests",
        "60",
        "--concurrency",
        "4",
        "--max-blocks",
        "8",
    ]);
    args.extend(["--config", cfg]);
    args.extend(HETERO_LAYOUT);
    let mut g = NodeProc::spawn_env(BIN, &args, &UCX_LOOPBACK);
    let status = g.wait_exit(GEN_TIMEOUT);
    let s = g.summary();
    assert!(
        status.success(),
        "ctx TP{ctx_tp} -> gen TP{gen_tp}: {s}\n{}",
        g.stderr_text()
    );
    assert_eq!(s["done"], 60, "{s}");
    assert_pools_free(&s);
    // One READ per (gen rank, ctx rank) pair that shares bytes, every one of them notified.
    wait_released(metrics);
}

#[test]
fn nixl_hetero_tp_ctx2_to_gen1_verifies_every_byte() {
    nixl_hetero("2", "1");
}

#[test]
fn nixl_hetero_tp_ctx1_to_gen2_verifies_every_byte() {
    nixl_hetero("1", "2");
}
