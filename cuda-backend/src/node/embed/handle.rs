//! The embedding program's handle on its instance (every TP rank of one process, each over a
//! pool the program lends): starts the driver on a thread of its own (a one-thread tokio
//! runtime), passes the program's calls to it and waits for the answer (the
//! driver answers at once: no call waits on the network), hands out terminal statuses, and on
//! close stops the driver and joins its thread. Every method is blocking-safe to call from any
//! thread that is not inside a tokio runtime.

use super::command::{Command, CommandError, COMMAND_QUEUE};
use super::dialers::Dialers;
use super::driver::{Driver, Role};
use super::outcomes::{Outcome, Outcomes};
use super::ticket::ContextTicket;
use crate::node::backend::{BackendError, BackendSpec};
use crate::node::backend_parts::LentKv;
use crate::node::conn::{Attach, Delivery};
use crate::node::ctx::accept_loop;
use crate::node::instance::{Instance, MAX_LOCAL_RANKS};
use crate::node::rank::Occupancy;
use crate::node::spec::NodeSpec;
use crate::node::{runtime, OwnedTask, INBOX};
use kvferry_core::transceiver::Side;
use kvferry_core::RequestId;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// What an embedded instance is: its side and its layout (`node.layout`, rank 0's; one rank
/// per rank of it).
#[derive(Clone, Debug)]
pub struct EmbedSpec {
    pub side: Side,
    pub node: NodeSpec,
    /// Context side: where rank 0 listens; rank `r` listens on the port `r` above it, or, for
    /// port 0, on a port of its own. Tickets name the bound addresses.
    pub listen: SocketAddr,
}

#[derive(Debug, Error)]
pub enum StartError {
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "{pools} pools for a layout of {world} ranks (one per rank, {MAX_LOCAL_RANKS} at most)"
    )]
    Ranks { pools: usize, world: usize },
    #[error("starting the driver thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Shared by the program's threads: one may wait for statuses while another closes.
#[derive(Debug)]
pub struct EmbeddedInstance {
    side: Side,
    /// `None` once closed.
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    outcomes: Arc<Outcomes>,
    thread: Mutex<Option<JoinHandle<()>>>,
    listening: Vec<SocketAddr>,
}

impl EmbeddedInstance {
    /// Starts an instance over `kvs`, the program's memory, one pool per rank of the layout
    /// in rank order: host memory (`HostKv::lent`, the host backend) or device memory
    /// (`DeviceBuffer::adopt`, the CUDA backend).
    pub fn start(spec: EmbedSpec, kvs: Vec<LentKv>) -> Result<EmbeddedInstance, StartError> {
        let world = spec.node.layout.world_size() as usize;
        if kvs.len() != world || world > MAX_LOCAL_RANKS {
            let pools = kvs.len();
            return Err(StartError::Ranks { pools, world });
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
        let outcomes = Arc::new(Outcomes::default());
        let out = outcomes.clone();
        let side = spec.side;
        let thread = std::thread::Builder::new()
            .name("kvferry-driver".into())
            .spawn(move || {
                drive(spec, kvs, out.clone(), cmd_rx, ready_tx);
                out.close();
            })
            .map_err(StartError::Thread)?;
        let listening = match ready_rx.recv() {
            Ok(r) => r?,
            Err(_) => {
                let _ = thread.join();
                return Err(StartError::Thread(std::io::Error::other(
                    "the driver thread ended before it was ready",
                )));
            }
        };
        Ok(EmbeddedInstance {
            side,
            commands: Mutex::new(Some(cmd_tx)),
            outcomes,
            thread: Mutex::new(Some(thread)),
            listening,
        })
    }

    pub fn side(&self) -> Side {
        self.side
    }

    /// The context side's bound addresses, in rank order (none on the generation side).
    pub fn listening(&self) -> &[SocketAddr] {
        &self.listening
    }

    pub fn is_closed(&self) -> bool {
        self.commands.lock().expect("commands lock").is_none()
    }

    fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, CommandError> {
        let tx = self.commands.lock().expect("commands lock").clone();
        let tx = tx.ok_or(CommandError::Closed)?;
        let (reply, rx) = oneshot::channel();
        tx.blocking_send(make(reply))
            .map_err(|_| CommandError::Closed)?;
        rx.blocking_recv().map_err(|_| CommandError::Closed)
    }

    /// Context side: serve engine request `id` from `blocks`; its ticket for the generation side.
    pub fn send(&self, id: RequestId, blocks: Vec<u32>) -> Result<ContextTicket, CommandError> {
        self.call(|reply| Command::Send { id, blocks, reply })?
    }

    /// Generation side: receive `ticket`'s request into `blocks` as engine request `id`.
    pub fn receive(
        &self,
        id: RequestId,
        blocks: Vec<u32>,
        ticket: ContextTicket,
    ) -> Result<(), CommandError> {
        self.call(|reply| Command::Receive {
            id,
            blocks,
            ticket,
            reply,
        })?
    }

    /// Cancels engine request `id`; false if it is not active here.
    pub fn cancel(&self, id: RequestId) -> Result<bool, CommandError> {
        self.call(|reply| Command::Cancel { id, reply })
    }

    pub fn occupancy(&self) -> Result<Occupancy, CommandError> {
        self.call(|reply| Command::Occupancy { reply })
    }

    /// Terminal statuses: every one ready, after waiting for at least `at_least` (see
    /// `Outcomes::take`).
    pub fn take(&self, at_least: usize, timeout: Option<Duration>) -> Vec<Outcome> {
        self.outcomes.take(at_least, timeout)
    }

    /// Requests registered whose status has not come yet.
    pub fn pending(&self) -> usize {
        self.outcomes.pending()
    }

    /// Stops the driver (what is in flight is cancelled, its fences awaited for at most
    /// `driver::CLOSE_DRAIN`) and joins its thread; every pool reference the driver held is
    /// gone when this returns true. Idempotent.
    pub fn close(&self) -> bool {
        self.commands.lock().expect("commands lock").take();
        let thread = self.thread.lock().expect("thread lock").take();
        match thread {
            Some(t) => t.join().is_ok(),
            None => true,
        }
    }
}

impl Drop for EmbeddedInstance {
    fn drop(&mut self) {
        self.close();
    }
}

/// The driver thread's body: builds the instance in its runtime, says whether that worked,
/// runs.
fn drive(
    spec: EmbedSpec,
    kvs: Vec<LentKv>,
    out: Arc<Outcomes>,
    commands: mpsc::Receiver<Command>,
    ready: std::sync::mpsc::SyncSender<Result<Vec<SocketAddr>, StartError>>,
) {
    let rt = match runtime(1) {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(StartError::Thread(e)));
            return;
        }
    };
    rt.block_on(async move {
        let (inbox_tx, inbox) = mpsc::channel(INBOX);
        let (driver, listening) = match build(&spec, kvs, inbox_tx, out).await {
            Ok(x) => x,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(listening));
        if let Err(e) = driver.run(inbox, commands).await {
            tracing::error!(error = %e, "embedded instance stopped");
        }
    });
}

