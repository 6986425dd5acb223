//! The world of one seed: what every task of it shares and nothing of it points back up. The
//! scenario, the checker, the fabric, the router and the mailboxes of the live ranks are
//! leaves; the world holds them and no executor, instance or agent, so an agent or a network
//! task can hold the world without a reference cycle (the cluster, above, owns the instances).
//!
//! Locks are leaves: no code holds one while it calls into a transceiver, an agent or another
//! lock's owner.

use crate::attribution::Reach;
use crate::checker::Checker;
use crate::coverage::{Coverage, Window};
use crate::fabric::Fabric;
use crate::faults::{FaultKind, FaultMix};
use crate::mailbox::{Command, Mailbox};
use crate::report::Invariant;
use crate::router::Router;
use crate::scenario::Scenario;
use crate::schedule::Script;
use crate::transfer_mode::SeedMode;
use kvferry_core::config::TransceiverConfig;
use kvferry_core::request::RequestState;
use kvferry_core::transceiver::Side;
use kvferry_core::{PeerId, RequestId};
use madsim::rand::Rng;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The instance id a rogue peer claims; no real incarnation ever gets it.
pub const ROGUE_INSTANCE: u32 = u32::MAX - 1;

/// Everything of one seed that tasks share (see the module docs).
#[derive(Debug)]
pub struct World {
    pub scenario: Scenario,
    pub tx_config: TransceiverConfig,
    pub mix: FaultMix,
    /// Push or pull, drawn for this seed (`--transfer-mode`).
    pub mode: SeedMode,
    pub checker: Arc<Mutex<Checker>>,
    /// Decides every fault draw and records the seed's schedule (`schedule`).
    pub script: Arc<Script>,
    pub fabric: Mutex<Fabric>,
    pub router: Mutex<Router>,
    stop: AtomicBool,
    /// The ranks of every live incarnation, by incarnation id: who can be reached.
    mailboxes: Mutex<BTreeMap<u32, Vec<Arc<Mailbox>>>>,
}

