//! Transceiver behaviour against the loopback agent and transport: the lifecycle promises of
//! DESIGN.md exercised one at a time, deterministically.

mod common;

use common::*;
use kvferry_core::agent::{AgentError, TransferAgent};
use kvferry_core::config::TransceiverConfig;
use kvferry_core::loopback::ManualAgent;
use kvferry_core::request::{ContextSource, Request, RequestState};
use kvferry_core::transceiver::TxEvent;
use kvferry_core::wire::{ErrorCode, Message};
use kvferry_core::{PeerId, RequestId, TransferToken};
use std::sync::Arc;
use std::time::Duration;
#[test]
fn hetero_tp_transfer_completes_on_every_rank_and_returns_resources() {
    let mut c = Cluster::new(2, 1, TransceiverConfig::default());
    c.submit(1, 3, 42, 42);
    let fin = c.run_until_quiet();
    let mut s = states(&fin);
    s.sort_by_key(|s| format!("{s:?}"));
    assert_eq!(
        s,
        vec![
            RequestState::ContextComplete,
            RequestState::ContextComplete,
            RequestState::GenComplete
        ]
    );
    c.assert_pools_full();
}

#[test]
fn wrong_token_is_rejected_before_any_send() {
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    c.submit(7, 2, 42, 666);
    c.pump();
    assert_eq!(c.ctx[0].agent.pending_count(), 0, "nothing served");
    let events: Vec<_> = c.ctx[0].tx.drain_events().collect();
    assert!(events.iter().any(|e| matches!(
        e,
        TxEvent::Rejected {
            code: ErrorCode::BadToken,
            ..
        }
    )));
    // The gen side hears the error and fails; the receive it posted is cancelled.
    c.pump();
    let pending = c.gen[0].agent.pending();
    assert_eq!(pending.len(), 1);
    assert!(c.gen[0].agent.cancel_requested(pending[0].id));
}

#[test]
fn foreign_blocks_are_rejected() {
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    let rid = c.submit(3, 2, 5, 5);
    // A second, forged info naming blocks that are not the request's.
    let mut forged = None;
    while let Some(env) = c.pop() {
        if let Message::RequestInfo(mut info) = env.msg.clone() {
            info.ctx_blocks = vec![9, 10];
            forged = Some(info);
        }
        let now = c.now;
        c.ctx[0].tx.handle_message(now, env.from, env.msg);
    }
    let attacker = PeerId {
        instance: 9,
        rank: 0,
    };
    let mut info = forged.unwrap();
    info.gen_layout.tp_rank = 0;
    let now = c.now;
    c.ctx[0]
        .tx
        .handle_message(now, attacker, Message::RequestInfo(info));
    assert_eq!(c.ctx[0].agent.sends_to(attacker), 0);
    let reply = c.pop().unwrap();
    assert_eq!(reply.to, attacker);
    assert!(matches!(
        reply.msg,
        Message::Error {
            request,
            code: ErrorCode::ForeignBlocks,
            ..
        } if request == rid
    ));
}

/// A RequestInfo with the right token that the context side must refuse (here for its
/// blocks) means that generation rank never gets its bytes: the context request fails too,
/// instead of waiting forever for a leg that never comes (found by `transceiver_ops`, where
/// one of two context ranks refused and was never told anything more). A peer without the
/// token cannot end the request.
#[test]
fn refused_request_info_with_the_token_fails_the_request_on_both_sides() {
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    let rid = RequestId(4);
    let now = c.now;
    let blocks = c.ctx[0].pool.lock().unwrap().allocate(rid, 2).unwrap();
    let ctx_ids: Vec<u32> = blocks.iter().map(|b| b.id).collect();
    let req = Arc::new(Request::new_context(rid, TransferToken(5), blocks));
    c.ctx[0].tx.respond_and_send(now, req).unwrap();

    let stranger = PeerId {
        instance: 9,
        rank: 0,
    };
    c.ctx[0].tx.handle_message(
        now,
        stranger,
        Message::Cancel {
            request: rid,
            token: TransferToken(6),
        },
    );
    assert!(
        c.step(CTX).is_empty(),
        "a peer without the token ends nothing"
    );

    let gen_blocks = c.gen[0].pool.lock().unwrap().allocate(rid, 2).unwrap();
    let source = ContextSource {
        instance: CTX,
        layout: c.ctx[0].tx.layout().with_rank(0),
        blocks: ctx_ids.iter().map(|b| b + 1).collect(),
    };
    let req = Request::new_generation(rid, TransferToken(5), gen_blocks, source);
    c.gen[0].tx.request_and_receive(now, Arc::new(req)).unwrap();
    let fin = c.run_until_quiet();
    assert_eq!(
        states(&fin),
        vec![RequestState::TransferError, RequestState::TransferError],
        "both sides end"
    );
    c.assert_pools_full();
}

