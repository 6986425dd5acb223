//! Host-memory backend: KV blocks in host buffers, bytes carried over the node's TCP links as
//! `Message::Data` frames, behind the same `TransferAgent` trait as the CUDA agent.

pub mod agent;
mod early;
pub mod kv;
pub mod landing;
pub mod pattern;
#[cfg(test)]
mod send_tests;

pub use agent::{DataError, HostAgent, DATA_CHUNK};
pub use kv::HostKv;
pub use landing::{LandError, Landing};
