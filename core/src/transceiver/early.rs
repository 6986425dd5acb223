//! Input parked for a request that is not registered on this rank yet: `RequestInfo`s that came
//! before `respond_and_send`, and token-bearing aborts that came before either.
//!
//! Everything here came off the network from peers that have proven nothing, so every part is
//! bounded twice: in total, and per peer, so that one peer cannot take the whole queue from the
//! others. Parked input expires after `early_info_ttl_ms`; the transceiver answers expired
//! `RequestInfo`s with `UnknownRequest` and drops expired aborts.
//!
//! A parked abort ends its request on registration only if its token is the request's, so a
//! peer that guesses request ids parks aborts that end nothing (I9). Aborts are kept per
//! (request, token): a stranger's abort for an id cannot displace the real one.

use crate::blocks::BlockRef;
use crate::wire::RequestInfo;
use crate::{PeerId, RequestId, TransferToken};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

/// Parked `RequestInfo`s, at most this many in total.
pub const MAX_EARLY_INFOS: usize = 4096;
/// Bytes of parked `RequestInfo`s, at most this many in total.
pub const MAX_EARLY_INFO_BYTES: usize = 64 << 20;
/// Bytes of parked `RequestInfo`s from one peer: an eighth of the total.
pub const MAX_EARLY_INFO_BYTES_PER_PEER: usize = MAX_EARLY_INFO_BYTES / 8;
/// Parked aborts, at most this many in total.
pub const MAX_EARLY_ABORTS: usize = 4096;
/// Parked aborts from one peer: an eighth of the total.
pub const MAX_EARLY_ABORTS_PER_PEER: usize = MAX_EARLY_ABORTS / 8;

/// One parked input.
#[derive(Debug)]
pub(crate) enum Parked {
    Info {
        from: PeerId,
        info: RequestInfo,
    },
    /// `token: None` exists only under the `accept-any-abort` bug switch (an `Error` parked).
    Abort {
        from: PeerId,
        token: Option<TransferToken>,
    },
}

impl Parked {
    fn from(&self) -> PeerId {
        match self {
            Parked::Info { from, .. } | Parked::Abort { from, .. } => *from,
        }
    }
}

/// Why input was not parked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The total bound is reached.
    Full,
    /// This peer's share is used up.
    PeerShare,
}

/// What is parked for requests not registered yet: for metrics and memory checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EarlyCounts {
    pub infos: usize,
    /// Bytes of parked `RequestInfo`s, as counted against the bounds.
    pub info_bytes: usize,
    pub aborts: usize,
}

/// What one peer holds here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Share {
    info_bytes: usize,
    aborts: usize,
}

/// Memory a parked `RequestInfo` holds, as counted against the bounds.
pub(crate) fn info_bytes(info: &RequestInfo) -> usize {
    std::mem::size_of::<RequestInfo>()
        + std::mem::size_of::<u32>() * info.ctx_blocks.len()
        + std::mem::size_of::<BlockRef>() * info.gen_blocks.len()
}

#[derive(Debug, Default)]
pub(crate) struct EarlyQueue {
    /// Parked input by request, in arrival order, with when the first came.
    by_request: BTreeMap<RequestId, (Duration, Vec<Parked>)>,
    /// (first arrival, request) of every entry of `by_request`: the expiry order.
    by_age: BTreeSet<(Duration, RequestId)>,
    /// What each peer holds; a peer holding nothing has no entry.
    shares: HashMap<PeerId, Share>,
    infos: usize,
    info_bytes: usize,
    aborts: usize,
}

impl EarlyQueue {
    /// Parks a `RequestInfo` for a request not registered yet.
    pub fn park_info(
        &mut self,
        now: Duration,
        from: PeerId,
        info: RequestInfo,
    ) -> Result<(), Refused> {
        let bytes = info_bytes(&info);
        if self.infos >= MAX_EARLY_INFOS || self.info_bytes + bytes > MAX_EARLY_INFO_BYTES {
            return Err(Refused::Full);
        }
        let share = self.shares.entry(from).or_default();
        if share.info_bytes + bytes > MAX_EARLY_INFO_BYTES_PER_PEER {
            self.forget_idle_share(from);
            return Err(Refused::PeerShare);
        }
        share.info_bytes += bytes;
        self.infos += 1;
        self.info_bytes += bytes;
        self.push(now, info.request, Parked::Info { from, info });
        Ok(())
    }

