//! The client's view of every request: where each side runs and how it ended. It decides the
//! follow-ups a serving frontend makes: a context request whose generation side ended badly,
//! was rejected or was lost with its instance is cancelled, so nothing waits forever.

use crate::attribution::{End, Lifetime, Refusal};
use kvferry_core::layout::CacheLayout;
use kvferry_core::request::RequestState;
use kvferry_core::transceiver::{FailCause, Side};
use kvferry_core::{RequestId, TransferToken};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SideState {
    NotStarted,
    /// Running on this instance incarnation.
    Live(u32),
    Done(RequestState),
    /// Its instance crashed: the request is gone with it.
    Lost,
    /// Not admitted (no instance, no blocks).
    Rejected,
    /// Never started because the request ended before it got there.
    Skipped,
}

/// Request counts of one seed (see `SeedReport`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcomes {
    pub issued: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Filled by the progress check (I10): see `attribution::Attribution`.
    pub failures_by_cause: BTreeMap<String, u64>,
    pub failures_by_core_cause: BTreeMap<String, u64>,
}

#[derive(Debug)]
struct Req {
    token: TransferToken,
    blocks: usize,
    ctx: SideState,
    gen: SideState,
    ctx_ids: Vec<u32>,
    ctx_layout: Option<CacheLayout>,
    cancelled: bool,
    arrived_us: u64,
    ended_us: u64,
    instances: Vec<u32>,
    refusal: Option<Refusal>,
    first_failure: Option<(u64, String, FailCause)>,
    rogue_ended: bool,
}

#[derive(Debug)]
pub struct Router {
    reqs: BTreeMap<RequestId, Req>,
    ctx_slots: Vec<Option<u32>>,
    gen_slots: Vec<Option<u32>>,
    next_pick: u64,
}

impl Router {
    pub fn new(ctx: u32, gen: u32) -> Router {
        Router {
            reqs: BTreeMap::new(),
            ctx_slots: vec![None; ctx as usize],
            gen_slots: vec![None; gen as usize],
            next_pick: 0,
        }
    }

    pub fn set_slot(&mut self, side: Side, index: u32, uid: Option<u32>) {
        let slots = match side {
            Side::Context => &mut self.ctx_slots,
            Side::Generation => &mut self.gen_slots,
        };
        slots[index as usize] = uid;
    }

    /// Round-robin over the live incarnations of `side`.
    pub fn pick(&mut self, side: Side) -> Option<u32> {
        let slots = match side {
            Side::Context => &self.ctx_slots,
            Side::Generation => &self.gen_slots,
        };
        let live: Vec<u32> = slots.iter().flatten().copied().collect();
        self.next_pick += 1;
        (!live.is_empty()).then(|| live[(self.next_pick % live.len() as u64) as usize])
    }

    pub fn add(&mut self, id: RequestId, token: TransferToken, blocks: usize, now_us: u64) {
        self.reqs.insert(
            id,
            Req {
                token,
                blocks,
                ctx: SideState::NotStarted,
                gen: SideState::NotStarted,
                ctx_ids: Vec::new(),
                ctx_layout: None,
                cancelled: false,
                arrived_us: now_us,
                ended_us: now_us,
                instances: Vec::new(),
                refusal: None,
                first_failure: None,
                rogue_ended: false,
            },
        );
    }

    /// Requests the client issued so far; the next one gets id `issued() + 1`.
    pub fn issued(&self) -> u64 {
        self.reqs.len() as u64
    }

    fn req(&mut self, id: RequestId) -> &mut Req {
        self.reqs.get_mut(&id).expect("router knows every request")
    }

    pub fn rejected(&mut self, id: RequestId, side: Side, why: Refusal, now_us: u64) {
        let r = self.req(id);
        r.refusal.get_or_insert(why);
        r.ended_us = r.ended_us.max(now_us);
        match side {
            Side::Context => {
                r.ctx = SideState::Rejected;
                r.gen = SideState::Skipped;
            }
            Side::Generation => r.gen = SideState::Rejected,
        }
    }

    pub fn started_ctx(&mut self, id: RequestId, uid: u32, ids: Vec<u32>, layout: CacheLayout) {
        let r = self.req(id);
        r.ctx = SideState::Live(uid);
        r.instances.push(uid);
        r.ctx_ids = ids;
        r.ctx_layout = Some(layout);
    }

    /// What the generation side needs, if the request should still go there.
    #[allow(clippy::type_complexity)]
    pub fn gen_ready(
        &mut self,
        id: RequestId,
    ) -> Option<(u32, Vec<u32>, CacheLayout, TransferToken, usize)> {
        let r = self.req(id);
        match (&r.ctx, r.cancelled) {
            (SideState::Live(uid), false) => Some((
                *uid,
                r.ctx_ids.clone(),
                r.ctx_layout.expect("set with the context side"),
                r.token,
                r.blocks,
            )),
            _ => {
                r.gen = SideState::Skipped;
                None
            }
        }
    }

    pub fn started_gen(&mut self, id: RequestId, uid: u32) {
        let r = self.req(id);
        r.gen = SideState::Live(uid);
        r.instances.push(uid);
    }