/// Opt-in in-flight cancel with a 100 ms budget: a transfer past it is evicted.
fn evicting_config() -> TransceiverConfig {
    TransceiverConfig {
        inflight_cancel: true,
        ..timeout_config(100)
    }
}

fn timeout_config(ms: u64) -> TransceiverConfig {
    TransceiverConfig {
        kv_transfer_timeout_ms: Some(ms),
        ..TransceiverConfig::default()
    }
}

fn warns(r: &mut Rank) -> usize {
    r.tx.drain_events()
        .filter(|e| matches!(e, TxEvent::TimeoutWarn { .. }))
        .count()
}

#[test]
fn timeout_warns_once_per_enqueue_and_never_for_ready_transfers() {
    let mut c = Cluster::new(1, 1, timeout_config(100));
    c.submit(1, 2, 1, 1);
    c.pump();
    for ms in [50, 150, 200, 5000] {
        c.now = Duration::from_millis(ms);
        c.gen[0].tx.handle_timeout(c.now);
    }
    assert_eq!(warns(&mut c.gen[0]), 1, "one WARN per request per enqueue");

    // A transfer whose completion is queued before the deadline poll is ready: no WARN.
    let mut c = Cluster::new(1, 1, timeout_config(100));
    c.submit(2, 2, 1, 1);
    c.pump();
    c.gen[0].agent.complete_all();
    c.now = Duration::from_millis(500);
    c.gen[0].tx.handle_timeout(c.now);
    assert_eq!(warns(&mut c.gen[0]), 0);

    // Unconfigured: never.
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    c.submit(3, 2, 1, 1);
    c.pump();
    c.now = Duration::from_secs(3600);
    c.gen[0].tx.handle_timeout(c.now);
    assert_eq!(warns(&mut c.gen[0]), 0);
}

#[test]
fn inflight_cancel_evicts_poisons_and_fences() {
    let mut c = Cluster::new(1, 1, evicting_config());
    c.submit(1, 2, 1, 1);
    c.pump();
    let job = c.gen[0].agent.pending()[0].clone();
    c.now = Duration::from_millis(150);
    let fin = c.step(GEN);
    assert_eq!(states(&fin), vec![RequestState::TransferError]);
    let s = c.gen[0].tx.staging_counters();
    assert_eq!((s.in_use, s.poisoned), (0, 1), "slot poisoned, not reused");
    // Blocks were freed by the executor but stay pinned for the late writer.
    {
        let pool = c.gen[0].pool.lock().unwrap();
        assert_eq!(pool.deferred_count(), 2);
        pool.check_write(&job.local_blocks[0]).unwrap();
    }
    // The fence: the agent's completion arrives late.
    c.gen[0].agent.complete(job.id, Err(AgentError::Cancelled));
    c.gen[0].tx.handle_timeout(c.now);
    let s = c.gen[0].tx.staging_counters();
    assert_eq!((s.in_use, s.poisoned, s.free), (0, 0, s.slots));
    assert_eq!(c.gen[0].pool.lock().unwrap().free_count(), BLOCKS as usize);
}

#[test]
fn eviction_keeps_a_recycled_agent_alive_until_the_fence() {
    let mut c = Cluster::new(1, 1, evicting_config());
    c.submit(1, 2, 1, 1);
    c.pump();
    let old = c.gen[0].agent.clone();
    let job = old.pending()[0].clone();
    c.now = Duration::from_millis(150);
    assert_eq!(states(&c.step(GEN)), vec![RequestState::TransferError]);
    // Executor recycle: new jobs go elsewhere; the evicted job's writer still runs on `old`.
    let fresh: Arc<dyn TransferAgent> = ManualAgent::new();
    c.gen[0].tx.replace_agent(fresh);
    // The test holds two handles (`old` and the rank's); the third is the abandoned job's.
    assert_eq!(
        Arc::strong_count(&old),
        3,
        "the abandoned job still holds its agent (I3)"
    );
    old.complete(job.id, Err(AgentError::Cancelled));
    c.gen[0].tx.handle_timeout(c.now);
    assert_eq!(
        Arc::strong_count(&old),
        2,
        "the fence lets the old agent go"
    );
}