    /// Parks an abort for a request not registered yet. One abort per (request, token) is kept.
    pub fn park_abort(
        &mut self,
        now: Duration,
        from: PeerId,
        request: RequestId,
        token: Option<TransferToken>,
    ) -> Result<(), Refused> {
        let known = self.by_request.get(&request).is_some_and(|(_, v)| {
            v.iter()
                .any(|p| matches!(p, Parked::Abort { token: t, .. } if *t == token))
        });
        if known {
            return Ok(());
        }
        if self.aborts >= MAX_EARLY_ABORTS {
            return Err(Refused::Full);
        }
        let share = self.shares.entry(from).or_default();
        if share.aborts >= MAX_EARLY_ABORTS_PER_PEER {
            return Err(Refused::PeerShare);
        }
        share.aborts += 1;
        self.aborts += 1;
        self.push(now, request, Parked::Abort { from, token });
        Ok(())
    }

    fn push(&mut self, now: Duration, request: RequestId, p: Parked) {
        let (since, parked) = self.by_request.entry(request).or_insert((now, Vec::new()));
        self.by_age.insert((*since, request));
        parked.push(p);
        self.assert_counts();
    }

    /// Takes everything parked for `request`, in arrival order.
    pub fn take(&mut self, request: RequestId) -> Vec<Parked> {
        let Some((since, parked)) = self.by_request.remove(&request) else {
            return Vec::new();
        };
        assert!(
            self.by_age.remove(&(since, request)),
            "age index out of step"
        );
        for p in &parked {
            self.release(p);
        }
        self.assert_counts();
        parked
    }

    /// Drops everything `peer` parked (its connection is gone: its input can only expire).
    pub fn forget_peer(&mut self, peer: PeerId) {
        if !self.shares.contains_key(&peer) {
            return;
        }
        let mut emptied = Vec::new();
        let mut dropped = Vec::new();
        for (id, (since, parked)) in self.by_request.iter_mut() {
            let (gone, kept): (Vec<Parked>, Vec<Parked>) =
                parked.drain(..).partition(|p| p.from() == peer);
            *parked = kept;
            dropped.extend(gone);
            if parked.is_empty() {
                emptied.push((*since, *id));
            }
        }
        for (since, id) in emptied {
            self.by_request.remove(&id);
            self.by_age.remove(&(since, id));
        }
        for p in &dropped {
            self.release(p);
        }
        self.assert_counts();
    }

    /// When the oldest parked input came, if any.
    pub fn oldest(&self) -> Option<Duration> {
        self.by_age.first().map(|(since, _)| *since)
    }

    /// Takes the input of every request whose first input came at least `ttl` ago.
    pub fn expire(&mut self, now: Duration, ttl: Duration) -> Vec<(RequestId, Vec<Parked>)> {
        let mut out = Vec::new();
        while let Some(&(since, request)) = self.by_age.first() {
            if since + ttl > now {
                break;
            }
            out.push((request, self.take(request)));
        }
        out
    }

    fn release(&mut self, p: &Parked) {
        let from = p.from();
        let share = self
            .shares
            .get_mut(&from)
            .expect("a parked input has a share");
        match p {
            Parked::Info { info, .. } => {
                let bytes = info_bytes(info);
                share.info_bytes -= bytes;
                self.info_bytes -= bytes;
                self.infos -= 1;
            }
            Parked::Abort { .. } => {
                share.aborts -= 1;
                self.aborts -= 1;
            }
        }
        self.forget_idle_share(from);
    }

    /// Shares are kept only for peers holding something: the map stays bounded by the parked
    /// input, not by every peer ever seen.
    fn forget_idle_share(&mut self, from: PeerId) {
        if self.shares.get(&from) == Some(&Share::default()) {
            self.shares.remove(&from);
        }
    }

    /// Peers holding a share here (each holds something, so bounded by the parked input).
    pub fn peers(&self) -> usize {
        self.shares.len()
    }

    pub fn counts(&self) -> EarlyCounts {
        EarlyCounts {
            infos: self.infos,
            info_bytes: self.info_bytes,
            aborts: self.aborts,
        }
    }