    /// A rank reported the request failed there. The first report is kept, except that a
    /// cause nearer the root replaces a follow-up: `cancelled` (the simulator cancels a request only as
    /// a follow-up: a client cancel, the other side's failure, a crash), then `peer-aborted`
    /// (a peer's abort answers that peer's own decision; a rogue's is I9's), then any other.
    /// A rank reports what it saw only after its step's collective, so a follow-up can be
    /// reported before the failure that caused it (the soak found a `no-slot` reported after
    /// the peer-aborted it caused).
    pub fn failed_on(&mut self, id: RequestId, at_us: u64, track: &str, cause: FailCause) {
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        // How far a cause is from a follow-up: the larger replaces the smaller.
        let root = |c: FailCause| match c {
            FailCause::Cancelled => 0,
            FailCause::PeerAborted => 1,
            _ => 2,
        };
        let replace = match &r.first_failure {
            None => true,
            Some((_, _, first)) => root(cause) > root(*first),
        };
        if replace {
            r.first_failure = Some((at_us, track.to_string(), cause));
        }
    }

    /// A rank ended the request on an abort no real peer sent (I9).
    pub fn rogue_ended(&mut self, id: RequestId) {
        if let Some(r) = self.reqs.get_mut(&id) {
            r.rogue_ended = true;
        }
    }

    /// Records a terminal state; returns the incarnation of the other side to cancel it on.
    pub fn terminal(
        &mut self,
        side: Side,
        uid: u32,
        id: RequestId,
        state: RequestState,
        now_us: u64,
    ) -> Option<u32> {
        let r = self.req(id);
        r.ended_us = r.ended_us.max(now_us);
        let slot = match side {
            Side::Context => &mut r.ctx,
            Side::Generation => &mut r.gen,
        };
        if *slot != SideState::Live(uid) {
            return None;
        }
        *slot = SideState::Done(state);
        // A side that ended badly takes the other down: the frontend saw the error. (A late
        // RequestInfo for a context request that already ended would otherwise be parked by
        // the context rank as "early" and never answered.)
        match (side, state, &r.ctx, &r.gen) {
            (Side::Generation, s, SideState::Live(c), _) if s != RequestState::GenComplete => {
                Some(*c)
            }
            (Side::Context, s, _, SideState::Live(g)) if s != RequestState::ContextComplete => {
                Some(*g)
            }
            _ => None,
        }
    }

    /// An incarnation crashed: its requests are lost; context halves of lost generation
    /// requests are returned for cancelling.
    pub fn instance_lost(&mut self, uid: u32, now_us: u64) -> Vec<(u32, RequestId)> {
        let mut out = Vec::new();
        for (id, r) in &mut self.reqs {
            if r.ctx == SideState::Live(uid) {
                r.ctx = SideState::Lost;
                r.ended_us = r.ended_us.max(now_us);
            }
            if r.gen == SideState::Live(uid) {
                r.gen = SideState::Lost;
                r.ended_us = r.ended_us.max(now_us);
                if let SideState::Live(c) = r.ctx {
                    out.push((c, *id));
                }
            }
        }
        out
    }

    pub fn client_cancel(&mut self, id: RequestId) {
        self.req(id).cancelled = true;
    }

    fn live(&self) -> impl Iterator<Item = (&RequestId, &Req)> {
        self.reqs.iter().filter(|(_, r)| {
            matches!(r.ctx, SideState::Live(_)) || matches!(r.gen, SideState::Live(_))
        })
    }

    /// A request with a live side, `(id, ctx incarnation, gen incarnation)`.
    pub fn pick_live(&self, r: u64) -> Option<(RequestId, Option<u32>, Option<u32>)> {
        let v: Vec<_> = self.live().collect();
        if v.is_empty() {
            return None;
        }
        let (id, q) = v[(r % v.len() as u64) as usize];
        let uid = |s: &SideState| match s {
            SideState::Live(u) => Some(*u),
            _ => None,
        };
        Some((*id, uid(&q.ctx), uid(&q.gen)))
    }

    /// A request live on a context instance, with its block ids there.
    pub fn pick_ctx_live(&self, r: u64) -> Option<(RequestId, u32, Vec<u32>)> {
        let v: Vec<_> = self
            .reqs
            .iter()
            .filter_map(|(id, q)| match q.ctx {
                SideState::Live(u) => Some((*id, u, q.ctx_ids.clone())),
                _ => None,
            })
            .collect();
        (!v.is_empty()).then(|| v[(r % v.len() as u64) as usize].clone())
    }

    /// Requests with a side not yet ended, and which.
    pub fn unsettled(&self) -> Vec<(RequestId, String)> {
        self.live()
            .map(|(id, r)| (*id, format!("context {:?}, generation {:?}", r.ctx, r.gen)))
            .collect()
    }

    fn end(r: &Req) -> End {
        if r.gen == SideState::Done(RequestState::GenComplete) {
            End::Completed
        } else if matches!(r.ctx, SideState::Live(_)) || matches!(r.gen, SideState::Live(_)) {
            End::Unsettled
        } else if r.cancelled {
            End::Cancelled
        } else {
            End::Failed
        }
    }

    /// How the requests the client issued ended. A request still live at the end (I7) counts
    /// as failed (or cancelled): it did not complete.
    pub fn outcomes(&self) -> Outcomes {
        let mut o = Outcomes {
            issued: self.reqs.len() as u64,
            ..Outcomes::default()
        };
        for r in self.reqs.values() {
            match Self::end(r) {
                End::Completed => o.completed += 1,
                _ if r.cancelled => o.cancelled += 1,
                _ => o.failed += 1,
            }
        }
        o
    }

    /// Every request's life, for the progress check (I10).
    pub fn lifetimes(&self) -> Vec<Lifetime> {
        self.reqs
            .iter()
            .map(|(id, r)| Lifetime {
                id: *id,
                end: Self::end(r),
                arrived_us: r.arrived_us,
                ended_us: r.ended_us,
                instances: r.instances.clone(),
                refusal: r.refusal,
                first_failure: r.first_failure.clone(),
                rogue_ended: r.rogue_ended,
            })
            .collect()
    }
}
