//! The generation side's connections: a context instance is named by its ranks' address list
//! (a ticket's `addrs`); each local rank dials each of its ranks, a dialer per (local rank,
//! context rank), started on the first request for the instance and again after it gave up.
//! A request is parked here until every connection it needs is up (its `RequestInfo`s would
//! have nowhere to go; the ranks register it together or not at all, so the instance's
//! tables move in lockstep), and fails if any of the instance's dialers gives up.
//!
//! Tickets come from the router, which is not trusted to be sane: what they make this side
//! dial is bounded, in instances (`MAX_CTX_PEERS`) and in connections (`MAX_DIALS`), and a
//! ticket past either is refused before anything is dialed.

use crate::node::conn::Attach;
use crate::node::gen::dial_loop;
use crate::node::OwnedTask;
use kvferry_core::request::Request;
use kvferry_core::{PeerId, RequestId};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use thiserror::Error;

/// Distinct context instances one generation instance reads from at most (each keeps a
/// connection from every local rank to every one of its ranks).
pub const MAX_CTX_PEERS: usize = 1024;
/// Connections (local rank, context rank) one generation instance dials at most, over every
/// context instance it has read from. `MAX_CTX_PEERS` alone would allow 1024 instances of
/// `MAX_LOCAL_RANKS` ranks each dialed by as many local ranks, ~262k connections. Each costs a
/// socket, a reader and a writer task and a receive buffer of 128 KiB (`conn`'s
/// `READ_BUFFER`): 4096 is at most half a GiB of buffers, and serves, say, a TP8 generation
/// instance reading from 64 TP8 context instances.
pub const MAX_DIALS: usize = 4096;

/// Why a ticket's context instance is not dialed (nothing of it is).
#[derive(Debug, Error)]
pub enum DialError {
    #[error("this instance already reads from {MAX_CTX_PEERS} context instances")]
    TooManyPeers,
    #[error("this context instance needs {needed} more connections, and {dialed} of at most {MAX_DIALS} are dialed")]
    TooManyConnections { needed: usize, dialed: usize },
}

/// One request, one `Request` per local rank (in rank order), to submit together.
pub type Parked = Vec<Arc<Request>>;

#[derive(Debug)]
struct Dialer {
    /// `None` once the dialer gave up; the next request for its instance starts a new one.
    task: Option<OwnedTask<()>>,
    /// Up and ready to carry requests (a CUDA rank's: with the context's pool mapped).
    up: bool,
}

#[derive(Debug)]
struct CtxInstance {
    addrs: Vec<SocketAddr>,
    /// Indexed by local rank, then context rank.
    dialers: Vec<Vec<Dialer>>,
    /// Requests waiting for the connections (bounded by the pools: each holds blocks).
    parked: Vec<Parked>,
}

impl CtxInstance {
    fn all_up(&self) -> bool {
        self.dialers.iter().flatten().all(|d| d.up)
    }
}

#[derive(Debug)]
pub struct Dialers {
    /// One per local rank, in rank order.
    attach: Vec<Attach>,
    by_addrs: HashMap<Vec<SocketAddr>, u32>,
    /// Indexed by the instance id `instance_for` handed out.
    instances: Vec<CtxInstance>,
    /// Dialers of all `instances` (each dials at most one connection at a time); an instance
    /// is never forgotten (its id is in requests), so neither are its dialers.
    dials: usize,
}

impl Dialers {
    pub fn new(attach: Vec<Attach>) -> Dialers {
        Dialers {
            attach,
            by_addrs: HashMap::new(),
            instances: Vec::new(),
            dials: 0,
        }
    }

