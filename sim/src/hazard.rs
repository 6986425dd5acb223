//! The fault kinds each field-hazard scenario forces on (each is one historical failure of a
//! peer system, named after it): the faults that open the hazard's window in every seed.

/// Fault kinds a scenario turns on in every seed (the swarm draw leaves the others to chance).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Forced {
    pub crash: bool,
    pub partition: bool,
    pub latency: bool,
    pub agent_error: bool,
    pub client_cancel: bool,
    pub evict: bool,
    pub lost_notification: bool,
}

impl Forced {
    pub fn of(scenario: &str) -> Forced {
        let none = Forced::default();
        match scenario {
            // An abort while the write is in flight (SGLang #24527); an aborted push whose
            // blocks must still be reclaimed (vLLM #46283).
            "abort-during-write" | "abort-never-reclaimed" => Forced {
                client_cancel: true,
                latency: true,
                ..none
            },
            // A failed transfer must never be served (vLLM #52234).
            "failed-transfer-served" => Forced {
                agent_error: true,
                ..none
            },
            // Slow reads that outlast the context side's deadline (vLLM #21570).
            "timeout-frees-while-reading" => Forced {
                partition: true,
                latency: true,
                ..none
            },
            // One lost completion notification (TensorRT-LLM #17665).
            "lost-notification" => Forced {
                lost_notification: true,
                ..none
            },
            // Blocks evicted before their async send (TensorRT-LLM #12542).
            "evicted-before-send" => Forced {
                evict: true,
                ..none
            },
            // A peer restarting behind the same endpoint (vLLM #49238).
            "stale-endpoint" => Forced {
                crash: true,
                ..none
            },
            _ => none,
        }
    }
}
