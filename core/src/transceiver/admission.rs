//! Admission: registering requests on either side, asking context ranks for bytes, and
//! checking a peer's `RequestInfo` (token, blocks, layout) before a byte is served (I9).

use super::*;
use crate::request::ContextSource;

/// The plan of a generation request: `None` if its blocks do not pair up with the source's
/// or the two layouts cannot exchange bytes.
fn receive_plan(
    source: &ContextSource,
    req: &Request,
    layout: &CacheLayout,
) -> Option<Arc<TransferPlan>> {
    if source.blocks.len() != req.blocks.len() {
        return None;
    }
    let pairs: Vec<(u32, u32)> = source
        .blocks
        .iter()
        .zip(&req.blocks)
        .map(|(c, g)| (*c, g.id))
        .collect();
    TransferPlan::new(&source.layout, layout, &pairs)
        .ok()
        .map(Arc::new)
}

impl Transceiver {
    pub(super) fn register(&mut self, now: Duration, req: Arc<Request>, side: Side) {
        // An id registered again is live again (its old tombstone ages out of the queue).
        self.ended.forget(req.id);
        let mut timeout_keys = Vec::new();
        if let Some(ms) = self.config.kv_transfer_timeout_ms {
            timeout_keys.push(now + Duration::from_millis(ms));
        }
        if side == Side::Context {
            if let Some(ms) = self.config.kv_transfer_sender_future_timeout_ms {
                // The sender's budget rides the same wheel; `check_timeouts` tells them apart.
                timeout_keys.push(now + Duration::from_millis(ms));
            }
        }
        if self.config.inflight_cancel {
            if let Some(d) = req.deadline {
                timeout_keys.push(d.max(now));
            }
        }
        for at in &timeout_keys {
            self.timeouts.insert((*at, req.id));
        }
        self.arm_liveness(now);
        self.entries.insert(
            req.id,
            Entry {
                req,
                side,
                enqueued_at: now,
                legs: BTreeMap::new(),
                expected_legs: None,
                cause: None,
                cancelled: false,
                reported: false,
                warned: false,
                timeout_keys,
            },
        );
    }

    pub(super) fn admit(&self, req: &Request) -> Result<(), TransceiverError> {
        if req.is_terminal() {
            return Err(TransceiverError::Terminal(req.id));
        }
        let in_flight = self.entries.len();
        if in_flight >= self.config.max_in_flight {
            return Err(TransceiverError::TooManyInFlight {
                request: req.id,
                in_flight,
                limit: self.config.max_in_flight,
            });
        }
        Ok(())
    }

    /// Context side: serve `req`'s blocks to the generation ranks that ask for them.
    pub fn respond_and_send(
        &mut self,
        now: Duration,
        req: Arc<Request>,
    ) -> Result<(), TransceiverError> {
        if req.role != Role::Context {
            return Err(TransceiverError::WrongRole(req.id, req.role));
        }
        if self.entries.contains_key(&req.id) {
            return Err(TransceiverError::Duplicate(req.id));
        }
        self.admit(&req)?;
        req.advance(RequestState::ContextTransferring)
            .map_err(|_| TransceiverError::Terminal(req.id))?;
        let (id, token) = (req.id, req.token);
        self.register(now, req, Side::Context);
        let mut aborted = false;
        for parked in self.early.take(id) {
            match parked {
                Parked::Info { from, info } => self.on_request_info(now, from, info),
                Parked::Abort { token: t, .. } => {
                    aborted |=
                        self.bugs.has(Bug::AcceptAnyAbort) || t.is_some_and(|t| t.matches(token));
                }
            }
        }
        if aborted {
            self.abort_entry(now, id, FailCause::PeerAborted);
        }
        Ok(())
    }

