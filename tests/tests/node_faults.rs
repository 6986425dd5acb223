//! SIGKILL on the real path: a killed ctx fails the gen's affected requests with a clear error
//! and returns every slot and block, and the gen is served again once a ctx is back on the
//! same address; a killed gen makes the ctx release everything it held for it; asks a lost
//! connection took with it are asked again of the ctx that comes back.

use kvferry_backends::node::frame::{Frame, NodeFrame};
use kvferry_tests::{
    assert_survived_ctx_restart, wait_released, write_config, NodeProc, RawPeer, SMALL_LAYOUT,
};
use std::net::{SocketAddr, TcpListener};
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

/// A ctx that takes the gen's first `Prepare` and hangs up without answering, then a real ctx
/// on the same address: the unanswered asks held nothing anywhere, so the gen asks them again
/// after it reconnects, and every request completes; none fails for the lost connection.
#[test]
fn asks_a_lost_connection_took_are_asked_again() {
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = fake.local_addr().unwrap();
    let peer = addr.to_string();
    let mut args = vec!["gen", "--peer", &peer, "--requests", "40"];
    args.extend(["--concurrency", "4", "--max-blocks", "4"]);
    args.extend(SMALL_LAYOUT);
    let mut g = NodeProc::spawn(BIN, &args);
    let (stream, _) = fake.accept().unwrap();
    let mut p = RawPeer::wrap(stream);
    let asked = p.recv_until(|f| matches!(f, Frame::Node(NodeFrame::Prepare { .. })));
    let Some(Frame::Node(NodeFrame::Prepare { asks })) = asked else {
        panic!("the gen asked nothing: {asked:?}")
    };
    assert!(!asks.is_empty());
    drop((p, fake));
    let ctx_cfg = write_config("");
    let real = ctx(&addr.to_string(), ctx_cfg.to_str().unwrap(), false);
    assert_eq!(real.addr("listening "), addr);
    g.wait_exit(GEN_TIMEOUT);
    let s = g.summary();
    assert_eq!(s["done"], 40, "{s}");
    assert_eq!(s["failed"], 0, "asks lost with the connection failed: {s}");
    assert_eq!(s["blocks_free"], s["blocks_total"], "{s}");
}