    /// The counts equal what they count; the age index equals the map.
    fn assert_counts(&self) {
        if !cfg!(debug_assertions) {
            return;
        }
        assert_eq!(self.by_request.len(), self.by_age.len());
        let parked = self.by_request.values().flat_map(|(_, v)| v);
        let (mut infos, mut bytes, mut aborts) = (0, 0, 0);
        for p in parked {
            match p {
                Parked::Info { info, .. } => {
                    infos += 1;
                    bytes += info_bytes(info);
                }
                Parked::Abort { .. } => aborts += 1,
            }
        }
        assert_eq!(
            (infos, bytes, aborts),
            (self.infos, self.info_bytes, self.aborts)
        );
        let share_bytes: usize = self.shares.values().map(|s| s.info_bytes).sum();
        let share_aborts: usize = self.shares.values().map(|s| s.aborts).sum();
        assert_eq!((share_bytes, share_aborts), (bytes, aborts));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(instance: u32) -> PeerId {
        PeerId { instance, rank: 0 }
    }

    fn info(request: u64, blocks: usize) -> RequestInfo {
        RequestInfo {
            request: RequestId(request),
            token: TransferToken(1),
            gen_layout: crate::layout::unit_layout(),
            ctx_blocks: vec![0; blocks],
            gen_blocks: vec![BlockRef { id: 0, epoch: 0 }; blocks],
        }
    }

    #[test]
    fn one_peer_gets_only_its_share_of_bytes() {
        let mut q = EarlyQueue::default();
        let big = info(1, 100_000);
        let per = info_bytes(&big);
        let fits = MAX_EARLY_INFO_BYTES_PER_PEER / per;
        for i in 0..fits {
            q.park_info(Duration::ZERO, peer(1), info(i as u64, 100_000))
                .unwrap();
        }
        assert_eq!(
            q.park_info(Duration::ZERO, peer(1), big),
            Err(Refused::PeerShare)
        );
        // Another peer still parks.
        q.park_info(Duration::ZERO, peer(2), info(7, 10)).unwrap();
        assert!(q.counts().info_bytes <= MAX_EARLY_INFO_BYTES_PER_PEER + per);
    }

    /// What the bounds count is the memory a parked info holds: its block lists included.
    #[test]
    fn parked_bytes_cover_the_block_lists() {
        let mut q = EarlyQueue::default();
        let n = 100_000;
        q.park_info(Duration::ZERO, peer(1), info(1, n)).unwrap();
        let lists = n * (std::mem::size_of::<u32>() + std::mem::size_of::<BlockRef>());
        let counted = q.counts().info_bytes;
        assert!(
            (lists..=lists + std::mem::size_of::<RequestInfo>()).contains(&counted),
            "{counted} bytes counted for {lists} bytes of lists"
        );
        assert!(counted > lists, "the info itself counts too");
    }

    #[test]
    fn a_strangers_abort_does_not_displace_the_real_one() {
        let mut q = EarlyQueue::default();
        let id = RequestId(9);
        q.park_abort(Duration::ZERO, peer(6), id, Some(TransferToken(666)))
            .unwrap();
        q.park_abort(Duration::ZERO, peer(1), id, Some(TransferToken(5)))
            .unwrap();
        let tokens: Vec<_> = q
            .take(id)
            .into_iter()
            .filter_map(|p| match p {
                Parked::Abort { token, .. } => token,
                Parked::Info { .. } => None,
            })
            .collect();
        assert_eq!(tokens, vec![TransferToken(666), TransferToken(5)]);
        assert_eq!(q.counts().aborts, 0);
        assert!(
            q.shares.is_empty(),
            "shares of peers holding nothing are dropped"
        );
    }

    #[test]
    fn aborts_are_bounded_per_peer_and_expire() {
        let mut q = EarlyQueue::default();
        for i in 0..MAX_EARLY_ABORTS_PER_PEER as u64 {
            q.park_abort(
                Duration::ZERO,
                peer(1),
                RequestId(i),
                Some(TransferToken(1)),
            )
            .unwrap();
        }
        let over = q.park_abort(Duration::ZERO, peer(1), RequestId(1 << 40), None);
        assert_eq!(over, Err(Refused::PeerShare));
        let ttl = Duration::from_secs(30);
        assert!(q.expire(Duration::from_secs(29), ttl).is_empty());
        let expired = q.expire(ttl, ttl);
        assert_eq!(expired.len(), MAX_EARLY_ABORTS_PER_PEER);
        assert_eq!(q.counts().aborts, 0);
        q.park_abort(ttl, peer(1), RequestId(1 << 40), None)
            .unwrap();
    }

    #[test]
    fn a_lost_peers_input_is_dropped_and_others_kept() {
        let mut q = EarlyQueue::default();
        q.park_info(Duration::ZERO, peer(1), info(5, 10)).unwrap();
        q.park_info(Duration::ZERO, peer(2), info(5, 10)).unwrap();
        q.park_abort(Duration::ZERO, peer(1), RequestId(6), None)
            .unwrap();
        q.forget_peer(peer(1));
        assert_eq!(q.counts().infos, 1);
        assert_eq!(q.counts().aborts, 0);
        assert!(q.take(RequestId(6)).is_empty());
        assert_eq!(q.take(RequestId(5)).len(), 1);
        assert!(q.shares.is_empty());
    }

    /// An info of exactly `bytes` as counted (the block lists sized to fit).
    fn info_of(request: u64, bytes: usize) -> RequestInfo {
        let mut i = info(request, 0);
        let base = info_bytes(&i);
        assert_eq!((bytes - base) % 4, 0, "sizes step by one ctx block id");
        i.ctx_blocks = vec![0; (bytes - base) / 4];
        assert_eq!(info_bytes(&i), bytes);
        i
    }

    #[test]
    fn a_peers_share_is_usable_to_the_last_byte() {
        let mut q = EarlyQueue::default();
        let half = MAX_EARLY_INFO_BYTES_PER_PEER / 2;
        q.park_info(Duration::ZERO, peer(1), info_of(1, half))
            .unwrap();
        q.park_info(Duration::ZERO, peer(1), info_of(2, half))
            .unwrap();
        assert_eq!(q.counts().info_bytes, MAX_EARLY_INFO_BYTES_PER_PEER);
        let one_more = info_of(3, info_bytes(&info(3, 0)));
        assert_eq!(
            q.park_info(Duration::ZERO, peer(1), one_more),
            Err(Refused::PeerShare)
        );
    }

    #[test]
    fn parked_info_bytes_are_bounded_across_peers_to_the_last_byte() {
        let mut q = EarlyQueue::default();
        let peers = (MAX_EARLY_INFO_BYTES / MAX_EARLY_INFO_BYTES_PER_PEER) as u32;
        for p in 0..peers {
            let i = info_of(u64::from(p), MAX_EARLY_INFO_BYTES_PER_PEER);
            q.park_info(Duration::ZERO, peer(p), i).unwrap();
        }
        assert_eq!(
            q.counts().info_bytes,
            MAX_EARLY_INFO_BYTES,
            "the total is usable"
        );
        let small = info(99, 0);
        assert_eq!(
            q.park_info(Duration::ZERO, peer(peers), small),
            Err(Refused::Full),
            "a fresh peer finds the total full"
        );
    }

    #[test]
    fn parked_infos_are_bounded_in_count() {
        let mut q = EarlyQueue::default();
        for i in 0..MAX_EARLY_INFOS as u64 {
            q.park_info(Duration::ZERO, peer(1), info(i, 0)).unwrap();
        }
        assert_eq!(
            q.park_info(Duration::ZERO, peer(2), info(1 << 40, 0)),
            Err(Refused::Full)
        );
    }

    #[test]
    fn the_total_bounds_every_peer_together() {
        let mut q = EarlyQueue::default();
        let mut refused = 0;
        for p in 0..(MAX_EARLY_ABORTS / MAX_EARLY_ABORTS_PER_PEER + 1) as u32 {
            for i in 0..MAX_EARLY_ABORTS_PER_PEER as u64 {
                let id = RequestId(u64::from(p) << 32 | i);
                if q.park_abort(Duration::ZERO, peer(p), id, None).is_err() {
                    refused += 1;
                }
            }
        }
        assert_eq!(q.counts().aborts, MAX_EARLY_ABORTS);
        assert_eq!(refused, MAX_EARLY_ABORTS_PER_PEER);
    }
}
