//! Embedded instances in one process over loopback (TP1, and TP2 into TP1), their pools in
//! memory this test owns: a request moves byte for byte into the blocks the generation side
//! named, the statuses say so, and misuse is refused with the reason.

use kvferry_backends::host::kv::HostKv;
use kvferry_backends::layout::{sharded, single_rank};
use kvferry_backends::node::backend_parts::LentKv;
use kvferry_backends::node::embed::command::CommandError;
use kvferry_backends::node::embed::dialers::{MAX_CTX_PEERS, MAX_DIALS};
use kvferry_backends::node::embed::handle::{EmbedSpec, EmbeddedInstance, StartError};
use kvferry_backends::node::embed::ticket::ContextTicket;
use kvferry_backends::node::spec::NodeSpec;
use kvferry_core::layout::CacheLayout;
use kvferry_core::request::RequestState;
use kvferry_core::transceiver::Side;
use kvferry_core::{RequestId, TransferToken};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

const BLOCKS: u32 = 8;

fn spec(side: Side) -> EmbedSpec {
    spec_of(side, single_rank(2, 2, 16, 4, 2))
}

fn spec_of(side: Side, layout: CacheLayout) -> EmbedSpec {
    EmbedSpec {
        side,
        node: NodeSpec {
            layout,
            pool_blocks: BLOCKS,
            config: Default::default(),
            limits: Default::default(),
        },
        listen: "127.0.0.1:0".parse().unwrap(),
    }
}

fn start(side: Side, mem: &mut [u8]) -> EmbeddedInstance {
    start_ranks(spec(side), vec![mem]).expect("instance starts")
}

/// An instance of `spec` over `mems`, one per rank.
fn start_ranks(spec: EmbedSpec, mems: Vec<&mut [u8]>) -> Result<EmbeddedInstance, StartError> {
    let bb = spec.node.layout.block_bytes();
    let kvs = mems
        .into_iter()
        .map(|mem| {
            assert_eq!(mem.len() as u64, bb * u64::from(BLOCKS));
            // SAFETY: each test closes its instances (joining their threads) before `mem` goes.
            let kv = unsafe { HostKv::lent(mem.as_mut_ptr(), BLOCKS, bb) };
            LentKv::Host(Arc::new(kv))
        })
        .collect();
    EmbeddedInstance::start(spec, kvs)
}

#[test]
fn a_request_lands_in_the_named_blocks() {
    let bb = spec(Side::Context).node.layout.block_bytes() as usize;
    let mut ctx_mem: Vec<u8> = (0..bb * BLOCKS as usize).map(|i| (i % 251) as u8).collect();
    let mut gen_mem = vec![0u8; bb * BLOCKS as usize];
    let ctx = start(Side::Context, &mut ctx_mem);
    let gen = start(Side::Generation, &mut gen_mem);

    let ticket = ctx.send(RequestId(7), vec![5, 2]).unwrap();
    gen.receive(RequestId(100), vec![1, 6], ticket.clone())
        .unwrap();
    let g = gen.take(1, Some(Duration::from_secs(20)));
    assert_eq!(g.len(), 1, "{g:?}");
    assert_eq!(
        (g[0].id, g[0].state),
        (RequestId(100), RequestState::GenComplete)
    );
    let c = ctx.take(1, Some(Duration::from_secs(20)));
    assert_eq!(
        (c[0].id, c[0].state),
        (RequestId(7), RequestState::ContextComplete)
    );
    assert!(ctx.close() && gen.close());
    assert_eq!(gen_mem[bb..2 * bb], ctx_mem[5 * bb..6 * bb]);
    assert_eq!(gen_mem[6 * bb..7 * bb], ctx_mem[2 * bb..3 * bb]);
    assert!(gen_mem[..bb].iter().all(|&x| x == 0), "block 0 untouched");
}

fn reason<T: std::fmt::Debug>(r: Result<T, CommandError>) -> &'static str {
    r.unwrap_err().reason()
}