    /// Generation side: post receives for `req` and ask every context rank for it.
    /// Calling it again for a request that is still registered does nothing (idempotent retry).
    pub fn request_and_receive(
        &mut self,
        now: Duration,
        req: Arc<Request>,
    ) -> Result<(), TransceiverError> {
        if req.role != Role::Generation {
            return Err(TransceiverError::WrongRole(req.id, req.role));
        }
        if self.entries.contains_key(&req.id) {
            return Ok(());
        }
        let source = req
            .source
            .clone()
            .ok_or(TransceiverError::NoSource(req.id))?;
        self.admit(&req)?;
        req.advance(RequestState::GenTransferring)
            .map_err(|_| TransceiverError::Terminal(req.id))?;
        let id = req.id;
        self.register(now, req.clone(), Side::Generation);
        let Some(plan) = receive_plan(&source, &req, &self.layout) else {
            tracing::warn!(request = %id, "no transfer plan between the context and this layout");
            self.abort_entry(now, id, FailCause::NoPlan);
            return Ok(());
        };
        let sources = plan.sources();
        let entry = self.entries.get_mut(&id).expect("just registered");
        entry.expected_legs = Some(sources.len());
        let remote_blocks: Vec<BlockRef> = source
            .blocks
            .iter()
            .map(|b| BlockRef { id: *b, epoch: 0 })
            .collect();
        for &src in &sources {
            let peer = PeerId {
                instance: source.instance,
                rank: src,
            };
            let leg = Leg {
                peer,
                bytes: plan.bytes_from(src),
                plan: plan.clone(),
                remote_blocks: remote_blocks.clone(),
                state: LegState::WaitingSlot {
                    since: now,
                    queued: false,
                },
            };
            entry.legs.insert(src, leg);
        }
        // A context rank this rank reads from is asked only once the receive from it is posted
        // (`try_start_leg`), so no byte can arrive before there is a job to land it; the
        // others are asked now, so that each context rank learns how many ranks to expect.
        let ask_early = self.bugs.has(Bug::AskBeforePosted);
        for rank in 0..source.layout.world_size() {
            if ask_early || !sources.contains(&rank) {
                self.ask(now, id, rank);
            }
        }
        for &src in &sources {
            self.try_start_leg(now, id, src);
        }
        self.check_finished(id);
        Ok(())
    }

    /// Generation side: sends the request's `RequestInfo` to context rank `ctx_rank`. A request
    /// whose info cannot be sent fails: that context rank would never serve it.
    pub(super) fn ask(&mut self, now: Duration, id: RequestId, ctx_rank: u32) {
        let Some(e) = self.entries.get(&id) else {
            return;
        };
        let source = e
            .req
            .source
            .as_ref()
            .expect("a generation request has a source");
        let to = PeerId {
            instance: source.instance,
            rank: ctx_rank,
        };
        let info = RequestInfo {
            request: id,
            token: e.req.token,
            gen_layout: self.layout,
            ctx_blocks: source.blocks.clone(),
            gen_blocks: e.req.blocks.clone(),
        };
        if let Err(err) = self.transmit(to, Message::RequestInfo(info)) {
            tracing::warn!(request = %id, peer = %to, error = %err, "request info not sent");
            self.abort_entry(now, id, FailCause::Unreachable);
        }
    }

    /// Answers early infos whose request has not registered within `early_info_ttl_ms`: the
    /// asking ranks fail now instead of waiting for a request this rank may never see. Early
    /// aborts of the same age are dropped.
    pub(super) fn expire_early(&mut self, now: Duration) {
        let ttl = Duration::from_millis(self.config.early_info_ttl_ms);
        for (id, parked) in self.early.expire(now, ttl) {
            for p in parked {
                if let Parked::Info { from, .. } = p {
                    self.reject(
                        from,
                        id,
                        ErrorCode::UnknownRequest,
                        "not registered here within early_info_ttl_ms",
                    );
                }
            }
        }
    }

    /// Refuses the RequestInfo of a peer that presented the request's token, and fails the
    /// request: see `on_request_info`.
    pub(super) fn refuse_and_fail(
        &mut self,
        now: Duration,
        from: PeerId,
        id: RequestId,
        code: ErrorCode,
        detail: &str,
    ) {
        self.reject(from, id, code, detail);
        self.abort_entry(now, id, FailCause::NoPlan);
    }

    pub(super) fn reject(
        &mut self,
        from: PeerId,
        request: RequestId,
        code: ErrorCode,
        detail: &str,
    ) {
        tracing::warn!(request = %request, peer = %from, ?code, detail, "refusing request info");
        self.counters.rejected += 1;
        self.emit(TxEvent::Rejected {
            peer: from,
            request,
            code,
        });
        let _ = self.transmit(
            from,
            Message::Error {
                request,
                code,
                detail: detail.to_string(),
            },
        );
    }

