//! Admission on both sides: the in-flight bound, terminal requests, and what a context rank
//! does with a `RequestInfo` it must not serve, or from which it has no bytes to send.

mod common;

use common::*;
use kvferry_core::agent::AgentError;
use kvferry_core::config::TransceiverConfig;
use kvferry_core::layout::CacheLayout;
use kvferry_core::loopback::LoopbackNet;
use kvferry_core::request::{ContextSource, Request, RequestState};
use kvferry_core::transceiver::{TransceiverError, TxEvent};
use kvferry_core::wire::ErrorCode;
use kvferry_core::{PeerId, RequestId, TransferToken};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn admission_refuses_past_max_in_flight_and_terminal_requests() {
    let config = TransceiverConfig {
        max_in_flight: 1,
        ..TransceiverConfig::default()
    };
    let mut c = Cluster::new(1, 1, config);
    let r = &mut c.ctx[0];
    let blocks = r.pool.lock().unwrap().allocate(RequestId(1), 1).unwrap();
    let first = Arc::new(Request::new_context(RequestId(1), TransferToken(1), blocks));
    r.tx.respond_and_send(Duration::ZERO, first).unwrap();
    let second = Arc::new(Request::new_context(RequestId(2), TransferToken(2), vec![]));
    assert_eq!(
        r.tx.respond_and_send(Duration::ZERO, second),
        Err(TransceiverError::TooManyInFlight {
            request: RequestId(2),
            in_flight: 1,
            limit: 1
        })
    );
    let done = Request::new_context(RequestId(3), TransferToken(3), vec![]);
    done.advance(RequestState::ContextTransferring).unwrap();
    done.advance(RequestState::Cancelled).unwrap();
    let mut c = Cluster::new(1, 1, TransceiverConfig::default());
    assert_eq!(
        c.ctx[0].tx.respond_and_send(Duration::ZERO, Arc::new(done)),
        Err(TransceiverError::Terminal(RequestId(3)))
    );
}

/// A context request that failed here (not cancelled: a failed send) refuses a generation
/// rank that asks afterwards, before the failure is agreed: no job, an error saying so.
#[test]
fn a_request_failed_here_refuses_a_later_generation_rank() {
    let mut c = Cluster::new(1, 2, TransceiverConfig::default());
    let rid = RequestId(1);
    let blocks = c.ctx[0].pool.lock().unwrap().allocate(rid, 1).unwrap();
    let ids: Vec<u32> = blocks.iter().map(|b| b.id).collect();
    let req = Arc::new(Request::new_context(rid, TransferToken(5), blocks));
    c.ctx[0].tx.respond_and_send(c.now, req).unwrap();
    let ask = |c: &mut Cluster, rank: usize| {
        let blocks = c.gen[rank].pool.lock().unwrap().allocate(rid, 1).unwrap();
        let source = ContextSource {
            instance: CTX,
            layout: c.ctx[0].tx.layout().with_rank(0),
            blocks: ids.clone(),
        };
        let req = Request::new_generation(rid, TransferToken(5), blocks, source);
        c.gen[rank]
            .tx
            .request_and_receive(c.now, Arc::new(req))
            .unwrap();
        while let Some(env) = c.pop() {
            if env.to.instance == CTX {
                c.ctx[0].tx.handle_message(c.now, env.from, env.msg);
            }
        }
    };
    ask(&mut c, 0);
    let job = c.ctx[0].agent.pending()[0].clone();
    c.ctx[0]
        .agent
        .complete(job.id, Err(AgentError::Backend("boom".into())));
    c.ctx[0].tx.handle_timeout(c.now);
    c.ctx[0].tx.drain_events().for_each(drop);
    ask(&mut c, 1);
    let late = PeerId {
        instance: GEN,
        rank: 1,
    };
    assert_eq!(c.ctx[0].agent.sends_to(late), 0, "nothing served");
    assert!(c.ctx[0].tx.drain_events().any(|e| matches!(
        e,
        TxEvent::Rejected { peer, code: ErrorCode::Cancelled, .. } if peer == late
    )));
}

fn mla(tp: u32) -> CacheLayout {
    CacheLayout {
        num_kv_heads: 1,
        mla: true,
        ..layout(tp)
    }
}

/// With MLA exactly one context rank serves a generation rank; the other has no bytes for it:
/// its leg is done at once, with no job. Neither context rank sends the generation rank a
/// frame (wire version 3 has no `Ready`): the serving rank's bytes go through its agent.
#[test]
fn a_context_rank_with_no_bytes_for_a_generation_rank_sends_nothing() {
    let config = TransceiverConfig::default();
    let mk = |i: u32, tp: u32, r: u32| {
        rank_with(i, mla(tp).with_rank(r), &config, Default::default(), BLOCKS)
    };
    let mut c = Cluster {
        net: LoopbackNet::new(),
        ctx: vec![mk(CTX, 2, 0), mk(CTX, 2, 1)],
        gen: vec![mk(GEN, 1, 0)],
        now: Duration::ZERO,
    };
    c.submit(1, 1, 5, 5);
    c.flush();
    let mut from_ctx = Vec::new();
    while let Some(env) = c.net.pop() {
        if env.from.instance == CTX {
            from_ctx.push(env.msg.clone());
        }
        let now = c.now;
        let to = c.instance(env.to.instance);
        to[env.to.rank as usize]
            .tx
            .handle_message(now, env.from, env.msg);
        c.flush();
    }
    let sends: Vec<usize> = c.ctx.iter().map(|r| r.agent.pending_count()).collect();
    assert_eq!(sends.iter().sum::<usize>(), 1, "one rank serves: {sends:?}");
    assert!(
        from_ctx.is_empty(),
        "no frame from a context rank: {from_ctx:?}"
    );
    let fin = c.run_until_quiet();
    assert_eq!(
        fin.len(),
        3,
        "both context ranks and the generation rank end"
    );
    c.assert_pools_full();
}
