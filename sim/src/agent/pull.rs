//! Pull mode, the shape of the CUDA IPC and NIXL nodes: the context side checks the token and
//! pins (the core does both before it submits the send), then *parks* its send; the generation
//! side's receive job reads the context rank's blocks chunk by chunk and tells the context side
//! "finished" once every byte is read. The parked send completes on that notification, on the
//! reader's loss (`peer_crashed`), or on cancel; a cancel completes only once no read of its
//! blocks is in flight (the send's `busy` counts the reads), so its completion is still the
//! fence that lets the core unpin (I5, reading direction: `read_check`).

use super::*;

/// How often a reader looks for the context side's parked send (the CUDA node's `PullReady`,
/// NIXL's metadata), and for a peer restarting behind a cached endpoint.
pub const PULL_POLL: Duration = Duration::from_micros(200);

/// Where a reader reads a chunk from.
enum Source {
    /// The context rank's parked send of the request to this reader: token checked, pinned.
    Parked {
        agent: Arc<AgentInner>,
        send: TransferId,
        blocks: Vec<BlockRef>,
    },
    /// Whatever answers at a crashed peer's cached endpoint (the `stale-endpoint` bug).
    Stale { agent: Arc<AgentInner> },
}

impl AgentRegistry {
    pub(super) fn remember_endpoint(&self, p: PeerId, track: &str) {
        let mut m = self.endpoints.lock().expect("registry lock");
        m.insert(p, track.to_string());
    }

    /// Live agents of another incarnation at `p`'s endpoint: `p`'s restarted successor.
    fn at_endpoint(&self, p: PeerId) -> Option<Arc<AgentInner>> {
        let m = self.endpoints.lock().expect("registry lock");
        let track = m.get(&p)?.clone();
        let peers: Vec<PeerId> = m
            .iter()
            .filter(|(q, t)| **t == track && **q != p)
            .map(|(q, _)| *q)
            .collect();
        drop(m);
        peers.into_iter().find_map(|q| self.agents_of(q).pop())
    }

    /// `from`'s parked send of `request` to `to` that still admits reads (a wedged one never
    /// does: it waits for its cancel, like a wedged push that never starts).
    fn parked_send(&self, from: PeerId, request: RequestId, to: PeerId) -> Option<Source> {
        self.agents_of(from).into_iter().find_map(|agent| {
            let found = {
                let jobs = agent.jobs.lock().expect("agent jobs lock");
                jobs.iter()
                    .find(|(_, j)| {
                        j.request == request
                            && j.direction == Direction::Send { to }
                            && !j.cancelling
                            && !j.wedged
                    })
                    .map(|(send, j)| (*send, j.local.clone()))
            };
            found.map(|(send, blocks)| Source::Parked {
                agent,
                send,
                blocks,
            })
        })
    }
}

impl AgentInner {
    /// The `stale-endpoint` bug: a reader reaches its peer by endpoint, not by incarnation.
    pub(super) fn stale_endpoint(&self) -> bool {
        self.world.mode == SeedMode::Pull && self.world.scenario.bugs.has(Bug::StaleEndpoint)
    }

    /// The `timeout-frees-while-reading` bug: cancelling parked send `id` does not wait for
    /// the reads in flight.
    pub(super) fn cancel_skips_reads(&self, id: TransferId) -> bool {
        self.world.mode == SeedMode::Pull
            && self.world.scenario.bugs.has(Bug::TimeoutFreesWhileReading)
            && self
                .jobs
                .lock()
                .expect("agent jobs lock")
                .get(&id)
                .is_some_and(|j| matches!(j.direction, Direction::Send { .. }))
    }

    /// Reader side: the whole receive job, chunk by chunk, then "finished" to the source.
    pub(super) async fn run_pull(self: Arc<Self>, id: TransferId, job: TransferJob, from: PeerId) {
        let mut last = None;
        for chunk in chunks_of(&job, from.rank) {
            let Some(src) = self
                .wait_source(id, job.request, from, last.is_some())
                .await
            else {
                return;
            };
            if !self.read_chunk(id, job.request, from, &src, chunk).await {
                return;
            }
            last = Some(src);
        }
        if let Some(Source::Parked { agent, send, .. }) = last {
            self.notify_finished(agent, send, job.request, from);
        }
    }