    /// A generation rank asks this context rank for a request's bytes.
    pub(super) fn on_request_info(&mut self, now: Duration, from: PeerId, info: RequestInfo) {
        let id = info.request;
        let Some(entry) = self.entries.get(&id) else {
            self.on_unregistered_info(now, from, info);
            return;
        };
        if entry.side != Side::Context {
            self.reject(from, id, ErrorCode::UnknownRequest, "not a context request");
            return;
        }
        if !self.bugs.has(Bug::SkipTokenCheck) && !info.token.matches(entry.req.token) {
            self.reject(from, id, ErrorCode::BadToken, "transfer token mismatch");
            return;
        }
        // Past the token check the asker is the request's own generation rank: if its info
        // cannot be served, that rank never gets its bytes, so the request fails here too
        // (it would otherwise wait for a leg that never comes; the asker, told why, fails).
        let plan = match self.plan_for(entry, &info) {
            Ok(plan) => plan,
            Err((code, detail)) => {
                self.refuse_and_fail(now, from, id, code, &detail);
                return;
            }
        };
        let gen_rank = info.gen_layout.rank();
        if entry.legs.contains_key(&gen_rank) {
            return; // a retried RequestInfo: already known
        }
        if entry.cause.is_some() || entry.cancelled {
            let detail = "request already failed here";
            self.reject(from, id, ErrorCode::Cancelled, detail);
            return;
        }
        self.add_send_leg(now, from, info, plan);
    }

    /// A `RequestInfo` for a request not registered here: answered at once if the request
    /// already ended, else parked (bounded, see `early`) until it registers.
    fn on_unregistered_info(&mut self, now: Duration, from: PeerId, info: RequestInfo) {
        let id = info.request;
        if let Some(token) = self.ended.get(id) {
            // The request ended before this peer asked (e.g. cancelled first): say so, so the
            // generation side fails now instead of waiting out its timeout. A peer without the
            // token learns nothing more than for any other request.
            let (code, detail) = if info.token.matches(token) {
                (ErrorCode::Cancelled, "request already ended here")
            } else {
                (ErrorCode::BadToken, "transfer token mismatch")
            };
            self.reject(from, id, code, detail);
            return;
        }
        let detail = match self.early.park_info(now, from, info) {
            Ok(()) => return,
            Err(Refused::Full) => "too many early requests",
            Err(Refused::PeerShare) => "this peer's early requests exceed its share",
        };
        self.reject(from, id, ErrorCode::Busy, detail);
    }

    /// The plan for a token-proven `RequestInfo`, or why it cannot be served: blocks that are
    /// not the request's, a layout that does not validate or does not fit this rank's.
    fn plan_for(
        &self,
        entry: &Entry,
        info: &RequestInfo,
    ) -> Result<Arc<TransferPlan>, (ErrorCode, String)> {
        let own: Vec<u32> = entry.req.blocks.iter().map(|b| b.id).collect();
        if info.ctx_blocks != own || info.gen_blocks.len() != own.len() {
            let detail = "blocks are not the request's".to_string();
            return Err((ErrorCode::ForeignBlocks, detail));
        }
        // The layout came off the wire: validate it before any arithmetic on its fields.
        if let Err(e) = info.gen_layout.validate() {
            let detail = format!("invalid generation layout: {e}");
            return Err((ErrorCode::Layout, detail));
        }
        let pairs: Vec<(u32, u32)> = own
            .iter()
            .zip(&info.gen_blocks)
            .map(|(c, g)| (*c, g.id))
            .collect();
        TransferPlan::new(&self.layout, &info.gen_layout, &pairs)
            .map(Arc::new)
            .map_err(|e| (ErrorCode::Layout, e.to_string()))
    }

    /// Records the leg serving a generation rank and starts it (a leg with no bytes from
    /// this rank is done at once).
    fn add_send_leg(
        &mut self,
        now: Duration,
        from: PeerId,
        info: RequestInfo,
        plan: Arc<TransferPlan>,
    ) {
        let id = info.request;
        let gen_rank = info.gen_layout.rank();
        let bytes = plan.bytes_from(self.me.rank);
        let entry = self.entries.get_mut(&id).expect("checked by the caller");
        entry.expected_legs = Some(info.gen_layout.world_size() as usize);
        let state = if bytes == 0 {
            LegState::Done
        } else {
            LegState::WaitingSlot {
                since: now,
                queued: false,
            }
        };
        let leg = Leg {
            peer: from,
            bytes,
            plan,
            remote_blocks: info.gen_blocks,
            state,
        };
        entry.legs.insert(gen_rank, leg);
        if bytes > 0 {
            self.try_start_leg(now, id, gen_rank);
        }
        self.check_finished(id);
    }
}