impl World {
    pub fn new(
        scenario: Scenario,
        mix: FaultMix,
        checker: Arc<Mutex<Checker>>,
        script: Arc<Script>,
    ) -> World {
        World {
            tx_config: scenario.tx_config(),
            mode: scenario.transfer_mode.draw(),
            router: Mutex::new(Router::new(scenario.ctx_instances, scenario.gen_instances)),
            scenario,
            mix,
            checker,
            script,
            fabric: Mutex::new(Fabric::default()),
            stop: AtomicBool::new(false),
            mailboxes: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn now_us(&self) -> u64 {
        madsim::time::TimeHandle::current().elapsed().as_micros() as u64
    }

    /// Simulated time since the seed started: the transceivers' clock.
    pub fn now(&self) -> Duration {
        Duration::from_micros(self.now_us())
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Ends the seed: every rank wakes, sees the stop and exits.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let all: Vec<Arc<Mailbox>> = {
            let m = self.mailboxes.lock().expect("mailboxes lock");
            m.values().flatten().cloned().collect()
        };
        for mb in all {
            mb.wake.ring();
        }
    }

    /// An incarnation comes up with these ranks.
    pub fn join(&self, uid: u32, ranks: Vec<Arc<Mailbox>>) {
        self.mailboxes
            .lock()
            .expect("mailboxes lock")
            .insert(uid, ranks);
    }

    /// An incarnation is gone (crashed): nothing reaches its ranks any more.
    pub fn leave(&self, uid: u32) {
        self.mailboxes.lock().expect("mailboxes lock").remove(&uid);
    }

    pub fn is_alive(&self, uid: u32) -> bool {
        self.mailboxes
            .lock()
            .expect("mailboxes lock")
            .contains_key(&uid)
    }

    /// The ranks of live incarnation `uid` (none if it is gone).
    pub fn mailboxes(&self, uid: u32) -> Vec<Arc<Mailbox>> {
        let m = self.mailboxes.lock().expect("mailboxes lock");
        m.get(&uid).cloned().unwrap_or_default()
    }

    pub fn mailbox(&self, p: PeerId) -> Option<Arc<Mailbox>> {
        let m = self.mailboxes.lock().expect("mailboxes lock");
        m.get(&p.instance)?.get(p.rank as usize).cloned()
    }

    /// Live incarnation ids, in order.
    pub fn live(&self) -> Vec<u32> {
        let m = self.mailboxes.lock().expect("mailboxes lock");
        m.keys().copied().collect()
    }

    pub fn trace(&self, track: &str, name: String) {
        let at = self.now_us();
        self.checker
            .lock()
            .expect("checker lock")
            .instant(at, track, name);
    }

    pub fn violate(&self, inv: Invariant, detail: String) {
        let at = self.now_us();
        self.checker
            .lock()
            .expect("checker lock")
            .violate(inv, at, detail);
    }

    /// Records a fault striking now and acting until `until_us` on whom `reach` says (I10).
    pub fn fault(&self, kind: FaultKind, until_us: u64, reach: Reach, detail: String) {
        let at = self.now_us();
        self.checker
            .lock()
            .expect("checker lock")
            .fault(at, kind, (until_us, reach), detail);
    }

    /// A dangerous window opened now (see `coverage`).
    pub fn window(&self, w: Window) {
        self.coverage(|c| c.hit(w));
    }

    /// Updates the seed's coverage (observation only: no trace event, no random draw).
    pub fn coverage(&self, f: impl FnOnce(&mut Coverage)) {
        f(&mut self.checker.lock().expect("checker lock").coverage);
    }

    /// When a fault lasting `span` from now stops acting: at its own end, or at the heal.
    pub fn until(&self, span: Duration) -> u64 {
        let h = &self.scenario.horizon;
        let heal = (h.heal_at() + h.fault_tick()).as_micros() as u64;
        (self.now_us() + span.as_micros() as u64).min(heal)
    }

    pub fn faults_on(&self) -> bool {
        !self.stopped() && self.now_us() < self.scenario.horizon.heal_at().as_micros() as u64
    }

    /// Whether this job's agent error strikes. Unlike `strike`, it takes a random number even
    /// at rate 0, as it always has, so that seeds keep their randomness.
    pub fn draw_agent_error(&self) -> bool {
        let on = self.faults_on();
        let drawn = on && madsim::rand::thread_rng().gen_bool(self.mix.agent_error);
        self.script
            .decide(FaultKind::AgentError, on, drawn, self.now_us())
    }

    /// Whether a fault of `kind`, at probability `p`, strikes now: the script decides (the
    /// seed's schedule, or the draw itself, recorded).
    pub fn strike(&self, kind: FaultKind, p: f64) -> bool {
        let drawn = self.draw(p);
        self.script
            .decide(kind, self.faults_on(), drawn, self.now_us())
    }

    /// How long the fault of `kind` that just struck lasts: the schedule's span, else `drawn`.
    pub fn span(&self, kind: FaultKind, drawn: Duration) -> Duration {
        let ms = drawn.as_millis() as u64;
        Duration::from_millis(self.script.span_ms(kind, ms))
    }

    pub fn draw(&self, p: f64) -> bool {
        self.faults_on() && p > 0.0 && madsim::rand::thread_rng().gen_bool(p)
    }

    /// Sends a command to every rank of live incarnation `uid`.
    pub fn command_all(&self, uid: u32, mut f: impl FnMut(usize) -> Command) {
        for (i, r) in self.mailboxes(uid).iter().enumerate() {
            r.command(f(i));
        }
    }

    /// An instance agreed a terminal state for a request (reported by each of its ranks; rank
    /// 0 speaks for the instance). The router may want the other side cancelled.
    pub fn on_terminal(&self, at: (Side, u32, u32), id: RequestId, state: RequestState) {
        let (side, uid, rank) = at;
        if rank != 0 {
            return;
        }
        let cancel_other = {
            let mut r = self.router.lock().expect("router lock");
            r.terminal(side, uid, id, state, self.now_us())
        };
        if let Some(other) = cancel_other {
            self.command_all(other, |_| Command::Cancel(id));
        }
    }
}
