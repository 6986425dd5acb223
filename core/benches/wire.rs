//! Wire codec: encode + decode of one frame, for the control plane's largest common message (a
//! RequestInfo naming 64 blocks), its smallest (a Heartbeat), and a 64 KiB host data chunk.
//!
//! Run: `cargo bench -p kvferry-core --bench wire -- --warm-up-time 1 --measurement-time 3`

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvferry_core::blocks::BlockRef;
use kvferry_core::layout::CacheLayout;
use kvferry_core::wire::{self, encode, Decoder, Message, RequestInfo};
use kvferry_core::{RequestId, TransferToken};
use std::hint::black_box;

fn request_info(blocks: u32) -> Message {
    Message::RequestInfo(RequestInfo {
        request: RequestId(42),
        token: TransferToken(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
        gen_layout: CacheLayout {
            num_layers: 80,
            num_kv_heads: 8,
            head_dim: 128,
            tokens_per_block: 32,
            dtype_bytes: 2,
            tp_size: 4,
            tp_rank: 1,
            pp_size: 1,
            pp_rank: 0,
            mla: false,
        },
        ctx_blocks: (0..blocks).map(|b| b * 3).collect(),
        gen_blocks: (0..blocks)
            .map(|b| BlockRef {
                id: b * 5,
                epoch: 1_000 + u64::from(b),
            })
            .collect(),
    })
}

/// One frame through the codec. The buffer is reused, as a connection's read buffer would be,
/// so the loop measures the codec rather than the allocator.
fn round_trip(d: &Decoder, msg: &Message, buf: &mut BytesMut) -> Message {
    encode(black_box(msg), buf);
    d.decode(buf).unwrap().unwrap()
}

fn bench_wire(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire");
    let d = Decoder::default();
    let mut buf = BytesMut::with_capacity(128 << 10);

    let info = request_info(64);
    g.bench_function("request_info_64_blocks", |b| {
        b.iter(|| black_box(round_trip(&d, &info, &mut buf)))
    });

    let hb = Message::Heartbeat { seq: 7 };
    g.bench_function("heartbeat", |b| {
        b.iter(|| black_box(round_trip(&d, &hb, &mut buf)))
    });

    // Encode copies the payload into the frame (the sender's one copy); decode hands it out
    // zero-copy. Dropping the decoded payload before the next encode lets `buf` reclaim its
    // allocation instead of growing.
    let data = Message::Data {
        request: RequestId(42),
        ctx_rank: 3,
        offset: 1 << 20,
        payload: Bytes::from(vec![0x5A; 64 << 10]),
    };
    g.throughput(Throughput::Bytes(64 << 10));
    g.bench_function("data_64KiB", |b| {
        b.iter(|| drop(black_box(round_trip(&d, &data, &mut buf))))
    });
    // The checksum alone, for scale: a Data round trip computes it twice (encode, decode).
    // The wire's implementation (crc-fast) against the `crc32c` crate's SSE4.2 loop it replaced.
    let payload = vec![0x5Au8; 64 << 10];
    g.bench_function("crc32c_64KiB", |b| {
        b.iter(|| black_box(wire::crc32c(&[black_box(&payload)])))
    });
    g.bench_function("crc32c_64KiB_sse42_crate", |b| {
        b.iter(|| black_box(crc32c::crc32c(black_box(&payload))))
    });
    g.finish();
}

criterion_group!(benches, bench_wire);
criterion_main!(benches);