    /// The instance id of the context instance whose ranks listen on `addrs` (its rank `r` is
    /// `PeerId { instance, rank: r }`), starting every dialer of it that does not run; refused,
    /// with nothing dialed, past `MAX_CTX_PEERS` instances or `MAX_DIALS` connections.
    pub fn instance_for(&mut self, addrs: &[SocketAddr]) -> Result<u32, DialError> {
        let instance = match self.by_addrs.get(addrs) {
            Some(i) => *i,
            None => self.add(addrs)?,
        };
        let inst = &mut self.instances[instance as usize];
        for (g, row) in inst.dialers.iter_mut().enumerate() {
            for (r, d) in row.iter_mut().enumerate() {
                if d.task.is_none() {
                    let peer = PeerId {
                        instance,
                        rank: r as u32,
                    };
                    let dial = dial_loop(inst.addrs[r], peer, self.attach[g].clone());
                    d.task = Some(OwnedTask(tokio::spawn(dial)));
                }
            }
        }
        Ok(instance)
    }

    /// A new context instance at `addrs`, its dialers idle, if the bounds allow it.
    fn add(&mut self, addrs: &[SocketAddr]) -> Result<u32, DialError> {
        if self.instances.len() >= MAX_CTX_PEERS {
            return Err(DialError::TooManyPeers);
        }
        let needed = self.attach.len() * addrs.len();
        if self.dials + needed > MAX_DIALS {
            return Err(DialError::TooManyConnections {
                needed,
                dialed: self.dials,
            });
        }
        self.dials += needed;
        let i = self.instances.len() as u32;
        self.by_addrs.insert(addrs.to_vec(), i);
        let idle = || Dialer {
            task: None,
            up: false,
        };
        self.instances.push(CtxInstance {
            addrs: addrs.to_vec(),
            dialers: (self.attach.iter())
                .map(|_| addrs.iter().map(|_| idle()).collect())
                .collect(),
            parked: Vec::new(),
        });
        Ok(i)
    }

    /// Every connection of every local rank to context instance `instance` is up.
    pub fn is_up(&self, instance: u32) -> bool {
        self.instances
            .get(instance as usize)
            .is_some_and(CtxInstance::all_up)
    }

    pub fn park(&mut self, instance: u32, req: Parked) {
        self.instances
            .get_mut(instance as usize)
            .expect("a request is parked for a dialed instance")
            .parked
            .push(req);
    }

    fn dialer(&mut self, g: usize, peer: PeerId) -> Option<&mut Dialer> {
        let inst = self.instances.get_mut(peer.instance as usize)?;
        inst.dialers.get_mut(g)?.get_mut(peer.rank as usize)
    }

    /// Local rank `g`'s connection to `peer` is up (and ready): the requests parked for its
    /// instance, to submit now, if that was the last connection they waited for.
    pub fn up(&mut self, g: usize, peer: PeerId) -> Vec<Parked> {
        let Some(d) = self.dialer(g, peer) else {
            return Vec::new();
        };
        d.up = true;
        let inst = &mut self.instances[peer.instance as usize];
        if !inst.all_up() {
            return Vec::new();
        }
        std::mem::take(&mut inst.parked)
    }

    pub fn down(&mut self, g: usize, peer: PeerId) {
        if let Some(d) = self.dialer(g, peer) {
            d.up = false;
        }
    }

    /// Local rank `g`'s dialer for `peer` stopped trying: the requests parked for its
    /// instance, to fail (they would wait for that connection for ever).
    pub fn gave_up(&mut self, g: usize, peer: PeerId) -> Vec<Parked> {
        let Some(d) = self.dialer(g, peer) else {
            return Vec::new();
        };
        d.task = None;
        d.up = false;
        std::mem::take(&mut self.instances[peer.instance as usize].parked)
    }

    /// Stops local rank `g`'s dialer for `peer` (the instance is closing); it is not restarted.
    pub fn stop(&mut self, g: usize, peer: PeerId) {
        if let Some(d) = self.dialer(g, peer) {
            d.task = None;
            d.up = false;
        }
    }

    /// Takes request `id` out of the parked ones, if it is parked.
    pub fn unpark(&mut self, id: RequestId) -> Option<Parked> {
        self.instances.iter_mut().find_map(|inst| {
            let i = inst.parked.iter().position(|p| p[0].id == id)?;
            Some(inst.parked.swap_remove(i))
        })
    }
}