#[test]
fn misuse_is_refused_with_its_reason() {
    let bb = spec(Side::Context).node.layout.block_bytes() as usize;
    let mut ctx_mem = vec![0u8; bb * BLOCKS as usize];
    let mut gen_mem = vec![0u8; bb * BLOCKS as usize];
    let ctx = start(Side::Context, &mut ctx_mem);
    let gen = start(Side::Generation, &mut gen_mem);

    let t = ctx.send(RequestId(1), vec![0]).unwrap();
    assert_eq!(reason(ctx.send(RequestId(1), vec![1])), "id-in-use");
    assert_eq!(reason(ctx.send(RequestId(2), vec![0])), "blocks");
    assert_eq!(reason(ctx.send(RequestId(2), vec![BLOCKS])), "blocks");
    assert_eq!(reason(ctx.send(RequestId(2), vec![])), "no-blocks");
    assert_eq!(reason(gen.send(RequestId(2), vec![1])), "wrong-side");
    assert_eq!(
        reason(ctx.receive(RequestId(2), vec![1], t.clone())),
        "wrong-side"
    );
    assert_eq!(
        reason(gen.receive(RequestId(2), vec![1, 2], t.clone())),
        "block-count"
    );
    let mut other = t.clone();
    other.layout.num_layers = 4;
    assert_eq!(
        reason(gen.receive(RequestId(2), vec![1], other)),
        "other-model"
    );
    // More addresses than the layout has ranks (a ticket built in process, not decoded).
    let mut more = t.clone();
    more.addrs.push(t.addrs[0]);
    assert_eq!(
        reason(gen.receive(RequestId(2), vec![1], more)),
        "other-model"
    );
    // A forged token: the ctx serves nothing and the gen's request fails.
    let mut forged = t.clone();
    forged.token.0 ^= 1;
    gen.receive(RequestId(3), vec![3], forged).unwrap();
    let g = gen.take(1, Some(Duration::from_secs(20)));
    assert_eq!(g[0].state, RequestState::TransferError, "{g:?}");
    assert!(ctx.cancel(RequestId(1)).unwrap());
    let c = ctx.take(1, Some(Duration::from_secs(20)));
    assert_eq!(c[0].state, RequestState::Cancelled);
    // Ended and reported: the id and the block are free again.
    ctx.send(RequestId(1), vec![0]).unwrap();
    assert!(ctx.close());
    assert_eq!(reason(ctx.send(RequestId(9), vec![4])), "closed");
    assert!(gen.close());
}

/// A TP2 context instance (a pool per rank, one kv head each) into a TP1 generation instance:
/// every (layer, K/V, head, token) of the gen's blocks is the bytes of the ctx rank that holds
/// that head.
#[test]
fn a_tp2_context_instance_serves_a_tp1_generation_instance() {
    let tp2 = sharded(2, 2, 16, 4, 2, 2);
    let tp1 = single_rank(2, 2, 16, 4, 2);
    let (cbb, gbb) = (tp2.block_bytes() as usize, tp1.block_bytes() as usize);
    let mut ctx_mem: Vec<Vec<u8>> = (0..2)
        .map(|r| {
            (0..cbb * BLOCKS as usize)
                .map(|i| ((i * 7 + r * 101) % 251) as u8)
                .collect()
        })
        .collect();
    let mut gen_mem = vec![0u8; gbb * BLOCKS as usize];
    let mems = ctx_mem.iter_mut().map(|m| &mut m[..]).collect();
    let ctx = start_ranks(spec_of(Side::Context, tp2), mems).unwrap();
    let gen = start(Side::Generation, &mut gen_mem);

    let ticket = ctx.send(RequestId(7), vec![5, 2]).unwrap();
    assert_eq!(ticket.addrs, ctx.listening());
    assert_eq!(ticket.addrs.len(), 2);
    gen.receive(RequestId(100), vec![1, 6], ticket).unwrap();
    let g = gen.take(1, Some(Duration::from_secs(20)));
    assert_eq!(g.len(), 1, "{g:?}");
    assert_eq!(g[0].state, RequestState::GenComplete, "{g:?}");
    let c = ctx.take(1, Some(Duration::from_secs(20)));
    assert_eq!(c[0].state, RequestState::ContextComplete, "{c:?}");
    assert!(ctx.close() && gen.close());
    let run = tp1.token_bytes() as usize;
    for (cb, gb) in [(5, 1), (2, 6)] {
        for (layer, kv, head, token) in (0..2).flat_map(|l| {
            (0..2).flat_map(move |k| (0..2).flat_map(move |h| (0..4).map(move |t| (l, k, h, t))))
        }) {
            let rank = tp2.with_rank(head);
            let src = cb * cbb + rank.offset_in_block(layer, kv, head, token) as usize;
            let dst = gb * gbb + tp1.offset_in_block(layer, kv, head, token) as usize;
            assert_eq!(
                gen_mem[dst..dst + run],
                ctx_mem[head as usize][src..src + run],
                "block {cb}, layer {layer}, kv {kv}, head {head}, token {token}"
            );
        }
    }
}

#[test]
fn an_instance_needs_one_pool_per_rank() {
    let mut mem = vec![0u8; sharded(2, 2, 16, 4, 2, 2).block_bytes() as usize * BLOCKS as usize];
    let spec = spec_of(Side::Context, sharded(2, 2, 16, 4, 2, 2));
    let got = start_ranks(spec, vec![&mut mem[..]]);
    assert!(
        matches!(got, Err(StartError::Ranks { pools: 1, world: 2 })),
        "{got:?}"
    );
}

