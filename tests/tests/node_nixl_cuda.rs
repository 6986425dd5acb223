//! The node over NIXL with its pools in GPU memory: a ctx and a gen
//! `kvferry-node --backend nixl-cuda` as two processes, the gen READing the ctx's VRAM pool
//! with NIXL over UCX's CUDA transports (`UCX_TLS=cuda_copy,cuda_ipc,tcp`, control over `lo`),
//! and its throughput beside the CUDA-IPC node (`--backend cuda`) measured in the same run.
//! One GPU: both on device 0; two or more: ctx on 0, gen on 1. Without a usable GPU each test
//! prints `skipping: <reason>` and passes; with one, they need the NIXL runtime
//! (`.ci/install-nixl`, or `KVFERRY_NIXL_LIB_DIR`) and fail without it.
#![cfg(all(feature = "cuda", feature = "nixl"))]

use kvferry_tests::{wait_released, NodeProc, BIG_CTX, BIG_GEN, BIG_LAYOUT, SMALL_LAYOUT};
use std::net::SocketAddr;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_kvferry-node-under-test");
/// Bound on a whole gen run (NVRTC compile at start for `cuda`, debug build, loaded CI).
const GEN_TIMEOUT: Duration = Duration::from_secs(240);
/// UCX moves VRAM with `cuda_ipc` between processes (`cuda_copy` stages what it cannot map);
/// TCP on loopback carries only its wire-up and notifications. UCX's memory-type cache is
/// filled by its CUDA allocation hooks (`libucm_cuda`, which needs `libcudart.so.12`, absent
/// on a driver-only host) and calls a pool it never saw allocated host memory, so NIXL
/// refuses to register it as VRAM; without the cache UCX asks the driver.
const UCX_CUDA: [(&str, &str); 3] = [
    ("UCX_TLS", "cuda_copy,cuda_ipc,tcp"),
    ("UCX_NET_DEVICES", "lo"),
    ("UCX_MEMTYPE_CACHE", "n"),
];

/// The (ctx, gen) device ordinals, or why there is no GPU to run on.
fn devices() -> Option<(&'static str, &'static str)> {
    let why = match kvferry_backends::cuda::probe() {
        Ok(0) => "no CUDA device".to_string(),
        Ok(1) => return Some(("0", "0")),
        Ok(_) => return Some(("0", "1")),
        Err(e) => e.to_string(),
    };
    println!("skipping: {why}");
    None
}

fn ctx(backend: &str, device: &str, extra: &[&str]) -> NodeProc {
    let mut args = vec!["ctx", "--backend", backend, "--device", device];
    args.extend(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]);
    args.extend(extra);
    NodeProc::spawn_env(BIN, &args, &UCX_CUDA)
}

fn gen(backend: &str, device: &str, peer: SocketAddr, extra: &[&str]) -> NodeProc {
    let peer = peer.to_string();
    let mut args = vec!["gen", "--backend", backend, "--device", device];
    args.extend(["--peer", &peer, "--progress-ms", "50"]);
    args.extend(extra);
    NodeProc::spawn_env(BIN, &args, &UCX_CUDA)
}

/// Runs a gen to its end and returns its summary, asserting every request done and the
/// gen's pools free again.
fn run_gen(mut g: NodeProc, requests: u64) -> serde_json::Value {
    let status = g.wait_exit(GEN_TIMEOUT);
    let s = g.summary();
    assert!(status.success(), "{s}\n{}", g.stderr_text());
    assert_eq!(s["done"], requests, "{s}");
    assert_eq!(s["failed"], 0, "{s}");
    assert!(s["bytes"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["blocks_free"], s["blocks_total"], "{s}");
    s
}

#[test]
fn nixl_vram_read_moves_verified_bytes_between_two_processes() {
    let Some((ctx_dev, gen_dev)) = devices() else {
        return;
    };
    let c = ctx("nixl-cuda", ctx_dev, &SMALL_LAYOUT);
    let (addr, metrics) = (c.addr("listening "), c.addr("metrics "));
    let mut extra = vec![
        "--requests",
        "200",
        "--concurrency",
        "8",
        "--max-blocks",
        "16",
    ];
    extra.extend(SMALL_LAYOUT);
    // The gen verifies every block (its default): read back from its device to host and
    // compared with the ctx's seeded pattern.
    run_gen(gen("nixl-cuda", gen_dev, addr, &extra), 200);
    // Every parked send was completed by a READ's notification: the ctx holds nothing.
    wait_released(metrics);
}

/// One node path's throughput (MiB/s) over the big layout, bytes not verified (the test
/// above and `node_cuda` verify them) so the copy path alone is measured.
fn throughput(backend: &str, ctx_dev: &str, gen_dev: &str, requests: u64) -> f64 {
    let c = ctx(backend, ctx_dev, &[&BIG_LAYOUT[..], &BIG_CTX].concat());
    let n = requests.to_string();
    let mut extra = vec!["--requests", &n, "--no-verify"];
    extra.extend(BIG_GEN);
    extra.extend(BIG_LAYOUT);
    let s = run_gen(
        gen(backend, gen_dev, c.addr("listening "), &extra),
        requests,
    );
    s["throughput_mib_s"]
        .as_f64()
        .expect("throughput in the summary")
}

/// Requests of the NIXL run: on the H200 its READs moved ~80 MiB/s (BENCHMARKS.md), so 200
/// of 8 MiB at 4 in flight outlived the default transfer timeouts; 40 end in about 4 s.
const NIXL_REQUESTS: u64 = 40;
const IPC_REQUESTS: u64 = 200;

#[test]
fn nixl_vram_throughput_beside_cuda_ipc() {
    let Some((ctx_dev, gen_dev)) = devices() else {
        return;
    };
    let nixl = throughput("nixl-cuda", ctx_dev, gen_dev, NIXL_REQUESTS);
    let ipc = throughput("cuda", ctx_dev, gen_dev, IPC_REQUESTS);
    println!("| path | devices | requests x 8 MiB | MiB/s |");
    println!("| NIXL VRAM->VRAM | {ctx_dev}->{gen_dev} | {NIXL_REQUESTS} | {nixl:.0} |");
    println!("| CUDA IPC gather kernel | {ctx_dev}->{gen_dev} | {IPC_REQUESTS} | {ipc:.0} |");
    assert!(
        nixl > 0.0 && ipc > 0.0,
        "nixl {nixl} MiB/s, cuda {ipc} MiB/s"
    );
}