#[test]
fn failure_mid_transfer_fails_every_rank_and_releases_everything() {
    let mut c = Cluster::new(2, 1, TransceiverConfig::default());
    c.submit(1, 3, 9, 9);
    c.pump();
    let job = c.ctx[1].agent.pending()[0].clone();
    c.ctx[1]
        .agent
        .complete(job.id, Err(AgentError::Backend("NIC reset".into())));
    // The failing rank tells the generation side before its receive could complete (a real
    // receive cannot finish without the sender's bytes; the manual agent would let it).
    let mut fin = c.step(CTX);
    c.pump();
    fin.extend(c.run_until_quiet());
    assert_eq!(fin.len(), 3);
    assert!(
        fin.iter().all(|f| f.state == RequestState::TransferError),
        "{:?}",
        states(&fin)
    );
    c.assert_pools_full();
}

#[test]
fn request_info_after_the_context_side_ended_fails_the_generation_side() {
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    // The generation side's RequestInfo is still in the network when the context side ends.
    let rid = c.submit(1, 2, 5, 5);
    assert!(c.ctx[0].tx.cancel(c.now, rid));
    assert_eq!(states(&c.step(CTX)), vec![RequestState::Cancelled]);
    let job = c.gen[0].agent.pending()[0].clone();
    c.pump();
    assert!(
        c.gen[0].agent.cancel_requested(job.id),
        "the late RequestInfo was answered with an error and the receive stopped"
    );
    c.gen[0].agent.complete(job.id, Err(AgentError::Cancelled));
    assert_eq!(states(&c.step(GEN)), vec![RequestState::TransferError]);
    c.assert_pools_full();
}

#[test]
fn late_request_info_with_a_wrong_token_learns_nothing_more() {
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    let rid = c.submit(1, 1, 5, 6);
    assert!(c.ctx[0].tx.cancel(c.now, rid));
    c.step(CTX);
    c.pump();
    assert!(c.ctx[0].tx.drain_events().any(|e| matches!(
        e,
        TxEvent::Rejected {
            code: ErrorCode::BadToken,
            ..
        }
    )));
}

/// Registers request `id` on the generation side only: its RequestInfo reaches a context rank
/// where the request is not (yet) registered.
fn ask_unregistered(c: &mut Cluster, id: u64, n: usize) -> RequestId {
    let rid = RequestId(id);
    let blocks = c.gen[0].pool.lock().unwrap().allocate(rid, n).unwrap();
    let source = ContextSource {
        instance: CTX,
        layout: c.ctx[0].tx.layout().with_rank(0),
        blocks: (0..n as u32).collect(),
    };
    let req = Arc::new(Request::new_generation(
        rid,
        TransferToken(5),
        blocks,
        source,
    ));
    c.gen[0].tx.request_and_receive(c.now, req).unwrap();
    c.pump();
    rid
}

fn early_ttl_config(ms: u64) -> TransceiverConfig {
    TransceiverConfig {
        early_info_ttl_ms: ms,
        ..TransceiverConfig::default()
    }
}

#[test]
fn request_info_for_a_request_never_registered_is_refused_after_the_ttl() {
    let mut c = Cluster::new(1, 1, early_ttl_config(200));
    ask_unregistered(&mut c, 1, 2);
    let job = c.gen[0].agent.pending()[0].clone();
    c.now = Duration::from_millis(199);
    c.ctx[0].tx.handle_timeout(c.now);
    c.pump();
    assert!(
        !c.gen[0].agent.cancel_requested(job.id),
        "held within the ttl"
    );
    c.now = Duration::from_millis(200);
    c.ctx[0].tx.handle_timeout(c.now);
    assert!(c.ctx[0].tx.drain_events().any(|e| matches!(
        e,
        TxEvent::Rejected {
            code: ErrorCode::UnknownRequest,
            ..
        }
    )));
    c.pump();
    assert!(
        c.gen[0].agent.cancel_requested(job.id),
        "the asking rank is told, and stops its receive"
    );
    c.gen[0].agent.complete(job.id, Err(AgentError::Cancelled));
    assert_eq!(states(&c.step(GEN)), vec![RequestState::TransferError]);
    c.assert_pools_full();
}

