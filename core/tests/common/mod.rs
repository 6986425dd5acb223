//! The two-instance loopback harness the transceiver tests share: ranks with a hand-driven
//! agent, a pump for control messages and one collective step per instance.
#![allow(dead_code)] // each test binary uses its own part of the harness

use kvferry_core::agent::TransferAgent;
use kvferry_core::blocks::BlockPool;
use kvferry_core::bugs::BugSet;
use kvferry_core::collective::agree;
use kvferry_core::config::TransceiverConfig;
use kvferry_core::layout::CacheLayout;
use kvferry_core::loopback::{Envelope, LoopbackNet, ManualAgent};
use kvferry_core::request::{ContextSource, Request, RequestState};
use kvferry_core::transceiver::{Finished, Side, Transceiver, TransceiverParts};
use kvferry_core::{PeerId, RequestId, TransferToken};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const CTX: u32 = 0;
pub const GEN: u32 = 1;
pub const BLOCKS: u32 = 16;

pub fn layout(tp: u32) -> CacheLayout {
    CacheLayout {
        num_layers: 4,
        num_kv_heads: 2,
        head_dim: 4,
        tokens_per_block: 4,
        dtype_bytes: 2,
        tp_size: tp,
        tp_rank: 0,
        pp_size: 1,
        pp_rank: 0,
        mla: false,
    }
}

pub struct Rank {
    pub tx: Transceiver,
    pub agent: Arc<ManualAgent>,
    pub pool: Arc<Mutex<BlockPool>>,
}

pub struct Cluster {
    pub net: LoopbackNet,
    pub ctx: Vec<Rank>,
    pub gen: Vec<Rank>,
    pub now: Duration,
}

pub fn rank(instance: u32, l: CacheLayout, config: &TransceiverConfig) -> Rank {
    rank_with(instance, l, config, BugSet::NONE, BLOCKS)
}

/// A rank with bug switches `bugs` and a pool of `blocks`.
pub fn rank_with(
    instance: u32,
    l: CacheLayout,
    config: &TransceiverConfig,
    bugs: BugSet,
    blocks: u32,
) -> Rank {
    let agent = ManualAgent::new();
    let pool = Arc::new(Mutex::new(BlockPool::new(blocks)));
    let me = PeerId {
        instance,
        rank: l.rank(),
    };
    let dyn_agent: Arc<dyn TransferAgent> = agent.clone();
    let tx = Transceiver::new(TransceiverParts {
        me,
        layout: l,
        config: config.clone(),
        bugs,
        agent: dyn_agent,
        blocks: pool.clone(),
    })
    .expect("test layout and config are valid");
    Rank { tx, agent, pool }
}

impl Cluster {
    pub fn new(ctx_tp: u32, gen_tp: u32, config: TransceiverConfig) -> Cluster {
        Cluster::with_bugs(ctx_tp, gen_tp, config, BugSet::NONE)
    }

    /// A cluster whose every rank runs with the bug switches `bugs`.
    pub fn with_bugs(ctx_tp: u32, gen_tp: u32, config: TransceiverConfig, bugs: BugSet) -> Cluster {
        let net = LoopbackNet::new();
        let mk = |i: u32, tp: u32| -> Vec<Rank> {
            (0..tp)
                .map(|r| rank_with(i, layout(tp).with_rank(r), &config, bugs, BLOCKS))
                .collect()
        };
        let (ctx, gen) = (mk(CTX, ctx_tp), mk(GEN, gen_tp));
        Cluster {
            net,
            ctx,
            gen,
            now: Duration::ZERO,
        }
    }

    pub fn instance(&mut self, i: u32) -> &mut Vec<Rank> {
        if i == CTX {
            &mut self.ctx
        } else {
            &mut self.gen
        }
    }

