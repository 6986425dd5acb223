//! NIXL alone, without the node: READs from one agent's pool into another's, in this process,
//! through the same driver threads and UCX settings the node uses. Its throughput is the
//! ceiling the node's NIXL path can reach (the node adds its control plane on top), so the
//! bench prints it beside the node (`node::bench`).

use super::driver::{Driver, Read};
use super::error::NixlError;
use super::pool::HostPool;
use super::ucx::UcxEngine;
use kvferry_core::agent::TransferId;
use kvferry_core::PeerId;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one probe moves.
#[derive(Clone, Copy, Debug)]
pub struct ProbeShape {
    pub bytes: u64,
    /// One READ's size (contiguous in both pools: one descriptor after NIXL's merge).
    pub read_bytes: u64,
    pub concurrency: usize,
    /// Each pool's size; READs cycle through it.
    pub pool_bytes: u64,
}

/// Bound on one probe, so a stalled transport fails the bench instead of hanging it.
const PROBE_BOUND: Duration = Duration::from_secs(120);
/// How long the probe sleeps waiting for READs when its driver did not wake it.
const PROBE_PARK: Duration = Duration::from_millis(1);

/// MiB/s of NIXL READs of `shape`.
pub fn read_mib_s(shape: ProbeShape) -> Result<f64, NixlError> {
    let slots = shape.pool_bytes / shape.read_bytes.max(1);
    if shape.read_bytes == 0 || slots == 0 || shape.concurrency == 0 {
        return Err(NixlError::Invalid(format!("probe shape {shape:?}")));
    }
    let tag = std::process::id();
    let (server, md) = agent(&format!("kvferry-probe-ctx-{tag}"), shape.pool_bytes)?;
    let (client, _) = agent(&format!("kvferry-probe-gen-{tag}"), shape.pool_bytes)?;
    let (server, server_pool) = server;
    let (client, client_pool) = client;
    // The serving side progresses as it does in the node while a send is parked.
    server.awaiting(1);
    let peer = PeerId {
        instance: 0,
        rank: 0,
    };
    client.load(peer, md)?;
    let total = shape.bytes.div_ceil(shape.read_bytes);
    let (mut posted, mut ended, mut out) = (0u64, 0u64, Vec::new());
    let started = Instant::now();
    while ended < total {
        while posted < total && posted - ended < shape.concurrency as u64 {
            let at = (posted % slots) * shape.read_bytes;
            let (local, far) = (client_pool.base() + at, server_pool.base() + at);
            client.read(Read {
                id: TransferId(posted),
                peer,
                bytes: shape.read_bytes,
                pieces: vec![(local, far, shape.read_bytes)],
                notif: b"probe".to_vec(),
            })?;
            posted += 1;
        }
        client.take_ended(&mut out);
        for (id, r) in out.drain(..) {
            r.map_err(|e| NixlError::Invalid(format!("probe READ {id:?}: {e}")))?;
            ended += 1;
        }
        if started.elapsed() > PROBE_BOUND {
            return Err(NixlError::Invalid("probe READs stalled".into()));
        }
        std::thread::park_timeout(PROBE_PARK);
    }
    let secs = started.elapsed().as_secs_f64();
    Ok((total * shape.read_bytes) as f64 / f64::from(1 << 20) / secs)
}

type Agent = ((Driver, Arc<HostPool>), Vec<u8>);

fn agent(name: &str, pool_bytes: u64) -> Result<Agent, NixlError> {
    let len = usize::try_from(pool_bytes)
        .map_err(|_| NixlError::Invalid(format!("probe pool of {pool_bytes} bytes")))?;
    let pool = Arc::new(HostPool::new(len)?);
    let (name, engine_pool) = (name.to_string(), pool.clone());
    let waiter = std::thread::current();
    let (driver, md) = Driver::spawn(
        move || UcxEngine::new(&name, engine_pool),
        move || waiter.unpark(),
    )?;
    Ok(((driver, pool), md))
}