#[test]
fn request_info_held_early_is_served_when_the_request_registers_within_the_ttl() {
    let mut c = Cluster::new(1, 1, early_ttl_config(200));
    let rid = ask_unregistered(&mut c, 1, 2);
    c.now = Duration::from_millis(150);
    c.ctx[0].tx.handle_timeout(c.now);
    let blocks = c.ctx[0].pool.lock().unwrap().allocate(rid, 2).unwrap();
    let req = Arc::new(Request::new_context(rid, TransferToken(5), blocks));
    c.ctx[0].tx.respond_and_send(c.now, req).unwrap();
    c.now = Duration::from_millis(1000);
    c.ctx[0].tx.handle_timeout(c.now);
    let fin = c.run_until_quiet();
    assert_eq!(
        states(&fin),
        vec![RequestState::ContextComplete, RequestState::GenComplete]
    );
    c.assert_pools_full();
}

#[test]
fn request_ends_only_when_every_rank_has_finished() {
    let mut c = Cluster::new(2, 1, TransceiverConfig::default());
    c.submit(1, 1, 3, 3);
    c.pump();
    c.ctx[0].agent.complete_all();
    assert!(c.step(CTX).is_empty(), "rank 1 still sending");
    c.ctx[1].agent.complete_all();
    assert_eq!(c.step(CTX).len(), 2);
}

#[test]
fn cancel_before_transfer_ends_at_once() {
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    let rid = c.submit(1, 1, 3, 3);
    assert!(c.ctx[0].tx.cancel(c.now, rid));
    let fin = c.step(CTX);
    assert_eq!(states(&fin), vec![RequestState::Cancelled]);
    assert!(!c.ctx[0].tx.cancel(c.now, rid), "unknown once finished");
}

#[test]
fn staging_exhaustion_waits_then_fails_within_the_bound() {
    let config = TransceiverConfig {
        staging_slots: 1,
        staging_wait_ms: 100,
        ..TransceiverConfig::default()
    };
    let mut c = Cluster::new(1, 1, config);
    c.submit(1, 1, 3, 3);
    c.submit(2, 1, 4, 4);
    c.pump();
    assert_eq!(
        c.gen[0].agent.pending_count(),
        1,
        "second waits for the slot"
    );
    c.now = Duration::from_millis(200);
    let fin = c.step(GEN);
    assert_eq!(states(&fin), vec![RequestState::TransferError]);
    assert_eq!(fin[0].request.id, RequestId(2));
}

#[test]
fn receive_is_idempotent_under_retry() {
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    c.submit(1, 1, 3, 3);
    let pending = c.gen[0].agent.pending_count();
    let blocks = c.gen[0]
        .pool
        .lock()
        .unwrap()
        .allocate(RequestId(1), 1)
        .unwrap();
    let retry = Arc::new(Request::new_generation(
        RequestId(1),
        TransferToken(3),
        blocks,
        ContextSource {
            instance: CTX,
            layout: layout(1),
            blocks: vec![0],
        },
    ));
    let now = c.now;
    c.gen[0].tx.request_and_receive(now, retry).unwrap();
    assert_eq!(c.gen[0].agent.pending_count(), pending);
}

