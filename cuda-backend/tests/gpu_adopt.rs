//! Device memory an embedding program owns, adopted as the CUDA agent's KV pool
//! (`DeviceBuffer::adopt`): checked against the driver's records, never freed by the agent,
//! and exported over CUDA IPC as base allocation + offset, since an engine's caching allocator
//! hands out ranges inside larger allocations. Two processes (the child is this binary re-run
//! with an env marker) each run an embedded instance (one rank) over a pool that starts `LEAD`
//! bytes into an allocation; the gen pulls a request and the bytes land where they must, and
//! only there.
//! Skips (with a printed reason) where there is no GPU.
#![cfg(feature = "cuda")]

mod common;

use common::gpus;
use kvferry_backends::cuda::verify::fill_pattern;
use kvferry_backends::cuda::{CudaError, DeviceBuffer, Gpu};
use kvferry_backends::layout::single_rank;
use kvferry_backends::node::backend_parts::LentKv;
use kvferry_backends::node::embed::handle::{EmbedSpec, EmbeddedInstance};
use kvferry_backends::node::embed::ticket::ContextTicket;
use kvferry_backends::node::spec::NodeSpec;
use kvferry_core::request::RequestState;
use kvferry_core::transceiver::Side;
use kvferry_core::RequestId;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

const CHILD_ENV: &str = "KVFERRY_ADOPT_CHILD";
const BLOCKS: u32 = 8;
/// Where the pool starts in its allocation: not a multiple of the block size.
const LEAD: usize = 3 * 512;
const POISON: u8 = 0xA5;
const SEED: u64 = 77;
const CTX_BLOCKS: [u32; 3] = [6, 1, 3];
const GEN_BLOCKS: [u32; 3] = [0, 7, 2];
const WAIT: Duration = Duration::from_secs(30);

fn spec(side: Side) -> EmbedSpec {
    EmbedSpec {
        side,
        node: NodeSpec {
            layout: single_rank(4, 2, 64, 16, 2),
            pool_blocks: BLOCKS,
            config: Default::default(),
            limits: Default::default(),
        },
        listen: "127.0.0.1:0".parse().unwrap(),
    }
}

fn pool_bytes() -> usize {
    spec(Side::Context).node.layout.block_bytes() as usize * BLOCKS as usize
}

/// An allocation of `LEAD` + pool bytes, and the pool adopted from inside it.
fn backed_pool(gpu: &Arc<Gpu>) -> (DeviceBuffer, Arc<DeviceBuffer>) {
    let owner = DeviceBuffer::alloc(gpu, LEAD + pool_bytes()).unwrap();
    // SAFETY: `owner` outlives every rank built on the adopted range (each test closes them).
    let pool = unsafe { DeviceBuffer::adopt(gpu, owner.ptr() + LEAD as u64, pool_bytes()) };
    (owner, Arc::new(pool.unwrap()))
}

#[test]
fn adoption_checks_the_range_and_never_frees() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let Some(_) = gpus() else { return };
    let gpu = Gpu::open(0).unwrap();
    let owner = DeviceBuffer::alloc(&gpu, 1 << 20).unwrap();
    let not_adoptable =
        |r: Result<DeviceBuffer, CudaError>| matches!(r, Err(CudaError::NotAdoptable(_)));
    // SAFETY (all adoptions below): `owner` outlives them; refused ones point nowhere.
    let inner = unsafe { DeviceBuffer::adopt(&gpu, owner.ptr() + 4096, 8192) }.unwrap();
    assert!(!inner.is_owned());
    let export = inner.export().unwrap();
    assert_eq!((export.offset, export.len), (4096, 8192));
    let past_end = unsafe { DeviceBuffer::adopt(&gpu, owner.ptr() + 4096, 1 << 20) };
    assert!(not_adoptable(past_end));
    let host = vec![0u8; 4096];
    let on_host = unsafe { DeviceBuffer::adopt(&gpu, host.as_ptr() as u64, 4096) };
    assert!(not_adoptable(on_host));
    assert!(not_adoptable(unsafe {
        DeviceBuffer::adopt(&gpu, owner.ptr(), 0)
    }));
    // Adopting the whole allocation and dropping it must leave it allocated: were it freed,
    // the owner's copies below would fail.
    drop(unsafe { DeviceBuffer::adopt(&gpu, owner.ptr(), owner.len()) }.unwrap());
    drop(inner);
    owner.write(0, &[7u8; 4096]).unwrap();
    let mut back = vec![0u8; 4096];
    owner.read(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 7));
}

/// Child role: the context rank over an adopted pool filled from `SEED`.
#[test]
fn adopt_ctx_child_role() {
    if std::env::var(CHILD_ENV).is_err() {
        return;
    }
    let gpu = Gpu::open(0).unwrap();
    let (owner, pool) = backed_pool(&gpu);
    let mut bytes = vec![0u8; pool_bytes()];
    fill_pattern(SEED, &mut bytes);
    owner.write(LEAD, &bytes).unwrap();
    let ctx = EmbeddedInstance::start(spec(Side::Context), vec![LentKv::Cuda(pool)]).unwrap();
    let ticket = ctx.send(RequestId(7), CTX_BLOCKS.to_vec()).unwrap();
    println!("TICKET {}", hex(&ticket.encode()));
    let done = ctx.take(1, Some(WAIT));
    println!("CTX {:?}", done.first().map(|o| o.state));
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    assert!(ctx.close());
}

#[test]
fn adopted_pools_move_a_request_over_cuda_ipc() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let Some(_) = gpus() else { return };
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["adopt_ctx_child_role", "--exact", "--nocapture"])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let ticket = ContextTicket::decode(&unhex(&marked(&mut out, "TICKET "))).unwrap();

    let gpu = Gpu::open(0).unwrap();
    let (owner, pool) = backed_pool(&gpu);
    owner.fill_byte(POISON).unwrap();
    let gen = EmbeddedInstance::start(spec(Side::Generation), vec![LentKv::Cuda(pool)]).unwrap();
    gen.receive(RequestId(100), GEN_BLOCKS.to_vec(), ticket)
        .unwrap();
    let g = gen.take(1, Some(WAIT));
    assert_eq!(g.len(), 1, "{g:?}");
    assert_eq!(g[0].state, RequestState::GenComplete, "{g:?}");
    assert!(gen.close());
    assert_eq!(marked(&mut out, "CTX "), "Some(ContextComplete)");
    child.stdin.take().unwrap().write_all(b"done\n").unwrap();
    assert!(child.wait().unwrap().success());

    let mut source = vec![0u8; pool_bytes()];
    fill_pattern(SEED, &mut source);
    let mut expected = vec![POISON; LEAD + pool_bytes()];
    let bb = pool_bytes() / BLOCKS as usize;
    for (c, g) in CTX_BLOCKS.iter().zip(GEN_BLOCKS) {
        let (c, g) = (*c as usize * bb, LEAD + g as usize * bb);
        expected[g..g + bb].copy_from_slice(&source[c..c + bb]);
    }
    let mut actual = vec![0u8; LEAD + pool_bytes()];
    owner.read(0, &mut actual).unwrap();
    let first_bad = expected.iter().zip(&actual).position(|(e, a)| e != a);
    assert_eq!(first_bad, None, "first differing byte of the allocation");
}

/// The rest of the first line of the child's output that contains `mark` (libtest may print
/// "test ... " before it on the same line).
fn marked(out: &mut impl BufRead, mark: &str) -> String {
    loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "child ended early");
        if let Some(at) = line.find(mark) {
            return line[at + mark.len()..].trim().to_string();
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
