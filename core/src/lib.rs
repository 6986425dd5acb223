//! kvferry-core: sans-IO state machines that move a request's KV cache from a context
//! (prefill) instance to a generation (decode) instance.
//!
//! Nothing in this crate sleeps, spawns, reads a clock or touches a socket: drivers (the madsim
//! simulator, the tokio node, the CUDA agent) feed it events and the current time.
//! See ARCHITECTURE.md at the repository root for the map.

pub mod agent;
pub mod blocks;
pub mod bugs;
pub mod collective;
pub mod config;
pub mod ids;
pub mod layout;
pub mod loopback;
pub mod plan;
pub mod request;
pub mod staging;
pub mod transceiver;
pub mod wire;

pub use ids::{PeerId, RequestId, TransferToken};
