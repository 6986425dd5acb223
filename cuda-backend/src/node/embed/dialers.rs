//! The generation side's connections: one dialer per context address a ticket names, started
//! on the first request for it and again after it gave up. A request for a context rank that is
//! not connected yet is parked here until the connection is up (its `RequestInfo` would have
//! nowhere to go), and fails if the dialer gives up.

use crate::node::conn::Attach;
use crate::node::gen::dial_loop;
use crate::node::OwnedTask;
use kvferry_core::request::Request;
use kvferry_core::{PeerId, RequestId};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// Distinct context addresses one generation rank dials at most (each keeps a connection).
pub const MAX_CTX_PEERS: usize = 1024;

#[derive(Debug)]
struct Dialer {
    /// `None` once the dialer gave up; the next request for the address starts a new one.
    task: Option<OwnedTask<()>>,
    up: bool,
    /// Requests waiting for the connection (bounded by the pool: each holds blocks).
    parked: Vec<Arc<Request>>,
}

#[derive(Debug)]
pub struct Dialers {
    attach: Attach,
    by_addr: HashMap<SocketAddr, PeerId>,
    dialers: HashMap<PeerId, Dialer>,
}

impl Dialers {
    pub fn new(attach: Attach) -> Dialers {
        Dialers {
            attach,
            by_addr: HashMap::new(),
            dialers: HashMap::new(),
        }
    }

    /// The peer id of the context rank at `addr` (a context instance of its own, rank 0),
    /// dialing it if no dialer runs; `None` past `MAX_CTX_PEERS` addresses.
    pub fn peer_for(&mut self, addr: SocketAddr) -> Option<PeerId> {
        let peer = match self.by_addr.get(&addr) {
            Some(p) => *p,
            None if self.by_addr.len() >= MAX_CTX_PEERS => return None,
            None => {
                let peer = PeerId {
                    instance: self.by_addr.len() as u32,
                    rank: 0,
                };
                self.by_addr.insert(addr, peer);
                peer
            }
        };
        let d = self.dialers.entry(peer).or_insert(Dialer {
            task: None,
            up: false,
            parked: Vec::new(),
        });
        if d.task.is_none() {
            let a = self.attach.clone();
            d.task = Some(OwnedTask(tokio::spawn(dial_loop(addr, peer, a))));
        }
        Some(peer)
    }

    pub fn is_up(&self, peer: PeerId) -> bool {
        self.dialers.get(&peer).is_some_and(|d| d.up)
    }

    pub fn park(&mut self, peer: PeerId, req: Arc<Request>) {
        self.dialers
            .get_mut(&peer)
            .expect("a request is parked for a dialed peer")
            .parked
            .push(req);
    }

    /// The connection to `peer` is up: the requests parked for it, to submit now.
    pub fn up(&mut self, peer: PeerId) -> Vec<Arc<Request>> {
        let Some(d) = self.dialers.get_mut(&peer) else {
            return Vec::new();
        };
        d.up = true;
        std::mem::take(&mut d.parked)
    }

    pub fn down(&mut self, peer: PeerId) {
        if let Some(d) = self.dialers.get_mut(&peer) {
            d.up = false;
        }
    }

    /// The dialer for `peer` stopped trying: the requests parked for it, to fail.
    pub fn gave_up(&mut self, peer: PeerId) -> Vec<Arc<Request>> {
        let Some(d) = self.dialers.get_mut(&peer) else {
            return Vec::new();
        };
        d.task = None;
        d.up = false;
        std::mem::take(&mut d.parked)
    }

    /// Takes request `id` out of the parked ones, if it is parked.
    pub fn unpark(&mut self, id: RequestId) -> Option<Arc<Request>> {
        self.dialers.values_mut().find_map(|d| {
            let i = d.parked.iter().position(|r| r.id == id)?;
            Some(d.parked.swap_remove(i))
        })
    }

    /// Every parked request (on close).
    pub fn unpark_all(&mut self) -> Vec<Arc<Request>> {
        self.dialers
            .values_mut()
            .flat_map(|d| std::mem::take(&mut d.parked))
            .collect()
    }
}
