//! The core transceiver under arbitrary operation sequences: a context and a generation
//! instance of loopback ranks (`LoopbackNet`, `ManualAgent`) that the input drives like an
//! executor with faults: submissions (tokens matching or not, optional deadlines), agent jobs
//! completed or failed in any order, cancels on either side, time jumps (timeout WARNs,
//! `inflight_cancel` evictions, staging waits), executor recycles, refusing agents, partial
//! message delivery, collective steps and lost peers (one rank hears that a rank of the other
//! instance is gone; its messages still flow, as after a reset and a reconnect).
//!
//! Checked after every operation and after a final drain (see `cluster.rs`): every request
//! ends exactly once on every rank it was registered on and all ranks of an instance agree
//! (I7), no pending job may write a block the driver freed and reallocated and the pool
//! refuses such writes (I5), an agent with pending jobs stays alive (I3), at most one WARN per
//! request and none unconfigured (I4), no send without the token (I9), no message storm, and
//! at quiescence every staging slot and every block is back (I1, I2).
//!
//! Sizes are folded small (≤ 2 ranks per instance, ≤ 12 blocks, ≤ 48 operations) so one
//! input runs in well under a millisecond.
#![no_main]

#[path = "transceiver_ops/cluster.rs"]
mod cluster;

use arbitrary::Arbitrary;
use cluster::{Cluster, Rank, CTX, GEN};
use kvferry_core::agent::AgentError;
use kvferry_core::config::TransceiverConfig;
use kvferry_core::layout::CacheLayout;
use kvferry_core::PeerId;
use libfuzzer_sys::fuzz_target;
use std::time::Duration;

/// Longest operation sequence run per input.
const MAX_OPS: usize = 48;

