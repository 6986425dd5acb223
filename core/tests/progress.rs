//! Progress and authority: a request completes unless something with the right to end it
//! did, and no peer without the token can end, stall or starve another's. Each test here
//! fails on the code before the fix it names.

mod common;

use common::*;
use kvferry_core::config::TransceiverConfig;
use kvferry_core::request::{ContextSource, Request, RequestState};
use kvferry_core::transceiver::{FailCause, TxEvent, MAX_EARLY_INFO_BYTES_PER_PEER};
use kvferry_core::wire::{ErrorCode, Message, RequestInfo};
use kvferry_core::{PeerId, RequestId, TransferToken};
use std::sync::Arc;
use std::time::Duration;

fn stranger() -> PeerId {
    PeerId {
        instance: 9,
        rank: 0,
    }
}

fn gen_peer(rank: u32) -> PeerId {
    PeerId {
        instance: GEN,
        rank,
    }
}

/// The RequestInfos the context ranks received (pumped), per request id.
fn infos_for(c: &mut Cluster, rid: RequestId) -> usize {
    let mut n = 0;
    while let Some(env) = c.pop() {
        if matches!(&env.msg, Message::RequestInfo(i) if i.request == rid) {
            n += 1;
        }
    }
    n
}

fn register_gen(c: &mut Cluster, rank: usize, rid: RequestId, ctx_ids: &[u32], token: u128) {
    let blocks = c.gen[rank]
        .pool
        .lock()
        .unwrap()
        .allocate(rid, ctx_ids.len())
        .unwrap();
    let source = ContextSource {
        instance: CTX,
        layout: c.ctx[0].tx.layout().with_rank(0),
        blocks: ctx_ids.to_vec(),
    };
    let req = Request::new_generation(rid, TransferToken(token), blocks, source);
    c.gen[rank]
        .tx
        .request_and_receive(c.now, Arc::new(req))
        .unwrap();
}

/// Fix: a generation rank sent its RequestInfo while its receive still waited for a staging
/// slot, so the context rank's send started first and was refused ("no receive posted").
#[test]
fn a_generation_rank_asks_only_once_its_receive_is_posted() {
    let config = TransceiverConfig {
        staging_slots: 1,
        ..TransceiverConfig::default()
    };
    let mut c = Cluster::new(1, 1, config);
    let (r1, ids1) = c.register_ctx(1, 1, 3);
    let (r2, ids2) = c.register_ctx(2, 1, 4);
    register_gen(&mut c, 0, r1, &ids1, 3);
    register_gen(&mut c, 0, r2, &ids2, 4);
    assert_eq!(c.gen[0].agent.pending_count(), 1, "one slot: one receive");
    assert_eq!(
        infos_for(&mut c, r2),
        0,
        "not asked before its receive is posted"
    );
    c.gen[0].agent.complete_all();
    c.step(GEN);
    assert_eq!(c.gen[0].agent.pending_count(), 1, "second receive posted");
    assert_eq!(infos_for(&mut c, r2), 1, "asked once posted");
}

#[cfg(feature = "bug-switches")]
#[test]
fn ask_before_posted_asks_while_the_receive_waits() {
    use kvferry_core::bugs::{Bug, BugSet};
    let config = TransceiverConfig {
        staging_slots: 1,
        ..TransceiverConfig::default()
    };
    let bugs = BugSet::NONE.with(Bug::AskBeforePosted);
    let mut c = Cluster::with_bugs(1, 1, config, bugs);
    let (r1, ids1) = c.register_ctx(1, 1, 3);
    let (r2, ids2) = c.register_ctx(2, 1, 4);
    register_gen(&mut c, 0, r1, &ids1, 3);
    register_gen(&mut c, 0, r2, &ids2, 4);
    assert_eq!(c.gen[0].agent.pending_count(), 1);
    assert_eq!(
        infos_for(&mut c, r2),
        1,
        "the bug asks with no receive posted"
    );
}

/// Fix: a `Cancel` from a generation rank the context rank had not heard from yet was
/// dropped, so the request waited for its sender budget.
#[test]
fn a_cancel_with_the_token_ends_a_request_never_asked_for() {
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    let (rid, _) = c.register_ctx(1, 2, 5);
    let cancel = Message::Cancel {
        request: rid,
        token: TransferToken(5),
    };
    c.ctx[0].tx.handle_message(c.now, gen_peer(0), cancel);
    assert_eq!(states(&c.step(CTX)), vec![RequestState::TransferError]);
    c.assert_pools_full();
}

