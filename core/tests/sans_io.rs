//! The transceiver's driver contract: inputs through `handle_*`, outputs polled. A driver that
//! sleeps until `poll_timeout()` (or input) sees every deadline in time; `handle_peer_lost`
//! fails what depended on a peer at once.

mod common;

use common::*;
use kvferry_core::config::TransceiverConfig;
use kvferry_core::request::{ContextSource, Request, RequestState};
use kvferry_core::transceiver::{Side, TxEvent};
use kvferry_core::wire::Message;
use kvferry_core::{PeerId, RequestId, TransferToken};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn an_idle_rank_needs_no_wakeup_and_a_registered_one_names_its_deadline() {
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    assert_eq!(c.ctx[0].tx.poll_timeout(), None, "nothing waits on time");
    c.now = Duration::from_millis(7);
    c.register_ctx(1, 1, 5);
    assert_eq!(
        c.ctx[0].tx.poll_timeout(),
        Some(Duration::from_millis(7 + 1000)),
        "the first heartbeat tick"
    );
    let slow_ticks = TransceiverConfig {
        heartbeat_interval_ms: 120_000,
        ..TransceiverConfig::default()
    };
    let mut c = Cluster::new(1, 1, slow_ticks);
    c.now = Duration::from_millis(7);
    c.register_ctx(1, 1, 5);
    assert_eq!(
        c.ctx[0].tx.poll_timeout(),
        Some(Duration::from_millis(7 + 60_000)),
        "the default sender budget"
    );
}

/// A driver that wakes only at `poll_timeout()` ends a request nobody asked for exactly at
/// its sender budget: no fixed tick is needed to see it.
#[test]
fn waking_only_at_poll_timeout_meets_every_deadline() {
    let config = TransceiverConfig {
        kv_transfer_timeout_ms: Some(100),
        kv_transfer_sender_future_timeout_ms: Some(250),
        ..TransceiverConfig::default()
    };
    let mut c = Cluster::new(1, 1, config);
    c.register_ctx(1, 1, 5);
    let mut wakeups = Vec::new();
    let mut fin = Vec::new();
    while let Some(at) = c.ctx[0].tx.poll_timeout() {
        assert!(wakeups.len() < 10, "deadlines converge: {wakeups:?}");
        c.now = at;
        wakeups.push(at.as_millis());
        fin.extend(c.step(CTX));
    }
    assert_eq!(wakeups, vec![100, 250], "the WARN, then the sender budget");
    let warns = c.ctx[0]
        .tx
        .drain_events()
        .filter(|e| matches!(e, TxEvent::TimeoutWarn { .. }))
        .count();
    assert_eq!(
        warns, 1,
        "one WARN per enqueue, whatever other deadline fires later"
    );
    assert_eq!(states(&fin), vec![RequestState::TransferError]);
    c.assert_pools_full();
}

#[test]
fn early_input_expiry_and_slot_waits_are_deadlines_too() {
    let config = TransceiverConfig {
        early_info_ttl_ms: 40,
        staging_slots: 1,
        staging_wait_ms: 30,
        ..TransceiverConfig::default()
    };
    let mut c = Cluster::new(1, 1, config);
    let stranger = PeerId {
        instance: 9,
        rank: 0,
    };
    let cancel = Message::Cancel {
        request: RequestId(77),
        token: TransferToken(1),
    };
    c.ctx[0].tx.handle_message(c.now, stranger, cancel);
    assert_eq!(c.ctx[0].tx.poll_timeout(), Some(Duration::from_millis(40)));
    c.now = Duration::from_millis(50);
    c.submit(1, 1, 3, 3);
    c.submit(2, 1, 4, 4); // waits for the generation rank's one slot
    let due = c.gen[0]
        .tx
        .poll_timeout()
        .expect("a slot wait is a deadline");
    assert!(due > Duration::from_millis(80) && due <= Duration::from_millis(81));
}

