//! The node over CUDA IPC, as in production: a ctx and a gen `kvferry-node --backend cuda` as
//! two processes on 127.0.0.1, the gen mapping the ctx's pool and pulling with the gather
//! kernel. One GPU: both on device 0 (IPC works between processes on one device); two or more:
//! ctx on 0, gen on 1. Without a usable GPU each test prints `skipping: <reason>` and passes.
#![cfg(feature = "cuda")]

use kvferry_tests::{scrape, wait_released, NodeProc, SMALL_LAYOUT};
use std::net::SocketAddr;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_kvferry-node-under-test");
/// Bound on a whole gen run (NVRTC compile at start, debug build, loaded CI).
const GEN_TIMEOUT: Duration = Duration::from_secs(240);

/// The (ctx, gen) device ordinals, or why there is no GPU to run on.
fn devices() -> Result<(&'static str, &'static str), String> {
    match kvferry_backends::cuda::probe() {
        Ok(0) => Err("no CUDA device".into()),
        Ok(1) => Ok(("0", "0")),
        Ok(_) => Ok(("0", "1")),
        Err(e) => Err(e.to_string()),
    }
}

fn ctx(device: &str) -> NodeProc {
    let mut args = vec![
        "ctx",
        "--backend",
        "cuda",
        "--device",
        device,
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
    ];
    args.extend(SMALL_LAYOUT);
    NodeProc::spawn(BIN, &args)
}

/// A CUDA ctx (its process, listen and metrics addresses) and the device for the gen; `None`
/// after printing why there is no GPU to run on.
fn start() -> Option<(NodeProc, SocketAddr, SocketAddr, &'static str)> {
    let (ctx_dev, gen_dev) = match devices() {
        Ok(d) => d,
        Err(why) => {
            println!("skipping: {why}");
            return None;
        }
    };
    let c = ctx(ctx_dev);
    let metrics = c.addr("metrics ");
    let addr = c.addr("listening ");
    Some((c, addr, metrics, gen_dev))
}

fn gen(device: &str, peer: SocketAddr, requests: &str, extra: &[&str]) -> NodeProc {
    let peer = peer.to_string();
    let mut args = vec![
        "gen",
        "--backend",
        "cuda",
        "--device",
        device,
        "--peer",
        &peer,
        "--requests",
        requests,
        "--max-blocks",
        "16",
        "--progress-ms",
        "50",
    ];
    args.extend(extra);
    args.extend(SMALL_LAYOUT);
    NodeProc::spawn(BIN, &args)
}

#[test]
fn cuda_gen_pulls_a_verified_load_from_a_cuda_ctx() {
    let Some((_ctx, addr, metrics, gen_dev)) = start() else {
        return;
    };
    let mut g = gen(gen_dev, addr, "200", &["--concurrency", "8"]);
    let status = g.wait_exit(GEN_TIMEOUT);
    let s = g.summary();
    assert!(status.success(), "gen failed: {s}\n{}", g.stderr_text());
    assert_eq!(s["done"], 200, "{s}");
    assert_eq!(s["failed"], 0, "{s}");
    assert_eq!(s["blocks_free"], s["blocks_total"], "{s}");
    assert_eq!(s["staging_free"], s["staging_slots"], "{s}");
    wait_released(metrics);
    let m = scrape(metrics);
    assert_eq!(m["kvferry_requests_done_total"], 200.0, "{m:?}");
}

/// A killed gen leaves sends parked on the ctx (its pulls will never be answered): they must
/// fail on the lost connection, not hold their blocks pinned, and the next gen is served.
#[test]
fn killed_cuda_gen_fails_parked_sends_and_the_next_gen_is_served() {
    let Some((c, addr, metrics, gen_dev)) = start() else {
        return;
    };
    let mut g1 = gen(gen_dev, addr, "1000000", &["--no-verify"]);
    let progressed = g1.wait_stderr(Duration::from_secs(120), |l| {
        l.starts_with("progress done=") && !l.starts_with("progress done=0 ")
    });
    assert!(progressed, "gen made no progress:\n{}", g1.stderr_text());
    g1.kill();
    c.assert_gen_disconnect_seen();
    wait_released(metrics);

    let mut g2 = gen(gen_dev, addr, "20", &[]);
    let status = g2.wait_exit(GEN_TIMEOUT);
    let s = g2.summary();
    assert!(status.success(), "{s}\n{}", g2.stderr_text());
    assert_eq!(s["done"], 20, "{s}");
}