    /// Allocates `n` blocks on every rank of both instances and registers request `id`.
    pub fn submit(&mut self, id: u64, n: usize, token: u128, gen_token: u128) -> RequestId {
        let rid = RequestId(id);
        let now = self.now;
        let mut ctx_ids = Vec::new();
        for r in &mut self.ctx {
            let blocks = r.pool.lock().unwrap().allocate(rid, n).unwrap();
            ctx_ids = blocks.iter().map(|b| b.id).collect();
            let req = Arc::new(Request::new_context(rid, TransferToken(token), blocks));
            r.tx.respond_and_send(now, req).unwrap();
        }
        let ctx_layout = self.ctx[0].tx.layout().with_rank(0);
        for r in &mut self.gen {
            let blocks = r.pool.lock().unwrap().allocate(rid, n).unwrap();
            let source = ContextSource {
                instance: CTX,
                layout: ctx_layout,
                blocks: ctx_ids.clone(),
            };
            let req = Arc::new(Request::new_generation(
                rid,
                TransferToken(gen_token),
                blocks,
                source,
            ));
            r.tx.request_and_receive(now, req).unwrap();
        }
        rid
    }

    /// Registers request `id` with `n` blocks on context rank 0 only; returns its block ids.
    pub fn register_ctx(&mut self, id: u64, n: usize, token: u128) -> (RequestId, Vec<u32>) {
        let rid = RequestId(id);
        let blocks = self.ctx[0].pool.lock().unwrap().allocate(rid, n).unwrap();
        let ids = blocks.iter().map(|b| b.id).collect();
        let req = Arc::new(Request::new_context(rid, TransferToken(token), blocks));
        self.ctx[0].tx.respond_and_send(self.now, req).unwrap();
        (rid, ids)
    }

    /// Moves every rank's outbox into the net.
    pub fn flush(&mut self) {
        for r in self.ctx.iter_mut().chain(self.gen.iter_mut()) {
            self.net.flush(&mut r.tx);
        }
    }

    /// The oldest message in flight, after every outbox is flushed.
    pub fn pop(&mut self) -> Option<Envelope> {
        self.flush();
        self.net.pop()
    }

    /// Delivers messages until none is left in flight or in any outbox.
    pub fn pump(&mut self) {
        let now = self.now;
        let mut delivered = 0;
        while let Some(env) = self.pop() {
            // Control traffic of a handful of requests is tiny; more is a message storm.
            delivered += 1;
            assert!(delivered < 10_000, "livelock: control messages never stop");
            let inst = self.instance(env.to.instance);
            if let Some(r) = inst.get_mut(env.to.rank as usize) {
                r.tx.handle_message(now, env.from, env.msg);
            }
        }
    }

    /// One collective step on an instance; frees the blocks of what finished.
    pub fn step(&mut self, i: u32) -> Vec<Finished> {
        let now = self.now;
        let side = if i == CTX {
            Side::Context
        } else {
            Side::Generation
        };
        let ranks = self.instance(i);
        let all: Vec<_> = ranks
            .iter_mut()
            .map(|r| match side {
                Side::Context => r.tx.check_context_status(now, 0).contribution,
                Side::Generation => r.tx.check_gen_status(now, 0).contribution,
            })
            .collect();
        let agreed = agree(&all, ranks.len()).unwrap();
        let mut out = Vec::new();
        for r in ranks.iter_mut() {
            let fin = r.tx.apply_agreed(&agreed);
            for f in &fin {
                r.pool.lock().unwrap().free(&f.request.blocks);
            }
            out.extend(fin);
        }
        out
    }

    pub fn run_until_quiet(&mut self) -> Vec<Finished> {
        let mut out = Vec::new();
        for _ in 0..20 {
            self.pump();
            for r in self.ctx.iter().chain(&self.gen) {
                r.agent.complete_all();
            }
            out.extend(self.step(CTX));
            out.extend(self.step(GEN));
        }
        out
    }

    pub fn assert_pools_full(&self) {
        for r in self.ctx.iter().chain(&self.gen) {
            let s = r.tx.staging_counters();
            assert_eq!((s.in_use, s.poisoned, s.fallbacks_live), (0, 0, 0), "{s:?}");
            assert_eq!(r.pool.lock().unwrap().free_count(), BLOCKS as usize);
        }
    }
}

pub fn states(f: &[Finished]) -> Vec<RequestState> {
    f.iter().map(|f| f.state).collect()
}
