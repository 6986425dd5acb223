//! The ctx's parked sends, and who may end one by NIXL notification: only the NIXL agent the
//! gen's connection announced (`NixlAgent`), naming the send's transfer, request and token.
//! Any agent that holds the ctx's metadata can send it a notification, so a stranger with a
//! guessed or stolen token must not unpark a send (its blocks would be reused under the
//! gen's READ). The table is kept apart from NIXL and the connection so this is unit-tested.

use super::notice::Notice;
use kvferry_core::agent::{AgentError, CompletionQueue, TransferId};
use kvferry_core::{PeerId, RequestId, TransferToken};
use std::collections::HashMap;

/// Bound on an announced agent name (ours are about 40 bytes); longer ones are refused.
pub const MAX_AGENT_NAME: usize = 128;

#[derive(Debug)]
pub struct Parked {
    pub request: RequestId,
    pub token: TransferToken,
    pub to: PeerId,
    pub bytes: u64,
    pub done: CompletionQueue,
    pub cancelled: bool,
}

/// Why a notification ended nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not an encoded `Notice`.
    Foreign,
    /// No parked send has that transfer, request and token.
    NoSuchSend,
    /// The send's gen announced another agent (or none).
    WrongAgent,
}

#[derive(Debug, Default)]
pub struct ParkedSends {
    /// By the send job's id (the `transfer` of its `NixlReady`). Bounded by the core's jobs
    /// in flight.
    parked: HashMap<TransferId, Parked>,
    /// The NIXL agent each gen connection announced. Bounded by the node's connections.
    agents: HashMap<PeerId, String>,
}

impl ParkedSends {
    /// Binds `peer`'s connection to its NIXL agent `name` (its first announcement holds: a
    /// second one on the same connection is refused).
    pub fn bind_agent(&mut self, peer: PeerId, name: String) -> Result<(), String> {
        let printable = name.bytes().all(|b| b.is_ascii_graphic());
        if name.is_empty() || name.len() > MAX_AGENT_NAME || !printable {
            return Err(format!("agent name of {} bytes refused", name.len()));
        }
        match self.agents.get(&peer) {
            Some(known) if *known != name => Err(format!("{peer} already announced {known}")),
            Some(_) => Ok(()),
            None => {
                self.agents.insert(peer, name);
                Ok(())
            }
        }
    }

    /// Parks a send to `p.to`; refused when that gen announced no agent (no notification
    /// could ever end it) or when `id` is already parked.
    pub fn park(&mut self, id: TransferId, p: Parked) -> Result<(), AgentError> {
        if !self.agents.contains_key(&p.to) {
            let why = format!("{} announced no NIXL agent", p.to);
            return Err(AgentError::Backend(why));
        }
        if self.parked.contains_key(&id) {
            return Err(AgentError::Backend(format!("{id:?} already parked")));
        }
        self.parked.insert(id, p);
        Ok(())
    }

    /// Ends the send a notification from `agent` names, if it has the authority to.
    pub fn on_notification(
        &mut self,
        agent: &str,
        bytes: &[u8],
    ) -> Result<(TransferId, Parked), Refused> {
        let n = Notice::parse(bytes).ok_or(Refused::Foreign)?;
        let p = self.parked.get(&n.transfer).ok_or(Refused::NoSuchSend)?;
        if p.request != n.request || p.token != n.token {
            return Err(Refused::NoSuchSend);
        }
        if self.agents.get(&p.to).map(String::as_str) != Some(agent) {
            return Err(Refused::WrongAgent);
        }
        Ok((n.transfer, self.parked.remove(&n.transfer).expect("found")))
    }

    /// Ends the send `id` if the gen `from` may (its `NixlFailed` came on its own connection).
    pub fn take_failed(
        &mut self,
        id: TransferId,
        from: PeerId,
        request: RequestId,
    ) -> Option<Parked> {
        let p = self.parked.get(&id)?;
        (p.to == from && p.request == request).then(|| self.parked.remove(&id).expect("found"))
    }

    /// `peer`'s connection is gone: its sends, and its agent binding.
    pub fn take_peer(&mut self, peer: PeerId) -> Vec<(TransferId, Parked)> {
        self.agents.remove(&peer);
        let ids: Vec<TransferId> = self
            .parked
            .iter()
            .filter(|(_, p)| p.to == peer)
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .map(|id| (id, self.parked.remove(&id).expect("listed")))
            .collect()
    }