/// Fix: a `Cancel` was accepted from any peer whose rank had a leg of the request.
#[test]
fn aborts_without_authority_end_nothing_live_or_future() {
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    let (live, live_ids) = c.register_ctx(1, 1, 5);
    let future = RequestId(2);
    let now = c.now;
    for id in [live, future] {
        for msg in [
            Message::Cancel {
                request: id,
                token: TransferToken(6),
            },
            Message::Error {
                request: id,
                code: ErrorCode::Cancelled,
                detail: String::new(),
            },
        ] {
            // From a stranger, and from the very rank the generation request will use.
            c.ctx[0].tx.handle_message(now, stranger(), msg.clone());
            c.ctx[0].tx.handle_message(now, gen_peer(0), msg);
        }
    }
    let (_, future_ids) = {
        let blocks = c.ctx[0].pool.lock().unwrap().allocate(future, 1).unwrap();
        let ids: Vec<u32> = blocks.iter().map(|b| b.id).collect();
        let req = Arc::new(Request::new_context(future, TransferToken(7), blocks));
        c.ctx[0].tx.respond_and_send(now, req).unwrap();
        (future, ids)
    };
    register_gen(&mut c, 0, live, &live_ids, 5);
    register_gen(&mut c, 0, future, &future_ids, 7);
    let fin = c.run_until_quiet();
    assert_eq!(fin.len(), 4, "both requests end on both sides");
    assert!(
        fin.iter().all(|f| matches!(
            f.state,
            RequestState::ContextComplete | RequestState::GenComplete
        )),
        "{:?}",
        states(&fin)
    );
    c.assert_pools_full();
}

/// An attacker's abort for an id cannot displace the real generation side's early Cancel.
#[test]
fn a_strangers_early_abort_does_not_displace_the_real_one() {
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    let rid = RequestId(3);
    let now = c.now;
    let forged = Message::Cancel {
        request: rid,
        token: TransferToken(666),
    };
    c.ctx[0].tx.handle_message(now, stranger(), forged);
    let real = Message::Cancel {
        request: rid,
        token: TransferToken(5),
    };
    c.ctx[0].tx.handle_message(now, gen_peer(0), real);
    c.register_ctx(3, 1, 5);
    assert_eq!(states(&c.step(CTX)), vec![RequestState::TransferError]);
}

/// Fix: a context rank whose known legs were done but which still expected another
/// generation rank was not pending: neither the warn nor the sender budget ever fired.
#[test]
fn a_context_rank_expecting_another_generation_rank_is_pending() {
    let config = TransceiverConfig {
        kv_transfer_timeout_ms: Some(100),
        kv_transfer_sender_future_timeout_ms: Some(200),
        ..TransceiverConfig::default()
    };
    let mut c = Cluster::new(1, 2, config);
    let (rid, ids) = c.register_ctx(1, 1, 5);
    register_gen(&mut c, 0, rid, &ids, 5); // generation rank 1 never asks
    for _ in 0..3 {
        c.pump();
        c.ctx[0].agent.complete_all();
        c.step(CTX);
    }
    c.now = Duration::from_millis(150);
    assert!(c.step(CTX).is_empty());
    assert!(
        c.ctx[0]
            .tx
            .drain_events()
            .any(|e| matches!(e, TxEvent::TimeoutWarn { request, .. } if request == rid)),
        "still pending: warned"
    );
    c.now = Duration::from_millis(250);
    assert_eq!(states(&c.step(CTX)), vec![RequestState::TransferError]);
    assert!(c.ctx[0].tx.drain_events().any(|e| matches!(
        e,
        TxEvent::LocallyFinished {
            cause: Some(FailCause::Timeout),
            ..
        }
    )));
}

/// Fix: a receive the agent refused still asked the context rank to send.
#[test]
fn a_receive_the_agent_refused_asks_for_nothing_and_ends_the_context_side() {
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    let (rid, ids) = c.register_ctx(1, 1, 5);
    c.gen[0].agent.set_refuse(true);
    register_gen(&mut c, 0, rid, &ids, 5);
    c.pump();
    assert_eq!(c.ctx[0].agent.sends_to(gen_peer(0)), 0, "nothing sent");
    let fin = c.run_until_quiet();
    assert_eq!(
        states(&fin),
        vec![RequestState::TransferError, RequestState::TransferError]
    );
    c.assert_pools_full();
}

/// Fix: `CacheLayout::rank()` ran on a wire layout before validation (multiply overflow,
/// a panic in debug builds) for a peer that presented the token.
#[test]
fn an_overflowing_wire_layout_is_refused_not_computed() {
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    let (rid, ids) = c.register_ctx(1, 1, 5);
    let mut gen_layout = layout(1);
    gen_layout.tp_size = u32::MAX;
    gen_layout.pp_size = u32::MAX;
    gen_layout.tp_rank = u32::MAX - 1;
    gen_layout.pp_rank = u32::MAX - 1;
    let info = RequestInfo {
        request: rid,
        token: TransferToken(5),
        gen_layout,
        ctx_blocks: ids,
        gen_blocks: vec![kvferry_core::blocks::BlockRef { id: 0, epoch: 1 }],
    };
    c.ctx[0]
        .tx
        .handle_message(c.now, gen_peer(0), Message::RequestInfo(info));
    assert!(c.ctx[0].tx.drain_events().any(|e| matches!(
        e,
        TxEvent::Rejected {
            code: ErrorCode::Layout,
            ..
        }
    )));
}

