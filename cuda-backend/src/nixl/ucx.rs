//! The real engine: a nixl-sys agent with the UCX backend and the KV pool registered.
//! UCX is steered by its own environment (`UCX_TLS`, `UCX_NET_DEVICES`): tests pin it to
//! `tcp` on `lo`.

use super::engine::{Engine, ReadSpec, XferState};
use super::error::NixlError;
use super::md;
use super::memory::PoolMemory;
use super::runtime;
use nixl_sys::{
    Agent, AgentConfig, Backend, MemType, MemoryRegion, NixlDescriptor, NotificationMap, OptArgs,
    RegDescList, RegistrationHandle, XferDescList, XferOp, XferRequest, XferStatus,
};
use std::collections::HashMap;
use std::sync::Arc;

/// The pool as NIXL sees it: one DRAM or VRAM region.
#[derive(Debug)]
struct PoolRegion(Arc<dyn PoolMemory>);

impl MemoryRegion for PoolRegion {
    unsafe fn as_ptr(&self) -> *const u8 {
        self.0.base() as *const u8
    }

    fn size(&self) -> usize {
        self.0.size() as usize
    }
}

impl NixlDescriptor for PoolRegion {
    fn mem_type(&self) -> MemType {
        self.0.mem_type()
    }

    fn device_id(&self) -> u64 {
        self.0.device_id()
    }
}

#[derive(Debug)]
pub struct UcxEngine {
    agent: Agent,
    ucx: Backend,
    // Field order is drop order: deregister before the pool may be freed.
    _reg: RegistrationHandle,
    // Holds the pool alive while it is registered (and leaked with the engine).
    pool: PoolRegion,
    /// The device of each loaded peer's pool, by agent name: one entry per loaded metadata,
    /// gone when it is invalidated.
    remote_devices: HashMap<String, u64>,
}

impl UcxEngine {
    /// Loads the runtime, creates agent `name` with UCX and registers `pool`. A VRAM pool
    /// needs its device's context current on the calling thread (UCX's CUDA transports
    /// query it when the memory is registered).
    pub fn new(name: &str, pool: Arc<dyn PoolMemory>) -> Result<UcxEngine, NixlError> {
        runtime::preload()?;
        // UCX's progress thread would compete with the node for 2 cores; the driver thread
        // progresses the worker through its polls instead.
        let config = AgentConfig {
            enable_prog_thread: false,
            ..AgentConfig::default()
        };
        let agent = Agent::new_configured(name, &config).map_err(NixlError::call("agent"))?;
        let (_, params) = agent
            .get_plugin_params("UCX")
            .map_err(NixlError::call("UCX plugin params"))?;
        let ucx = agent
            .create_backend("UCX", &params)
            .map_err(NixlError::call("UCX backend"))?;
        let pool = PoolRegion(pool);
        // NIXL logs why a VRAM registration fails; the error itself carries no cause.
        let op = match pool.mem_type() {
            MemType::Vram => {
                "register the KV pool as VRAM (UCX needs its CUDA transports in \
                 UCX_TLS and, without libcudart beside it, UCX_MEMTYPE_CACHE=n)"
            }
            _ => "register the KV pool",
        };
        let reg = agent
            .register_memory(&pool, None)
            .map_err(NixlError::call(op))?;
        Ok(UcxEngine {
            agent,
            ucx,
            _reg: reg,
            pool,
            remote_devices: HashMap::new(),
        })
    }

    /// Both sides' descriptors carry this pool's kind: a peer's pool of another kind has no
    /// matching section and NIXL refuses the READ (NOT_FOUND) rather than guess. The device
    /// is each side's own (`dev`): ours for the local list, the peer's for the remote one.
    fn descs(
        &self,
        pieces: &[(u64, u64, u64)],
        remote: bool,
        dev: u64,
    ) -> Result<XferDescList<'static>, NixlError> {
        let kind = self.pool.mem_type();
        let mut l = XferDescList::new(kind).map_err(NixlError::call("descriptors"))?;
        for &(local, far, len) in pieces {
            l.add_desc(if remote { far } else { local } as usize, len as usize, dev);
        }
        Ok(l)
    }
}