    /// The source of the next chunk, once there is one and the last chunk left the staging
    /// slot; `None` if this job is over (then it has completed or is being cancelled). A pull whose parked send went away after the
    /// first chunk was revoked by the context side.
    async fn wait_source(
        &self,
        id: TransferId,
        request: RequestId,
        from: PeerId,
        started: bool,
    ) -> Option<Source> {
        loop {
            let busy = match self.jobs.lock().expect("agent jobs lock").get(&id) {
                Some(j) if !j.cancelling => j.busy,
                _ => return None,
            };
            if !self.alive() {
                return None;
            }
            if busy > 0 {
                // The last chunk is still being scattered out of the staging slot, which the
                // next one would overwrite.
                madsim::time::sleep(PULL_POLL).await;
                continue;
            }
            if let Some(src) = self.registry.parked_send(from, request, self.me) {
                return Some(src);
            }
            let gone = !self.world.is_alive(from.instance);
            if gone && self.stale_endpoint() {
                if let Some(agent) = self.registry.at_endpoint(from) {
                    return Some(Source::Stale { agent });
                }
            } else if gone || started {
                let err = if gone {
                    AgentError::PeerUnreachable(from)
                } else {
                    AgentError::Rejected("the context side ended the pull".into())
                };
                self.finish(id, Err(err));
                return None;
            }
            madsim::time::sleep(PULL_POLL).await;
        }
    }

    /// One READ of `chunk` from `src`: in flight for the wire time (and while partitioned),
    /// its bytes taken when it completes, then landed like a pushed chunk. False if the job
    /// is over.
    async fn read_chunk(
        self: &Arc<Self>,
        id: TransferId,
        request: RequestId,
        from: PeerId,
        src: &Source,
        chunk: Vec<Fragment>,
    ) -> bool {
        let agent = match src {
            Source::Parked { agent, .. } | Source::Stale { agent } => agent.clone(),
        };
        let checked = match src {
            Source::Parked { send, blocks, .. } => {
                agent.reads(*send, 1);
                agent.check_read(&self.track, (id, request), blocks, &chunk);
                Some((*send, blocks))
            }
            Source::Stale { .. } => None,
        };
        let len: usize = chunk.iter().map(|f| f.len as usize).sum();
        let spike = self.world.fabric.lock().expect("fabric lock").spike_us;
        let wire = rand_us(DATA_LATENCY_US)
            + Duration::from_micros(spike + len as u64 * NS_PER_BYTE / 1000);
        madsim::time::sleep(wire).await;
        // A READ stalled by a partition waits for the heal, unless either end died meanwhile
        // (a silent death never heals): then it is over and no longer holds the source's send.
        if self.partitioned_from(from) {
            self.world.window(Window::PartitionDuringPull);
        }
        while self.alive() && agent.alive() && self.partitioned_from(from) {
            madsim::time::sleep(PARTITION_POLL).await;
        }
        let mut bytes = vec![0u8; len];
        if self.alive() && agent.alive() {
            if let Some((_, blocks)) = checked {
                // The READ completes now: a block freed or reused meanwhile was read stale.
                agent.check_read(&self.track, (id, request), blocks, &chunk);
            }
            let mem = agent.memory.lock().expect("memory lock");
            let mut at = 0usize;
            for f in &chunk {
                mem.read(f.src_offset, &mut bytes[at..at + f.len as usize]);
                at += f.len as usize;
            }
        }
        if let Some((send, _)) = checked {
            agent.reads(send, -1);
        }
        self.alive() && agent.alive() && self.land(request, from, chunk, bytes)
    }

    fn partitioned_from(&self, peer: PeerId) -> bool {
        let f = self.world.fabric.lock().expect("fabric lock");
        f.blocked(self.me, peer) || f.blocked(peer, self.me)
    }

    /// Parked send `send` gains (`+1`) or loses (`-1`) a read in flight.
    fn reads(&self, send: TransferId, delta: i32) {
        if let Some(j) = self.jobs.lock().expect("agent jobs lock").get_mut(&send) {
            j.busy = j.busy.saturating_add_signed(delta);
        }
    }

    /// Tells the source its blocks are read: the notification travels like a message, and the
    /// `lost-notification` fault drops it.
    fn notify_finished(
        self: &Arc<Self>,
        agent: Arc<AgentInner>,
        send: TransferId,
        request: RequestId,
        from: PeerId,
    ) {
        let me = self.clone();
        madsim::task::spawn(async move {
            madsim::time::sleep(rand_us(DATA_LATENCY_US)).await;
            while me.alive() && agent.alive() && me.partitioned_from(from) {
                madsim::time::sleep(PARTITION_POLL).await;
            }
            if !me.alive() {
                return; // the source learns of the reader's loss instead
            }
            if me
                .world
                .strike(FaultKind::LostNotification, me.world.mix.lost_notification)
            {
                let detail = format!("{}: \"finished\" of {request} to {from} lost", me.track);
                me.world.fault(
                    FaultKind::LostNotification,
                    me.world.now_us(),
                    Reach::Request(request),
                    detail,
                );
                return;
            }
            let expected = agent
                .jobs
                .lock()
                .expect("agent jobs lock")
                .get(&send)
                .map(|j| j.expected);
            if let Some(bytes) = expected {
                agent.finish(send, Ok(bytes));
            }
        });
    }
}
