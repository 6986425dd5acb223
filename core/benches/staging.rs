//! Staging pool hot path: acquire a slot and release it (by dropping the guard).
//!
//! Run: `cargo bench -p kvferry-core --bench staging -- --warm-up-time 1 --measurement-time 3`

use criterion::{criterion_group, criterion_main, Criterion};
use kvferry_core::staging::StagingPool;
use std::hint::black_box;

fn bench_staging(c: &mut Criterion) {
    let mut g = c.benchmark_group("staging");

    // Slot buffers are allocated lazily on first use; touch every slot once so the loop
    // measures bookkeeping, not allocation.
    let pool = StagingPool::new(64, 64 * 1024);
    let warm: Vec<_> = (0..64)
        .map(|_| pool.try_acquire(64 * 1024).unwrap())
        .collect();
    drop(warm);
    g.bench_function("try_acquire_release", |b| {
        b.iter(|| drop(black_box(pool.try_acquire(black_box(64 * 1024)).unwrap())))
    });

    // A nearly full pool: the free list is short, the state vector long; acquire should not
    // depend on how many slots are busy.
    let held: Vec<_> = (0..63).map(|_| pool.try_acquire(1).unwrap()).collect();
    g.bench_function("try_acquire_release_63_of_64_busy", |b| {
        b.iter(|| drop(black_box(pool.try_acquire(black_box(64 * 1024)).unwrap())))
    });

    // The exhausted path callers hit under load: error out without blocking.
    let last = pool.try_acquire(1).unwrap();
    g.bench_function("try_acquire_exhausted", |b| {
        b.iter(|| black_box(pool.try_acquire(black_box(1)).is_err()))
    });
    drop((held, last));

    // Fallback buffers allocate: shown for scale against the slot path.
    let small = StagingPool::new(0, 64 * 1024);
    g.bench_function("acquire_or_fallback_64KiB_alloc", |b| {
        b.iter(|| drop(black_box(small.acquire_or_fallback(black_box(64 * 1024)))))
    });
    g.finish();
}

criterion_group!(benches, bench_staging);
criterion_main!(benches);