impl Engine for UcxEngine {
    type Xfer = XferRequest;

    /// UCX's connection info, then the KV pool's section (see `md`).
    fn local_md(&mut self) -> Result<Vec<u8>, NixlError> {
        let mut args = OptArgs::new().map_err(NixlError::call("opt args"))?;
        args.add_backend(&self.ucx)
            .map_err(NixlError::call("opt args"))?;
        let kind = self.pool.mem_type();
        let none = RegDescList::new(kind).map_err(NixlError::call("descriptors"))?;
        let conns = (self.agent.get_local_partial_md(&none, Some(&args)))
            .map_err(NixlError::call("connection metadata"))?;
        let mut pool = RegDescList::new(kind).map_err(NixlError::call("descriptors"))?;
        pool.add_storage_desc(&self.pool)
            .map_err(NixlError::call("descriptors"))?;
        let section = (self.agent.get_local_partial_md(&pool, Some(&args)))
            .map_err(NixlError::call("pool metadata"))?;
        let device = u32::try_from(self.pool.device_id()).expect("CUDA ordinals fit u32");
        Ok(md::join(device, &conns, &section))
    }

    fn load_remote(&mut self, md: &[u8]) -> Result<String, NixlError> {
        let peer = md::split(md)?;
        let (conns, section) = (peer.conns, peer.section);
        let load = |part: &[u8]| {
            (self.agent.load_remote_md(part)).map_err(NixlError::call("load remote metadata"))
        };
        let name = load(conns)?;
        let again = load(section)?;
        if again != name {
            self.invalidate_remote(&name);
            self.invalidate_remote(&again);
            let why = format!("metadata parts of two agents: {name} and {again}");
            return Err(NixlError::Invalid(why));
        }
        self.remote_devices
            .insert(name.clone(), u64::from(peer.device));
        Ok(name)
    }

    fn invalidate_remote(&mut self, agent: &str) {
        self.remote_devices.remove(agent);
        if let Err(e) = self.agent.invalidate_remote_md(agent) {
            tracing::debug!(agent, error = %e, "remote metadata not invalidated");
        }
    }

    fn post_read(&mut self, read: &ReadSpec) -> Result<XferRequest, NixlError> {
        let far_dev = *self.remote_devices.get(&read.remote).ok_or_else(|| {
            NixlError::Invalid(format!("READ from {} before its metadata", read.remote))
        })?;
        let local = self.descs(&read.pieces, false, self.pool.device_id())?;
        let remote = self.descs(&read.pieces, true, far_dev)?;
        let mut args = OptArgs::new().map_err(NixlError::call("opt args"))?;
        args.set_has_notification(true)
            .and_then(|()| args.set_notification_message(&read.notif))
            .map_err(NixlError::call("notification"))?;
        let req = self
            .agent
            .create_xfer_req(XferOp::Read, &local, &remote, &read.remote, Some(&args))
            .map_err(NixlError::call("create READ"))?;
        self.agent
            .post_xfer_req(&req, Some(&args))
            .map_err(NixlError::call("post READ"))?;
        Ok(req)
    }

    fn state(&mut self, xfer: &XferRequest) -> XferState {
        match self.agent.get_xfer_status(xfer) {
            Ok(XferStatus::Success) => XferState::Done,
            Ok(XferStatus::InProgress) => XferState::InProgress,
            Err(e) => XferState::Failed(format!("NIXL transfer: {e}")),
        }
    }

    fn notifications(&mut self, out: &mut Vec<(String, Vec<u8>)>) {
        let Ok(mut map) = NotificationMap::new() else {
            return;
        };
        if self.agent.get_notifications(&mut map, None).is_err() {
            return;
        }
        match map.take_notifs() {
            Ok(all) => out.extend(
                all.into_iter()
                    .flat_map(|(from, ms)| ms.into_iter().map(move |m| (from.clone(), m.into()))),
            ),
            // A non-UTF-8 notification is not ours (ours are ASCII): drop the batch.
            Err(e) => tracing::debug!(error = %e, "unreadable NIXL notifications dropped"),
        }
    }
}