/// The lifetime counters say what happened: jobs started and completed on each side with
/// their bytes, a failure, a refusal, an eviction, a WARN.
#[test]
fn counters_count_what_happened() {
    let mut c = Cluster::new(2, 1, timeout_config(100));
    c.submit(1, 3, 9, 9);
    assert_eq!(c.gen[0].tx.active(), 1);
    c.pump();
    let sent: Vec<u64> = c.ctx.iter().map(|r| r.agent.pending()[0].bytes).collect();
    let received: u64 = c.gen[0].agent.pending().iter().map(|j| j.bytes).sum();
    assert_eq!(sent.iter().sum::<u64>(), received);
    c.now = Duration::from_millis(150);
    c.gen[0].tx.handle_timeout(c.now); // pending past 100 ms: one WARN
    let fin = c.run_until_quiet();
    assert_eq!(fin.len(), 3);
    for (r, bytes) in c.ctx.iter().zip(&sent) {
        let k = r.tx.counters();
        assert_eq!(r.tx.active(), 0);
        assert_eq!(
            (k.transfers_started, k.transfers_completed, k.bytes),
            (1, 1, *bytes)
        );
        assert_eq!((k.transfers_failed, k.rejected, k.evictions), (0, 0, 0));
    }
    let k = c.gen[0].tx.counters();
    assert_eq!(
        (k.transfers_started, k.transfers_completed, k.bytes),
        (2, 2, received)
    );
    assert_eq!(k.timeouts_warned, 1, "pending past 100 ms");

    // A failed job, a refused RequestInfo, an eviction.
    let mut c = Cluster::new(1, 1, evicting_config());
    c.submit(1, 1, 5, 5);
    c.submit(2, 1, 6, 7);
    c.pump();
    let job = c.ctx[0].agent.pending()[0].clone();
    c.ctx[0]
        .agent
        .complete(job.id, Err(AgentError::Backend("boom".into())));
    c.step(CTX);
    let k = c.ctx[0].tx.counters();
    assert_eq!((k.transfers_failed, k.transfers_completed), (1, 0));
    assert_eq!(k.rejected, 1, "the wrong token");
    c.now = Duration::from_millis(150);
    c.step(GEN);
    assert_eq!(
        c.gen[0].tx.counters().evictions,
        2,
        "both receives, past 100 ms"
    );
}

/// `satisfied` says whether `at_least` requests finished here; the contribution is sent
/// either way.
#[test]
fn a_status_check_is_satisfied_once_enough_finished() {
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    let rid = c.submit(1, 1, 3, 3);
    let now = c.now;
    assert!(c.ctx[0].tx.check_context_status(now, 0).satisfied);
    assert!(!c.ctx[0].tx.check_context_status(now, 1).satisfied);
    c.ctx[0].tx.cancel(now, rid);
    let check = c.ctx[0].tx.check_context_status(now, 1);
    assert!(check.satisfied);
    assert_eq!(check.contribution.failed, vec![rid]);
    assert!(!c.ctx[0].tx.check_context_status(now, 2).satisfied);
    // The generation side's check reports nothing of the context side's.
    let gen = c.ctx[0].tx.check_gen_status(now, 0).contribution;
    assert!(gen.failed.is_empty() && gen.done.is_empty());
}

/// A driver that never drains: events and transmits stop at their bounds, the rest counted.
#[test]
fn events_and_the_outbox_are_bounded_and_count_what_they_drop() {
    use kvferry_core::transceiver::{MAX_EVENTS, MAX_OUTBOX};
    use kvferry_core::wire::RequestInfo;
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    let rid = RequestId(1);
    let blocks = c.ctx[0].pool.lock().unwrap().allocate(rid, 1).unwrap();
    let ids: Vec<u32> = blocks.iter().map(|b| b.id).collect();
    let req = Arc::new(Request::new_context(rid, TransferToken(5), blocks));
    c.ctx[0].tx.respond_and_send(c.now, req).unwrap();
    let info = RequestInfo {
        request: rid,
        token: TransferToken(6),
        gen_layout: layout(1),
        ctx_blocks: ids,
        gen_blocks: vec![kvferry_core::blocks::BlockRef { id: 0, epoch: 1 }],
    };
    let extra = 10;
    let stranger = PeerId {
        instance: 9,
        rank: 0,
    };
    for _ in 0..MAX_EVENTS.max(MAX_OUTBOX) + extra {
        let msg = Message::RequestInfo(info.clone());
        c.ctx[0].tx.handle_message(c.now, stranger, msg);
    }
    let k = c.ctx[0].tx.counters();
    assert_eq!(
        k.events_dropped,
        (MAX_OUTBOX.max(MAX_EVENTS) + extra - MAX_EVENTS) as u64
    );
    assert_eq!(
        k.transmits_dropped,
        (MAX_OUTBOX.max(MAX_EVENTS) + extra - MAX_OUTBOX) as u64
    );
    assert_eq!(c.ctx[0].tx.drain_events().count(), MAX_EVENTS);
    let mut sent = 0;
    while c.ctx[0].tx.poll_transmit().is_some() {
        sent += 1;
    }
    assert_eq!(sent, MAX_OUTBOX);
}