#[test]
fn a_lost_peer_fails_what_is_bound_to_it_at_once() {
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    c.submit(1, 1, 3, 3);
    c.pump();
    let ctx_peer = PeerId {
        instance: CTX,
        rank: 0,
    };
    let gen_peer = PeerId {
        instance: GEN,
        rank: 0,
    };
    // An unrelated peer's loss ends nothing.
    let other = PeerId {
        instance: 5,
        rank: 0,
    };
    c.gen[0].tx.handle_peer_lost(c.now, other);
    c.ctx[0].tx.handle_peer_lost(c.now, other);
    assert!(c.step(GEN).is_empty() && c.step(CTX).is_empty());
    c.gen[0].tx.handle_peer_lost(c.now, ctx_peer);
    c.ctx[0].tx.handle_peer_lost(c.now, gen_peer);
    for r in c.ctx.iter().chain(&c.gen) {
        r.agent.complete_all(); // the fences
    }
    assert_eq!(states(&c.step(GEN)), vec![RequestState::TransferError]);
    assert_eq!(states(&c.step(CTX)), vec![RequestState::TransferError]);
    c.assert_pools_full();
}

#[test]
fn control_messages_leave_only_through_poll_transmit_in_order() {
    let mut c = Cluster::new(2, 1, TransceiverConfig::default());
    let rid = RequestId(1);
    let blocks = c.gen[0].pool.lock().unwrap().allocate(rid, 1).unwrap();
    let source = ContextSource {
        instance: CTX,
        layout: c.ctx[0].tx.layout().with_rank(0),
        blocks: vec![0],
    };
    let req = Request::new_generation(rid, TransferToken(3), blocks, source);
    c.gen[0]
        .tx
        .request_and_receive(c.now, Arc::new(req))
        .unwrap();
    assert!(c.net.is_empty(), "nothing is sent behind the driver's back");
    let to: Vec<u32> = std::iter::from_fn(|| c.gen[0].tx.poll_transmit())
        .map(|t| {
            assert!(matches!(t.msg, Message::RequestInfo(_)));
            t.to.rank
        })
        .collect();
    assert_eq!(
        to,
        vec![0, 1],
        "one RequestInfo per context rank, in rank order"
    );
    assert!(c.gen[0].tx.poll_transmit().is_none());
}

/// A cancel handled between two steps makes a step due at once: a driver that sleeps until
/// `poll_timeout()` still agrees it (found by the node's killed-gen test, where the ctx
/// cancelled a lost peer's requests after its step and then slept with nothing due).
#[test]
fn a_request_finished_between_steps_makes_a_step_due_now() {
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    c.now = Duration::from_millis(5);
    let rid = c.register_ctx(1, 1, 5).0;
    c.step(CTX);
    assert!(
        c.ctx[0].tx.poll_timeout() > Some(c.now),
        "only the sender budget waits"
    );
    assert!(c.ctx[0].tx.cancel(c.now, rid));
    assert_eq!(
        c.ctx[0].tx.poll_timeout(),
        Some(Duration::ZERO),
        "a step is due now"
    );
    assert_eq!(states(&c.step(CTX)), vec![RequestState::Cancelled]);
    assert_eq!(c.ctx[0].tx.poll_timeout(), None, "nothing left to do");
}

/// Losing a peer the request is not bound to changes nothing: the request completes.
#[test]
fn an_unrelated_peers_loss_ends_nothing() {
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    c.submit(1, 1, 3, 3);
    c.pump();
    let other = PeerId {
        instance: 5,
        rank: 0,
    };
    c.gen[0].tx.handle_peer_lost(c.now, other);
    c.ctx[0].tx.handle_peer_lost(c.now, other);
    let fin = c.run_until_quiet();
    assert_eq!(
        states(&fin),
        vec![RequestState::ContextComplete, RequestState::GenComplete]
    );
}

#[test]
fn jobs_in_flight_counts_each_job_until_its_fence() {
    let mut c = Cluster::new(2, 1, TransceiverConfig::default());
    c.submit(1, 1, 3, 3);
    c.pump();
    assert_eq!(
        c.gen[0].tx.jobs_in_flight(),
        2,
        "one receive per context rank"
    );
    assert_eq!(c.ctx[0].tx.jobs_in_flight(), 1);
    c.gen[0].agent.complete_oldest(1);
    c.gen[0].tx.handle_timeout(c.now);
    assert_eq!(c.gen[0].tx.jobs_in_flight(), 1);
    c.gen[0].agent.complete_all();
    c.gen[0].tx.handle_timeout(c.now);
    assert_eq!(c.gen[0].tx.jobs_in_flight(), 0);
}