/// A peer without any token floods early RequestInfos of ~1 MiB: what it parks stays within
/// its share, and it is told `Busy` for the rest.
#[test]
fn an_early_request_info_flood_is_bounded_per_peer() {
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    let big = 80_000; // blocks: about 1.25 MiB parked per info
    let mut busy = 0;
    for i in 0..64u64 {
        let info = RequestInfo {
            request: RequestId(1000 + i % 4),
            token: TransferToken(u128::from(i)),
            gen_layout: layout(1),
            ctx_blocks: vec![0; big],
            gen_blocks: vec![kvferry_core::blocks::BlockRef { id: 0, epoch: 1 }; big],
        };
        c.ctx[0]
            .tx
            .handle_message(c.now, stranger(), Message::RequestInfo(info));
        while let Some(env) = c.pop() {
            busy += usize::from(matches!(
                env.msg,
                Message::Error {
                    code: ErrorCode::Busy,
                    ..
                }
            ));
        }
    }
    let parked = c.ctx[0].tx.early_counts();
    assert!(
        parked.info_bytes <= MAX_EARLY_INFO_BYTES_PER_PEER,
        "{parked:?}"
    );
    assert_eq!(busy + parked.infos, 64);
    assert!(busy > 50, "told Busy past its share: {busy}");
}

/// Fix: with staging fallback and in-flight cancel, evicted jobs awaiting their fence were
/// not counted against the completion queue's capacity; past it, fences panicked with "a job
/// completed twice". Now a leg waits while the rank is at its job bound.
#[test]
fn evicted_jobs_past_the_job_bound_wait_instead_of_overflowing_the_queue() {
    let config = TransceiverConfig {
        inflight_cancel: true,
        kv_transfer_timeout_ms: Some(1_000),
        staging_fallback: true,
        max_in_flight: 1,
        staging_wait_ms: 1,
        ..TransceiverConfig::default()
    };
    let l = layout(1);
    let mut g = rank_with(GEN, l, &config, Default::default(), 8192);
    let requests = 4_200u64; // past 2 * max_in_flight + MAX_SLOT_WAITERS = 4098
    for i in 0..requests {
        let now = Duration::from_millis(10 * i);
        let rid = RequestId(i);
        let blocks = g.pool.lock().unwrap().allocate(rid, 1).unwrap();
        let source = ContextSource {
            instance: CTX,
            layout: l,
            blocks: vec![0],
        };
        let req = Request::new_generation(rid, TransferToken(1), blocks, source)
            .with_deadline(now + Duration::from_millis(1));
        g.tx.request_and_receive(now, Arc::new(req)).unwrap();
        let later = now + Duration::from_millis(5);
        let check = g.tx.check_gen_status(later, 0);
        let agreed = kvferry_core::collective::agree(&[check.contribution], 1).unwrap();
        for f in g.tx.apply_agreed(&agreed) {
            g.pool.lock().unwrap().free(&f.request.blocks);
        }
        while g.tx.poll_transmit().is_some() {}
    }
    assert!(
        g.agent.pending_count() < requests as usize,
        "the bound held"
    );
    // Every fence arrives at once: the queue holds them all.
    g.agent.complete_all();
    g.tx.handle_timeout(Duration::from_secs(3600));
    assert_eq!(g.tx.jobs_in_flight(), 0);
}

/// Once a generation rank has proved the token (its leg exists), an `Error` from it ends the
/// request on the context rank; the same `Error` from a stranger still ends nothing.
#[test]
fn an_error_ends_a_request_only_from_a_peer_it_is_bound_to() {
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    let (rid, ids) = c.register_ctx(1, 1, 5);
    register_gen(&mut c, 0, rid, &ids, 5);
    c.pump();
    assert_eq!(
        c.ctx[0].agent.sends_to(gen_peer(0)),
        1,
        "the leg is in flight"
    );
    let error = Message::Error {
        request: rid,
        code: ErrorCode::Cancelled,
        detail: String::new(),
    };
    c.ctx[0].tx.handle_message(c.now, stranger(), error.clone());
    c.ctx[0].agent.complete_all();
    c.ctx[0].tx.handle_timeout(c.now);
    assert!(
        c.ctx[0]
            .tx
            .drain_events()
            .all(|e| !matches!(e, TxEvent::LocallyFinished { ok: false, .. })),
        "a stranger's Error ended it"
    );
    let (rid2, ids2) = c.register_ctx(2, 1, 6);
    register_gen(&mut c, 0, rid2, &ids2, 6);
    c.pump();
    let error = Message::Error {
        request: rid2,
        code: ErrorCode::Cancelled,
        detail: String::new(),
    };
    c.ctx[0].tx.handle_message(c.now, gen_peer(0), error);
    c.ctx[0].agent.complete_all();
    c.ctx[0].tx.handle_timeout(c.now);
    assert!(c.ctx[0].tx.drain_events().any(|e| matches!(
        e,
        TxEvent::LocallyFinished {
            request,
            ok: false,
            cause: Some(FailCause::PeerAborted)
        } if request == rid2
    )));
}
