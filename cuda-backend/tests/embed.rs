//! Two embedded ranks in one process over loopback, their pools in memory this test owns:
//! a request moves byte for byte into the blocks the generation side named, the statuses say
//! so, and misuse is refused with the reason.

use kvferry_backends::host::kv::HostKv;
use kvferry_backends::layout::single_rank;
use kvferry_backends::node::backend_parts::LentKv;
use kvferry_backends::node::embed::command::CommandError;
use kvferry_backends::node::embed::handle::{EmbedSpec, EmbeddedInstance};
use kvferry_backends::node::spec::NodeSpec;
use kvferry_core::request::RequestState;
use kvferry_core::transceiver::Side;
use kvferry_core::RequestId;
use std::sync::Arc;
use std::time::Duration;

const BLOCKS: u32 = 8;

fn spec(side: Side) -> EmbedSpec {
    EmbedSpec {
        side,
        node: NodeSpec {
            layout: single_rank(2, 2, 16, 4, 2),
            pool_blocks: BLOCKS,
            config: Default::default(),
            limits: Default::default(),
        },
        listen: "127.0.0.1:0".parse().unwrap(),
    }
}

fn start(side: Side, mem: &mut [u8]) -> EmbeddedInstance {
    let bb = spec(side).node.layout.block_bytes();
    assert_eq!(mem.len() as u64, bb * u64::from(BLOCKS));
    // SAFETY: each test closes its ranks (joining their threads) before `mem` goes.
    let kv = unsafe { HostKv::lent(mem.as_mut_ptr(), BLOCKS, bb) };
    EmbeddedInstance::start(spec(side), vec![LentKv::Host(Arc::new(kv))]).expect("rank starts")
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