    /// Marks a send cancelled; it still ends only as any other does.
    pub fn cancel(&mut self, id: TransferId) {
        if let Some(p) = self.parked.get_mut(&id) {
            p.cancelled = true;
        }
    }

    pub fn take_all(&mut self) -> Vec<(TransferId, Parked)> {
        self.parked.drain().collect()
    }

    /// Sends parked now.
    pub fn count(&self) -> usize {
        self.parked.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEN: PeerId = PeerId {
        instance: 7,
        rank: 0,
    };
    const OTHER_GEN: PeerId = PeerId {
        instance: 8,
        rank: 0,
    };

    fn parked(to: PeerId, token: u128) -> Parked {
        Parked {
            request: RequestId(5),
            token: TransferToken(token),
            to,
            bytes: 64,
            done: CompletionQueue::new(4),
            cancelled: false,
        }
    }

    fn notice(token: u128, transfer: u64) -> Vec<u8> {
        let n = Notice {
            request: RequestId(5),
            token: TransferToken(token),
            transfer: TransferId(transfer),
        };
        n.encode()
    }

    #[test]
    fn only_the_announced_agent_with_the_token_ends_a_send() {
        let mut t = ParkedSends::default();
        t.bind_agent(GEN, "gen-a".into()).unwrap();
        t.bind_agent(OTHER_GEN, "gen-b".into()).unwrap();
        t.park(TransferId(1), parked(GEN, 0xabc)).unwrap();
        // Another agent, even one a connection announced, holding the right token: refused.
        let right = notice(0xabc, 1);
        assert_eq!(
            t.on_notification("gen-b", &right).unwrap_err(),
            Refused::WrongAgent
        );
        assert_eq!(
            t.on_notification("stranger", &right).unwrap_err(),
            Refused::WrongAgent
        );
        // The right agent with a wrong token or transfer, or garbage: refused.
        let wrong = notice(0xabd, 1);
        assert_eq!(
            t.on_notification("gen-a", &wrong).unwrap_err(),
            Refused::NoSuchSend
        );
        let elsewhere = notice(0xabc, 2);
        assert_eq!(
            t.on_notification("gen-a", &elsewhere).unwrap_err(),
            Refused::NoSuchSend
        );
        assert_eq!(
            t.on_notification("gen-a", b"hi").unwrap_err(),
            Refused::Foreign
        );
        assert_eq!(t.count(), 1, "nothing refused ended the send");
        let (id, p) = t.on_notification("gen-a", &right).unwrap();
        assert_eq!((id, p.to, p.bytes), (TransferId(1), GEN, 64));
        assert_eq!(t.count(), 0);
        // Once ended, the same notification ends nothing.
        assert_eq!(
            t.on_notification("gen-a", &right).unwrap_err(),
            Refused::NoSuchSend
        );
    }

    #[test]
    fn a_connection_keeps_its_first_agent_and_loses_it_with_the_connection() {
        let mut t = ParkedSends::default();
        assert!(
            t.park(TransferId(1), parked(GEN, 1)).is_err(),
            "no agent yet"
        );
        assert!(t.bind_agent(GEN, String::new()).is_err());
        assert!(t.bind_agent(GEN, "a b".into()).is_err());
        assert!(t.bind_agent(GEN, "x".repeat(MAX_AGENT_NAME + 1)).is_err());
        t.bind_agent(GEN, "gen-a".into()).unwrap();
        t.bind_agent(GEN, "gen-a".into()).unwrap();
        assert!(t.bind_agent(GEN, "gen-evil".into()).is_err());
        t.park(TransferId(1), parked(GEN, 1)).unwrap();
        assert!(
            t.park(TransferId(1), parked(GEN, 1)).is_err(),
            "parked twice"
        );
        let lost = t.take_peer(GEN);
        assert_eq!(lost.len(), 1);
        assert!(
            t.park(TransferId(2), parked(GEN, 1)).is_err(),
            "binding gone"
        );
        // A failure from another connection ends nothing.
        t.bind_agent(GEN, "gen-a2".into()).unwrap();
        t.park(TransferId(3), parked(GEN, 1)).unwrap();
        assert!(t
            .take_failed(TransferId(3), OTHER_GEN, RequestId(5))
            .is_none());
        assert!(t.take_failed(TransferId(3), GEN, RequestId(5)).is_some());
    }
}