/// A ticket for a context instance of `layout` whose ranks are at loopback addresses of their
/// own (`n` tells instances apart); port 0, so every dial is refused at once.
fn ticket_at(n: usize, layout: CacheLayout, blocks: Vec<u32>) -> ContextTicket {
    let addrs = (0..layout.world_size() as usize)
        .map(|r| {
            let ip = Ipv4Addr::new(127, 1 + (n >> 8) as u8, n as u8, 1 + r as u8);
            SocketAddr::from((ip, 0))
        })
        .collect();
    ContextTicket {
        addrs,
        request: RequestId(1),
        token: TransferToken(1),
        layout,
        blocks,
    }
}

/// A receive refused for what it is (here: no blocks) dials nothing, so no number of them
/// uses up the context instances this one may read from.
#[test]
fn a_refused_receive_dials_nothing() {
    let bb = spec(Side::Generation).node.layout.block_bytes() as usize;
    let mut gen_mem = vec![0u8; bb * BLOCKS as usize];
    let gen = start(Side::Generation, &mut gen_mem);
    let layout = spec(Side::Generation).node.layout;
    for n in 0..=MAX_CTX_PEERS {
        let t = ticket_at(n, layout, vec![]);
        assert_eq!(reason(gen.receive(RequestId(1), vec![], t)), "no-blocks");
    }
    assert!(gen.close());
}

/// Tickets naming context instances of 16 ranks: each costs 16 connections of a TP1
/// generation instance, and the one past `MAX_DIALS` is refused; an instance already dialed
/// costs nothing more.
#[test]
fn connections_dialed_are_bounded() {
    let gen_layout = single_rank(2, 16, 16, 4, 2);
    let ctx_layout = sharded(2, 16, 16, 4, 2, 16);
    let mut gen_mem = vec![0u8; gen_layout.block_bytes() as usize * BLOCKS as usize];
    let gen = start_ranks(spec_of(Side::Generation, gen_layout), vec![&mut gen_mem]).unwrap();
    let fits = MAX_DIALS / 16;
    for n in 0..fits {
        let id = RequestId(n as u64);
        gen.receive(id, vec![0], ticket_at(n, ctx_layout, vec![0]))
            .unwrap();
        // Cancelled or failed (its dials are refused): either way its block is free again.
        gen.cancel(id).unwrap();
        assert_eq!(gen.take(1, Some(Duration::from_secs(20))).len(), 1);
    }
    let past = gen.receive(RequestId(0), vec![0], ticket_at(fits, ctx_layout, vec![0]));
    assert_eq!(reason(past), "too-many-connections");
    gen.receive(RequestId(0), vec![0], ticket_at(0, ctx_layout, vec![0]))
        .unwrap();
    assert!(gen.close());
}

/// A TP2 context instance closes the moment its statuses are in, while the TP1 generation
/// instance may still be reading the tail (megabytes a request, and a generation side that
/// heartbeats every millisecond, so the context ranks always have inbound bytes to read):
/// closing must end its connections with FIN, never a reset that loses the tail.
#[test]
fn a_context_instance_closing_after_its_statuses_loses_nothing() {
    let tp2 = sharded(8, 2, 128, 64, 2, 2);
    let tp1 = single_rank(8, 2, 128, 64, 2);
    let (cbb, gbb) = (tp2.block_bytes() as usize, tp1.block_bytes() as usize);
    let mut gen_spec = spec_of(Side::Generation, tp1);
    gen_spec.node.limits.heartbeat = Duration::from_millis(1);
    // Its own reader's idle bound is heartbeat × misses: a second, as by default, not 6 ms.
    gen_spec.node.limits.heartbeat_misses = 1000;
    for round in 0..10 {
        let mut ctx_mem: Vec<Vec<u8>> = (0..2)
            .map(|r| vec![(round * 2 + r + 1) as u8; cbb * BLOCKS as usize])
            .collect();
        let mut gen_mem = vec![0u8; gbb * BLOCKS as usize];
        let mems = ctx_mem.iter_mut().map(|m| &mut m[..]).collect();
        let ctx = start_ranks(spec_of(Side::Context, tp2), mems).unwrap();
        let gen = start_ranks(gen_spec.clone(), vec![&mut gen_mem]).unwrap();
        let all: Vec<u32> = (0..BLOCKS).collect();
        let ticket = ctx.send(RequestId(7), all.clone()).unwrap();
        gen.receive(RequestId(100), all, ticket).unwrap();
        let c = ctx.take(1, Some(Duration::from_secs(20)));
        assert_eq!(c[0].state, RequestState::ContextComplete, "{c:?}");
        assert!(ctx.close());
        let g = gen.take(1, Some(Duration::from_secs(20)));
        assert_eq!(
            g[0].state,
            RequestState::GenComplete,
            "round {round}: {g:?}"
        );
        assert!(gen.close());
        assert!(!gen_mem.contains(&0), "round {round}: every byte landed");
    }
}
