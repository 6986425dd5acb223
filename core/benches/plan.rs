//! Plan construction and expansion for a 70B-class model (Llama-3-70B KV shape: 80 layers,
//! 8 kv heads, head dim 128, bf16) moving from a context instance at TP8 to a generation
//! instance at TP4, 32 tokens per block, 64 blocks (a 2,048-token prompt).
//!
//! Run: `cargo bench -p kvferry-core --bench plan -- --warm-up-time 1 --measurement-time 3`

use criterion::{criterion_group, criterion_main, Criterion};
use kvferry_core::layout::CacheLayout;
use kvferry_core::plan::TransferPlan;
use std::hint::black_box;

fn layout(tp: u32) -> CacheLayout {
    CacheLayout {
        num_layers: 80,
        num_kv_heads: 8,
        head_dim: 128,
        tokens_per_block: 32,
        dtype_bytes: 2,
        tp_size: tp,
        tp_rank: 0,
        pp_size: 1,
        pp_rank: 0,
        mla: false,
    }
}

/// Context and generation block ids deliberately not equal, as after real allocation.
fn blocks() -> Vec<(u32, u32)> {
    (0..64).map(|i| (1000 + 3 * i, 500 + 2 * i)).collect()
}

fn bench_plan(c: &mut Criterion) {
    let ctx = layout(8);
    let gen = layout(4).with_rank(1);
    let blocks = blocks();
    let mut g = c.benchmark_group("plan_70b_tp8_to_tp4_64_blocks");

    // What one generation rank pays when a request arrives.
    g.bench_function("new", |b| {
        b.iter(|| TransferPlan::new(black_box(&ctx), black_box(&gen), black_box(&blocks)))
    });

    // What a backend pays to turn the plan into its copy list (64 blocks x 320 fragments).
    let plan = TransferPlan::new(&ctx, &gen, &blocks).expect("valid layouts");
    assert_eq!(plan.fragments().count(), 64 * 80 * 2 * 2);
    g.bench_function("iterate_fragments", |b| {
        b.iter(|| {
            black_box(&plan).fragments().fold(0u64, |acc, f| {
                acc ^ f.src_offset ^ f.dst_offset.wrapping_add(f.len)
            })
        })
    });

    // One context rank's share, as a sender walks it.
    g.bench_function("iterate_fragments_from_one_rank", |b| {
        b.iter(|| black_box(&plan).fragments_from(black_box(2)).count())
    });

    // The whole generation instance (four plans), as the CLI and a scheduler would see it.
    g.bench_function("new_all_gen_ranks", |b| {
        b.iter(|| {
            (0..4)
                .map(|r| TransferPlan::new(&ctx, &gen.with_rank(r), black_box(&blocks)))
                .filter(Result::is_ok)
                .count()
        })
    });
    g.finish();
}

criterion_group!(benches, bench_plan);
criterion_main!(benches);