/// Neither side sends a frame when its leg completes (wire version 3 has no `Done`): the
/// generation side's receive completing is what ends the transfer, and both still finish.
#[test]
fn finished_legs_send_nothing_and_both_sides_finish() {
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    c.submit(1, 1, 3, 3);
    c.pump();
    for r in c.ctx.iter().chain(&c.gen) {
        r.agent.complete_all();
    }
    c.ctx[0].tx.handle_timeout(c.now);
    c.gen[0].tx.handle_timeout(c.now);
    let from_ctx: Vec<Message> = std::iter::from_fn(|| c.ctx[0].tx.poll_transmit())
        .map(|t| t.msg)
        .collect();
    assert!(from_ctx.is_empty(), "{from_ctx:?}");
    assert!(c.gen[0].tx.poll_transmit().is_none());
    let fin = c.run_until_quiet();
    assert_eq!(
        fin.len(),
        2,
        "the context and the generation rank end: {fin:?}"
    );
}

/// A sender budget that runs out before the WARN's is a failure, not a WARN.
#[test]
fn a_sender_budget_before_the_warn_budget_fails_without_warning() {
    let config = TransceiverConfig {
        kv_transfer_timeout_ms: Some(200),
        kv_transfer_sender_future_timeout_ms: Some(100),
        ..TransceiverConfig::default()
    };
    let mut c = Cluster::new(1, 1, config);
    c.register_ctx(1, 1, 5);
    c.now = Duration::from_millis(100);
    assert_eq!(states(&c.step(CTX)), vec![RequestState::TransferError]);
    assert!(!c.ctx[0]
        .tx
        .drain_events()
        .any(|e| matches!(e, TxEvent::TimeoutWarn { .. })));
}

/// A leg waiting for a staging slot keeps its place while none frees, fails only once
/// strictly more than `staging_wait_ms` has passed, and starts when a slot frees in time.
#[test]
fn a_slot_waiter_keeps_its_place_until_a_slot_frees_or_its_wait_is_over() {
    let config = TransceiverConfig {
        staging_slots: 1,
        staging_wait_ms: 30,
        ..TransceiverConfig::default()
    };
    let mut c = Cluster::new(1, 1, config);
    c.submit(1, 1, 3, 3);
    c.submit(2, 1, 4, 4);
    for ms in [10, 20, 30] {
        c.now = Duration::from_millis(ms);
        c.gen[0].tx.handle_timeout(c.now);
    }
    assert!(
        c.step(GEN).is_empty(),
        "at exactly staging_wait_ms it still waits"
    );
    assert_eq!(c.gen[0].agent.pending_count(), 1);
    let fin = c.run_until_quiet();
    assert_eq!(
        fin.len(),
        4,
        "both requests end on both sides: {:?}",
        states(&fin)
    );
    assert!(fin.iter().all(|f| matches!(
        f.state,
        RequestState::ContextComplete | RequestState::GenComplete
    )));
}

#[test]
fn each_contribution_names_the_next_step() {
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    let a = c.ctx[0]
        .tx
        .check_status(c.now, Side::Context, 0)
        .contribution
        .step;
    let b = c.ctx[0]
        .tx
        .check_status(c.now, Side::Context, 0)
        .contribution
        .step;
    assert_eq!((a, b), (1, 2));
}

/// Cancelling one request that waits for a staging slot takes only its own place in the queue:
/// the next waiter still starts when a slot frees.
#[test]
fn a_cancelled_waiter_leaves_the_others_in_the_queue() {
    let config = TransceiverConfig {
        staging_slots: 1,
        ..TransceiverConfig::default()
    };
    let mut c = Cluster::new(1, 1, config);
    c.submit(1, 1, 3, 3);
    let second = c.submit(2, 1, 4, 4);
    c.submit(3, 1, 5, 5);
    assert!(c.gen[0].tx.cancel(c.now, second));
    let fin = c.run_until_quiet();
    let third: Vec<_> = fin
        .iter()
        .filter(|f| f.request.id == RequestId(3))
        .collect();
    assert_eq!(
        third.len(),
        2,
        "request 3 ends on both sides: {:?}",
        states(&fin)
    );
    assert!(third.iter().all(|f| matches!(
        f.state,
        RequestState::ContextComplete | RequestState::GenComplete
    )));
}