async fn build(
    spec: &EmbedSpec,
    kvs: Vec<LentKv>,
    inbox: mpsc::Sender<Delivery>,
    out: Arc<Outcomes>,
) -> Result<(Driver, Vec<SocketAddr>), StartError> {
    // A generation instance names its context instances 0, 1, ... (`Dialers`): it takes the
    // top id.
    let instance = match spec.side {
        Side::Context => crate::node::spec::CTX_INSTANCE,
        Side::Generation => u32::MAX,
    };
    let backends = kvs.into_iter().map(|kv| (BackendSpec::Host, Some(kv)));
    let inst = Instance::build(instance, spec.side, &spec.node, backends.collect())?;
    let attach: Vec<Attach> = (inst.ranks.iter())
        .map(|r| Attach::new(r, inbox.clone()))
        .collect();
    let (role, listening) = match spec.side {
        Side::Context => {
            let mut addrs = Vec::with_capacity(attach.len());
            let mut accept = Vec::with_capacity(attach.len());
            for (r, a) in attach.into_iter().enumerate() {
                let listener = listen(spec.listen, r).await?;
                addrs.push(listener.local_addr().map_err(|source| StartError::Listen {
                    addr: spec.listen,
                    source,
                })?);
                accept.push(OwnedTask(tokio::spawn(accept_loop(listener, a))));
            }
            let role = Role::Context {
                addrs: addrs.clone(),
                _accept: accept,
            };
            (role, addrs)
        }
        Side::Generation => (Role::Generation(Dialers::new(attach)), Vec::new()),
    };
    Ok((Driver::new(inst, role, out), listening))
}

/// Rank `r`'s listener: on `base`'s port plus `r`, or on a port of its own for port 0.
async fn listen(base: SocketAddr, r: usize) -> Result<TcpListener, StartError> {
    let mut addr = base;
    if base.port() != 0 {
        let port = u16::try_from(r)
            .ok()
            .and_then(|r| base.port().checked_add(r));
        let Some(port) = port else {
            let source = std::io::Error::other(format!("no port {r} above {}", base.port()));
            return Err(StartError::Listen { addr: base, source });
        };
        addr.set_port(port);
    }
    let listener = TcpListener::bind(addr).await;
    listener.map_err(|source| StartError::Listen { addr, source })
}
