//! SIGKILL on the real path: a killed ctx fails the gen's affected requests with a clear error
//! and returns every slot and block, and the gen is served again once a ctx is back on the
//! same address; a killed gen makes the ctx release everything it held for it.

use kvferry_tests::{
    assert_survived_ctx_restart, wait_released, write_config, NodeProc, SMALL_LAYOUT,
};
use std::net::SocketAddr;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_kvferry-node-under-test");
/// Bound on a whole gen run (debug build, loaded CI).
const GEN_TIMEOUT: Duration = Duration::from_secs(240);

fn ctx(listen: &str, config: &str, metrics: bool) -> NodeProc {
    let mut args = vec!["ctx", "--listen", listen, "--config", config];
    if metrics {
        args.extend(["--metrics", "127.0.0.1:0"]);
    }
    args.extend(SMALL_LAYOUT);
    NodeProc::spawn(BIN, &args)
}

fn gen(peer: SocketAddr, requests: &str, config: &str) -> NodeProc {
    let peer = peer.to_string();
    let mut args = vec![
        "gen",
        "--peer",
        &peer,
        "--requests",
        requests,
        "--concurrency",
        "8",
        "--max-blocks",
        "16",
        "--progress-ms",
        "50",
        "--config",
        config,
    ];
    args.extend(SMALL_LAYOUT);
    NodeProc::spawn(BIN, &args)
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
fn killed_ctx_fails_requests_cleanly_and_gen_recovers_on_restart() {
    let ctx_cfg = write_config("kv_transfer_sender_future_timeout_ms = 5000\n");
    let gen_cfg = write_config("kv_transfer_timeout_ms = 5000\ninflight_cancel = true\n");
    let (ctx_cfg, gen_cfg) = (ctx_cfg.to_str().unwrap(), gen_cfg.to_str().unwrap());
    let mut ctx1 = ctx("127.0.0.1:0", ctx_cfg, false);
    let addr = ctx1.addr("listening ");
    let mut g = gen(addr, "4000", gen_cfg);
    wait_done(&g, 30);
    ctx1.kill();
    // The same port again: the gen knows only this address.
    let ctx2 = ctx(&addr.to_string(), ctx_cfg, false);
    assert_eq!(ctx2.addr("listening "), addr);
    g.wait_exit(GEN_TIMEOUT);
    assert_survived_ctx_restart(&g.summary(), 4000);
}

#[test]
fn killed_gen_makes_ctx_release_everything_and_serve_the_next() {
    let ctx_cfg = write_config("kv_transfer_sender_future_timeout_ms = 3000\n");
    let gen_cfg = write_config("kv_transfer_timeout_ms = 5000\ninflight_cancel = true\n");
    let (ctx_cfg, gen_cfg) = (ctx_cfg.to_str().unwrap(), gen_cfg.to_str().unwrap());
    let c = ctx("127.0.0.1:0", ctx_cfg, true);
    let metrics = c.addr("metrics ");
    let addr = c.addr("listening ");
    let mut g1 = gen(addr, "100000", gen_cfg);
    wait_done(&g1, 30);
    g1.kill();
    c.assert_gen_disconnect_seen();

    wait_released(metrics);

    let mut g2 = gen(addr, "20", gen_cfg);
    let status = g2.wait_exit(GEN_TIMEOUT);
    let s = g2.summary();
    assert!(status.success(), "{s}");
    assert_eq!(s["done"], 20, "{s}");
}