/// The ranks of a context instance that closes after its statuses go in any order: a context
/// rank whose part of a request has landed on this generation rank may go without failing
/// the request, which completes from the rank still sending. A rank it still reads from
/// going fails it.
#[test]
fn a_lost_peer_fails_only_what_still_needs_it() {
    let mut c = Cluster::new(2, 1, TransceiverConfig::default());
    c.submit(1, 1, 3, 3);
    c.submit(2, 1, 4, 4);
    c.pump();
    let ctx = |rank| PeerId {
        instance: CTX,
        rank,
    };
    let from = |j: &kvferry_core::agent::TransferJob| match j.direction {
        kvferry_core::agent::Direction::Receive { from } => from,
        kvferry_core::agent::Direction::Send { .. } => unreachable!("a generation rank receives"),
    };
    let jobs = c.gen[0].agent.pending();
    assert_eq!(jobs.len(), 4, "two legs for each request");
    // Request 1: ctx rank 1's part landed; request 2: nothing landed yet.
    for j in jobs
        .iter()
        .filter(|j| j.request == RequestId(1) && from(j) == ctx(1))
    {
        c.gen[0].agent.complete(j.id, Ok(j.bytes));
    }
    c.gen[0].tx.handle_peer_lost(c.now, ctx(1));
    assert!(c.step(GEN).is_empty(), "nothing ends before its legs do");
    c.gen[0].agent.complete_all();
    for r in &c.ctx {
        r.agent.complete_all();
    }
    let mut ended: Vec<_> = c
        .step(GEN)
        .iter()
        .map(|f| (f.request.id, f.state))
        .collect();
    ended.sort_by_key(|(id, _)| *id);
    assert_eq!(
        ended,
        vec![
            (RequestId(1), RequestState::GenComplete),
            (RequestId(2), RequestState::TransferError)
        ]
    );
}

/// A generation rank asks every context rank, also those holding nothing for it (so each
/// learns how many ranks to expect). If that ask cannot leave, the context instance can never
/// finish the request: the generation side fails it at once, though the lost rank had no leg
/// there, and a context rank that hears nothing more from it ends it at its sender budget.
#[test]
fn an_ask_that_cannot_leave_fails_the_request_everywhere() {
    let config = TransceiverConfig {
        kv_transfer_sender_future_timeout_ms: Some(100),
        ..TransceiverConfig::default()
    };
    let mut c = Cluster::new(2, 2, config);
    c.submit(1, 1, 3, 3);
    let ctx1 = PeerId {
        instance: CTX,
        rank: 1,
    };
    let gen0 = PeerId {
        instance: GEN,
        rank: 0,
    };
    // Gen rank 0 reads only from ctx rank 0 (TP2 -> TP2); nothing it sends reaches ctx rank 1.
    let mut gen_done = Vec::new();
    for _ in 0..10 {
        while let Some(env) = c.pop() {
            if env.from == gen0 && env.to == ctx1 {
                if let Message::RequestInfo(i) = &env.msg {
                    c.gen[0].tx.handle_info_unsent(c.now, i.request);
                }
                continue;
            }
            let now = c.now;
            let r = &mut c.instance(env.to.instance)[env.to.rank as usize];
            r.tx.handle_message(now, env.from, env.msg);
        }
        for r in c.ctx.iter().chain(&c.gen) {
            r.agent.complete_all();
        }
        gen_done.extend(c.step(GEN));
        assert!(
            c.step(CTX).is_empty(),
            "ctx rank 1 waits for gen rank 0's ask"
        );
    }
    let states: Vec<_> = gen_done.iter().map(|f| f.state).collect();
    assert_eq!(
        states,
        vec![RequestState::TransferError; 2],
        "no time has passed"
    );
    c.now += Duration::from_millis(101);
    let ctx_done: Vec<_> = c.step(CTX).iter().map(|f| f.state).collect();
    assert_eq!(
        ctx_done,
        vec![RequestState::TransferError; 2],
        "at its sender budget"
    );
    c.assert_pools_full();
}
