//! Hostile bytes over real sockets: garbage, a truncated frame, an oversized length field, a
//! wrong transfer token and a request for blocks that are not the request's. Each gets a typed
//! error frame or a closed connection and a WARN naming the peer; a legitimate gen is still
//! served afterwards.

use bytes::{BufMut, BytesMut};
use kvferry_backends::node::frame::{Answer, Ask, Frame, NodeFrame, MAX_PREPARE_ASKS};
use kvferry_core::wire::{self, ErrorCode, Message, RequestInfo, HEADER_LEN, MAGIC, VERSION};
use kvferry_tests::{scrape, NodeProc, RawPeer, SMALL_LAYOUT};
use std::net::SocketAddr;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_kvferry-node-under-test");
/// How long the node may take to log its WARN.
const WARN_TIMEOUT: Duration = Duration::from_secs(30);
/// Metrics scrapes (50 ms apart) before the counters must show what happened.
const METRICS_POLLS: usize = 600;

/// Expects the node to close the connection, optionally after a Malformed error frame.
fn expect_closed(p: &mut RawPeer) {
    while let Some(f) = p.recv() {
        assert!(
            matches!(
                f,
                Frame::Core(Message::Error {
                    code: ErrorCode::Malformed,
                    ..
                })
            ),
            "unexpected frame before the close: {f:?}"
        );
    }
}

fn expect_warn(ctx: &NodeProc, who: SocketAddr) {
    let who = who.to_string();
    assert!(
        ctx.wait_stderr(WARN_TIMEOUT, |l| l.contains("WARN") && l.contains(&who)),
        "no WARN naming {who}:\n{}",
        ctx.stderr_text()
    );
}