#[derive(Arbitrary, Debug)]
struct Setup {
    /// TP sizes fold into 1..=2; MLA replicates one latent head on every rank.
    ctx_tp: u8,
    gen_tp: u8,
    mla: bool,
    /// `kv_transfer_timeout_ms` (folded to 1..=200) or unset.
    timeout_ms: Option<u8>,
    /// Only honoured with a timeout: the config requires one.
    inflight_cancel: bool,
    sender_timeout_ms: Option<u8>,
    staging_slots: u8,
    staging_fallback: bool,
    staging_wait_ms: u8,
    /// Small, to reach the `TooManyInFlight` refusal.
    max_in_flight: u8,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Submit {
        blocks: u8,
        token_match: bool,
        /// Relative deadline in ms (evicts with `inflight_cancel`).
        deadline_ms: Option<u8>,
    },
    Complete {
        gen: bool,
        rank: u8,
        job: u8,
    },
    Fail {
        gen: bool,
        rank: u8,
        job: u8,
        error: u8,
    },
    /// On one rank, or on every rank of the instance.
    Cancel {
        gen: bool,
        rank: Option<u8>,
        request: u8,
    },
    Advance {
        ms: u16,
    },
    Recycle {
        gen: bool,
        rank: u8,
    },
    /// A rank's current agent refuses (or accepts again) new jobs.
    Refuse {
        gen: bool,
        rank: u8,
        on: bool,
    },
    Poll {
        gen: bool,
        rank: u8,
    },
    Pump,
    /// Delivers only the oldest few messages: interleaves control traffic with the rest.
    PumpSome {
        n: u8,
    },
    Step {
        gen: bool,
    },
    /// A rank loses its connection to a rank of the other instance (a reset, or a peer silent
    /// past its heartbeat limit), as its driver would report it; only that rank hears of it.
    /// What still needs that peer fails there; the rest must still end everywhere.
    Lose {
        gen: bool,
        rank: u8,
        peer: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    setup: Setup,
    ops: Vec<Op>,
}

fn layout(tp: u8, mla: bool) -> CacheLayout {
    CacheLayout {
        num_layers: 2,
        num_kv_heads: if mla { 1 } else { 2 },
        head_dim: 2,
        tokens_per_block: 2,
        dtype_bytes: 2,
        tp_size: 1 + u32::from(tp % 2),
        tp_rank: 0,
        pp_size: 1,
        pp_rank: 0,
        mla,
    }
}

fn config(s: &Setup) -> TransceiverConfig {
    let timeout = s.timeout_ms.map(|t| 1 + u64::from(t % 200));
    TransceiverConfig {
        // Slots smaller than a leg of a big request, so some transfers stage in chunks.
        max_tokens_in_buffer: 4,
        kv_transfer_timeout_ms: timeout,
        kv_transfer_sender_future_timeout_ms: s.sender_timeout_ms.map(|t| 1 + u64::from(t)),
        inflight_cancel: s.inflight_cancel && timeout.is_some(),
        staging_slots: 1 + usize::from(s.staging_slots % 3),
        staging_fallback: s.staging_fallback,
        staging_wait_ms: u64::from(s.staging_wait_ms),
        max_in_flight: 1 + usize::from(s.max_in_flight % 8),
        ..TransceiverConfig::default()
    }
}

fn agent_error(code: u8) -> AgentError {
    let peer = PeerId {
        instance: 0,
        rank: 0,
    };
    match code % 6 {
        0 => AgentError::PeerUnreachable(peer),
        1 => AgentError::Backend("fuzz".into()),
        2 => AgentError::StaleBlock("fuzz".into()),
        3 => AgentError::Cancelled,
        4 => AgentError::ShutDown,
        _ => AgentError::Rejected("fuzz".into()),
    }
}

fn instance(gen: bool) -> u32 {
    if gen {
        GEN
    } else {
        CTX
    }
}

fn rank_of(c: &mut Cluster, gen: bool, rank: u8) -> &mut Rank {
    let ranks = c.instance(instance(gen));
    let n = ranks.len();
    &mut ranks[usize::from(rank) % n]
}

fn run(c: &mut Cluster, op: Op) {
    match op {
        Op::Submit {
            blocks,
            token_match,
            deadline_ms,
        } => {
            let deadline = deadline_ms.map(|ms| Duration::from_millis(u64::from(ms)));
            c.submit(1 + usize::from(blocks % 4), token_match, deadline);
        }
        Op::Complete { gen, rank, job } => rank_of(c, gen, rank).complete(job.into(), None),
        Op::Fail {
            gen,
            rank,
            job,
            error,
        } => rank_of(c, gen, rank).complete(job.into(), Some(agent_error(error))),
        Op::Cancel { gen, rank, request } => c.cancel(instance(gen), rank, request.into()),
        Op::Advance { ms } => c.now += Duration::from_millis(u64::from(ms % 512)),
        Op::Recycle { gen, rank } => rank_of(c, gen, rank).recycle(),
        Op::Refuse { gen, rank, on } => {
            let r = rank_of(c, gen, rank);
            r.agents.last().expect("a rank has an agent").set_refuse(on);
        }
        Op::Poll { gen, rank } => {
            let now = c.now;
            rank_of(c, gen, rank).tx.handle_timeout(now);
        }
        Op::Pump => c.pump(None),
        Op::PumpSome { n } => c.pump(Some(usize::from(n % 8))),
        Op::Step { gen } => c.step(instance(gen)),
        Op::Lose { gen, rank, peer } => {
            let (now, other) = (c.now, instance(!gen));
            let ranks = c.instance(other).len();
            let peer = PeerId {
                instance: other,
                rank: u32::from(peer) % ranks as u32,
            };
            rank_of(c, gen, rank).tx.handle_peer_lost(now, peer);
        }
    }
}

fuzz_target!(|input: Input| {
    let s = &input.setup;
    let mut c = Cluster::new(layout(s.ctx_tp, s.mla), layout(s.gen_tp, s.mla), config(s));
    for op in input.ops.into_iter().take(MAX_OPS) {
        run(&mut c, op);
        c.flush();
        c.check();
    }
    // Agents left refusing stay so: a leg that gets a slot during the drain fails, a
    // terminal path like any other.
    c.drain();
});
