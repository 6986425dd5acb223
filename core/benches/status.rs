//! The status poll (`check_gen_status`) with many transfers in flight and a few completing:
//! its cost must follow the completions, not the transfers in flight (completion queue, not a
//! scan). Each sample times one poll after 10 jobs completed; completing, agreeing, freeing and
//! refilling back to the same number in flight happen outside the timed region.
//!
//! Run: `cargo bench -p kvferry-core --bench status -- --warm-up-time 1 --measurement-time 3`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kvferry_core::blocks::BlockPool;
use kvferry_core::bugs::BugSet;
use kvferry_core::collective::agree;
use kvferry_core::config::TransceiverConfig;
use kvferry_core::layout::CacheLayout;
use kvferry_core::loopback::ManualAgent;
use kvferry_core::request::{ContextSource, Request};
use kvferry_core::transceiver::{Transceiver, TransceiverParts};
use kvferry_core::{PeerId, RequestId, TransferToken};
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const COMPLETING: usize = 10;

fn layout() -> CacheLayout {
    CacheLayout {
        num_layers: 4,
        num_kv_heads: 2,
        head_dim: 8,
        tokens_per_block: 4,
        dtype_bytes: 2,
        tp_size: 1,
        tp_rank: 0,
        pp_size: 1,
        pp_rank: 0,
        mla: false,
    }
}

/// One generation rank with `in_flight` one-block receives posted on a hand-driven agent.
struct Harness {
    tx: Transceiver,
    agent: Arc<ManualAgent>,
    pool: Arc<Mutex<BlockPool>>,
    next: u64,
}

impl Harness {
    fn new(in_flight: usize) -> Harness {
        let config = TransceiverConfig {
            // More receives than staging slots: the rest stage through fallback buffers, so
            // every request is a real in-flight job.
            staging_fallback: true,
            max_in_flight: in_flight + COMPLETING,
            ..TransceiverConfig::default()
        };
        let agent = ManualAgent::new();
        let pool = Arc::new(Mutex::new(BlockPool::new((in_flight + COMPLETING) as u32)));
        let me = PeerId {
            instance: 1,
            rank: 0,
        };
        let tx = Transceiver::new(TransceiverParts {
            me,
            layout: layout(),
            config,
            bugs: BugSet::NONE,
            agent: agent.clone(),
            blocks: pool.clone(),
        })
        .expect("bench layout and config are valid");
        let mut h = Harness {
            tx,
            agent,
            pool,
            next: 0,
        };
        h.submit(in_flight);
        assert_eq!(
            h.agent.pending_count(),
            in_flight,
            "every request in flight"
        );
        h
    }

    fn submit(&mut self, n: usize) {
        for _ in 0..n {
            let id = RequestId(self.next);
            self.next += 1;
            let blocks = self.pool.lock().unwrap().allocate(id, 1).unwrap();
            let source = ContextSource {
                instance: 0,
                layout: layout(),
                blocks: vec![blocks[0].id],
            };
            let req = Request::new_generation(id, TransferToken(7), blocks, source);
            self.tx
                .request_and_receive(Duration::ZERO, Arc::new(req))
                .unwrap();
        }
        // The RequestInfos have no context rank to go to here.
        while self.tx.poll_transmit().is_some() {}
    }

    /// Times one status poll after `COMPLETING` completions, then restores the load.
    fn sample(&mut self) -> Duration {
        assert_eq!(self.agent.complete_oldest(COMPLETING), COMPLETING);
        let start = Instant::now();
        let check = black_box(self.tx.check_gen_status(Duration::ZERO, COMPLETING));
        let took = start.elapsed();
        assert_eq!(check.contribution.done.len(), COMPLETING);
        let agreed = agree(&[check.contribution], 1).unwrap();
        for f in self.tx.apply_agreed(&agreed) {
            self.pool.lock().unwrap().free(&f.request.blocks);
        }
        self.tx.drain_events().for_each(drop);
        self.submit(COMPLETING);
        took
    }
}

fn bench_status(c: &mut Criterion) {
    let mut g = c.benchmark_group("check_gen_status_10_completing");
    for in_flight in [100usize, 1_000, 10_000, 100_000] {
        let mut h = Harness::new(in_flight);
        g.bench_function(BenchmarkId::from_parameter(in_flight), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| h.sample()).sum())
        });
    }
    g.finish();
}

criterion_group!(benches, bench_status);
criterion_main!(benches);