fn error_code(f: Option<Frame>) -> ErrorCode {
    match f {
        Some(Frame::Core(Message::Error { code, .. })) => code,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

#[test]
fn hostile_peers_are_refused_and_others_still_served() {
    let mut args = vec!["ctx", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"];
    args.extend(SMALL_LAYOUT);
    let ctx = NodeProc::spawn(BIN, &args);
    let metrics = ctx.addr("metrics ");
    let addr = ctx.addr("listening ");
    for (bytes, end_stream) in malformed() {
        let mut p = RawPeer::connect(addr);
        p.send_raw(&bytes);
        if end_stream {
            p.stream.shutdown(std::net::Shutdown::Write).unwrap();
        }
        expect_closed(&mut p);
        expect_warn(&ctx, p.local_addr());
    }
    over_bound_prepare_is_cut_off(&ctx, addr);
    wrong_token_and_foreign_blocks_get_typed_errors(&ctx, addr, metrics);

    // Everyone else is still served.
    let peer = addr.to_string();
    let mut args = vec!["gen", "--peer", &peer, "--requests", "10"];
    args.extend(SMALL_LAYOUT);
    let mut g = NodeProc::spawn(BIN, &args);
    let status = g.wait_exit(Duration::from_secs(120));
    let s = g.summary();
    assert!(status.success(), "{s}");
    assert_eq!(s["done"], 10, "{s}");
}

/// Byte strings the node must refuse by closing, each with whether the stream ends after it:
/// garbage; a valid frame cut short, then end of stream; a header claiming a 4 GiB body,
/// refused before any body is read.
fn malformed() -> [(Vec<u8>, bool); 3] {
    let mut cut = BytesMut::new();
    wire::encode(&Message::Heartbeat { seq: 1 }, &mut cut);
    let cut = cut[..cut.len() - 3].to_vec();
    let mut huge = BytesMut::with_capacity(HEADER_LEN);
    huge.put_u32(MAGIC);
    huge.put_u8(VERSION);
    huge.put_u8(1);
    huge.put_u16(0);
    huge.put_u32(u32::MAX - 1);
    huge.put_u32(0);
    [(vec![0xAB; 64], false), (cut, true), (huge.to_vec(), false)]
}

/// A Prepare over its ask bound: nothing prepared, the connection cut off.
fn over_bound_prepare_is_cut_off(ctx: &NodeProc, addr: SocketAddr) {
    let mut p = RawPeer::connect(addr);
    let ask = |tag| Ask {
        tag,
        blocks: 1,
        seed: None,
    };
    p.send(&Frame::Node(NodeFrame::Prepare {
        asks: (0..=MAX_PREPARE_ASKS as u64).map(ask).collect(),
    }));
    expect_closed(&mut p);
    expect_warn(ctx, p.local_addr());
}

/// A real request, then a wrong token and foreign blocks for it: typed errors, no bytes.
fn wrong_token_and_foreign_blocks_get_typed_errors(
    ctx: &NodeProc,
    addr: SocketAddr,
    metrics: SocketAddr,
) {
    let mut p = RawPeer::connect(addr);
    let info = prepared_request(&mut p);
    let token = info.token;
    let info = RequestInfo {
        token: kvferry_core::TransferToken(token.0 ^ 1),
        ..info
    };
    p.send(&Frame::Core(Message::RequestInfo(info.clone())));
    let is_error =
        |f: &Frame| matches!(f, Frame::Core(Message::Error { .. } | Message::Data { .. }));
    assert_eq!(error_code(p.recv_until(is_error)), ErrorCode::BadToken);
    expect_warn(ctx, p.local_addr());

    let foreign: Vec<u32> = info.ctx_blocks.iter().map(|b| b + 100).collect();
    let info = RequestInfo {
        token,
        ctx_blocks: foreign,
        ..info
    };
    p.send(&Frame::Core(Message::RequestInfo(info)));
    assert_eq!(error_code(p.recv_until(is_error)), ErrorCode::ForeignBlocks);
    // Metrics are published after the step that sent the error frame: poll, bounded.
    let mut m = scrape(metrics);
    for _ in 0..METRICS_POLLS {
        if m["kvferry_requests_rejected_total"] >= 2.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        m = scrape(metrics);
    }
    assert_eq!(m["kvferry_requests_rejected_total"], 2.0, "{m:?}");
    assert_eq!(
        m["kvferry_transfers_started_total"], 0.0,
        "no byte served: {m:?}"
    );
}

/// Asks the ctx for one request of 2 blocks; its `RequestInfo` as a gen would send it.
fn prepared_request(p: &mut RawPeer) -> RequestInfo {
    p.send(&Frame::Node(NodeFrame::Prepare {
        asks: vec![Ask {
            tag: 1,
            blocks: 2,
            seed: Some(3),
        }],
    }));
    let Some(Frame::Node(NodeFrame::Prepared { layout, answers })) = p.recv() else {
        panic!("prepare not answered");
    };
    let Ok(
        [Answer::Prepared {
            request,
            token,
            ctx_blocks,
            ..
        }],
    ) = <[Answer; 1]>::try_from(answers)
    else {
        panic!("one ask, one prepared answer");
    };
    RequestInfo {
        request,
        token: kvferry_core::TransferToken(token),
        gen_layout: layout,
        ctx_blocks,
        gen_blocks: vec![
            kvferry_core::blocks::BlockRef { id: 0, epoch: 1 },
            kvferry_core::blocks::BlockRef { id: 1, epoch: 2 },
        ],
    }
}

/// A newcomer's mistake: a gen pointed where nothing listens says so within seconds and exits
/// non-zero, and its summary prints no figure made up from zero bytes.
#[test]
fn a_gen_with_nothing_listening_fails_fast_and_says_why() {
    // Bind then drop a listener: a port on loopback where, for now, nothing listens.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut gen = NodeProc::spawn(BIN, &["gen", "--peer", &addr, "--requests", "3", "--quiet"]);
    let status = gen.wait_exit(Duration::from_secs(20));
    assert!(!status.success(), "exit {status:?}");
    let s = gen.summary();
    assert_eq!(s["skipped"], 3);
    assert!(s["cpu_s_per_gib"].is_null() && s["p50_ms"].is_null(), "{s}");
    assert!(s["gave_up"].as_str().unwrap().contains(&addr), "{s}");
    assert!(
        gen.stderr_text().contains("gave the ctx up"),
        "{}",
        gen.stderr_text()
    );
}

/// A gen that names fewer ctx ranks than the ctx instance has cannot be served (each of its
/// ranks needs bytes from every ctx rank): it says so and exits non-zero, and the ctx, which
/// prepared the request, frees it.
#[test]
fn a_gen_naming_too_few_ctx_ranks_fails_and_says_why() {
    let layout = [
        "--kv-heads",
        "2",
        "--head-dim",
        "16",
        "--tokens-per-block",
        "4",
    ];
    let mut args = vec!["ctx", "--tp", "2", "--metrics", "127.0.0.1:0"];
    args.extend(layout);
    let ctx = NodeProc::spawn(BIN, &args);
    let metrics = ctx.addr("metrics ");
    let peers = ctx.wait_line("listening ", kvferry_tests::START_TIMEOUT);
    let first = peers.split(',').next().unwrap().to_string();
    let mut args = vec!["gen", "--peer", &first, "--requests", "3", "--quiet"];
    args.extend(layout);
    let mut gen = NodeProc::spawn(BIN, &args);
    let status = gen.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "exit {status:?}");
    let s = gen.summary();
    let why = s["gave_up"].as_str().unwrap_or_default();
    assert!(
        why.contains("serves 2 ranks") && why.contains("names 1"),
        "{s}"
    );
    kvferry_tests::wait_released(metrics);

    // A TP degree the model's heads cannot be split by is refused before anything starts.
    let out = std::process::Command::new(BIN)
        .args(["ctx", "--tp", "3", "--kv-heads", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("num_kv_heads = 2 and tp_size = 3"), "{err}");
}
