//! The gather kernel against a host memcpy reference: unaligned heads and tails, relative
//! misalignment of source and destination, tiny and large fragments, local and peer memory.
//! Skips (with a printed reason) where there is no GPU.
#![cfg(feature = "cuda")]

mod common;

use common::gpus;
use kvferry_backends::cuda::kernel::{encode_pieces, split_into_pieces, PIECE_BYTES};
use kvferry_backends::cuda::verify::{apply_fragments, compare, fill_pattern, POISON};
use kvferry_backends::cuda::{CopyKernel, DeviceBuffer, Gpu, KernelConfig, Stream};
use kvferry_core::plan::Fragment;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

/// Non-overlapping destinations; sources anywhere. Lengths from 1 byte to ~200 KiB.
fn random_fragments(seed: u64, src_len: u64, dst_len: u64) -> Vec<Fragment> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let mut dst = rng.random_range(0..64u64);
    loop {
        let len = match rng.random_range(0..4) {
            0 => rng.random_range(1..40u64),
            1 => rng.random_range(40..4096u64),
            2 => 16 << 10,
            _ => rng.random_range(4096..200_000u64),
        };
        if dst + len > dst_len {
            break;
        }
        let src = rng.random_range(0..src_len - len);
        out.push(Fragment {
            src_rank: 0,
            src_offset: src,
            dst_offset: dst,
            len,
        });
        dst += len + rng.random_range(0..300u64);
    }
    out
}

fn check_copy(src_gpu: &Arc<Gpu>, dst_gpu: &Arc<Gpu>, run_on: &Arc<Gpu>, cfg: KernelConfig) {
    let n = 8 << 20;
    let mut host_src = vec![0u8; n];
    fill_pattern(42, &mut host_src);
    let src = DeviceBuffer::alloc(src_gpu, n).unwrap();
    src.write(0, &host_src).unwrap();
    let dst = DeviceBuffer::alloc(dst_gpu, n).unwrap();
    dst.fill_byte(POISON).unwrap();
    let frags = random_fragments(7, n as u64, n as u64);
    assert!(frags.len() > 50);
    let mut pieces = Vec::new();
    for f in &frags {
        split_into_pieces(
            src.ptr() + f.src_offset,
            dst.ptr() + f.dst_offset,
            f.len,
            cfg.piece_bytes,
            &mut pieces,
        );
    }
    let mut bytes = vec![0u8; pieces.len() * PIECE_BYTES];
    encode_pieces(&pieces, &mut bytes);
    let desc = DeviceBuffer::alloc(run_on, bytes.len()).unwrap();
    desc.write(0, &bytes).unwrap();
    let kernel = CopyKernel::new(run_on).unwrap();
    let stream = Stream::new(run_on).unwrap();
    kernel
        .launch(&stream, desc.ptr(), pieces.len() as u64, &cfg)
        .unwrap();
    stream.synchronize().unwrap();
    let mut expected = vec![POISON; n];
    apply_fragments(&host_src, &mut expected, frags.iter().copied());
    let mut got = vec![0u8; n];
    dst.read(0, &mut got).unwrap();
    if let Err(m) = compare(&expected, &got) {
        panic!("kernel result differs from host plan copy: {m}");
    }
}

#[test]
fn gpu_kernel_matches_host_copy_on_one_device() {
    let Some(_) = gpus() else { return };
    let g = Gpu::open(0).unwrap();
    for cfg in [
        KernelConfig::default(),
        KernelConfig {
            threads: 256,
            ctas_per_sm: 2,
            unroll: 8,
            piece_bytes: 4096,
        },
    ] {
        check_copy(&g, &g, &g, cfg);
    }
}

#[test]
fn gpu_kernel_matches_host_copy_across_peers() {
    let Some(n) = gpus() else { return };
    if n < 2 {
        println!("skipping: peer copy needs 2 GPUs, found {n}");
        return;
    }
    let (g0, g1) = (Gpu::open(0).unwrap(), Gpu::open(1).unwrap());
    g0.enable_peer_access(&g1).unwrap();
    g1.enable_peer_access(&g0).unwrap();
    // Push (kernel on the source device) and pull (kernel on the destination device).
    check_copy(&g0, &g1, &g0, KernelConfig::default());
    check_copy(&g0, &g1, &g1, KernelConfig::default());
}
