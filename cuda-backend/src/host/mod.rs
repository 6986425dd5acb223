//! Host-memory backend: KV blocks in host buffers, bytes carried over the node's TCP links as
//! `Message::Data` frames, behind the same `TransferAgent` trait as the CUDA agent.
//!
//! It reaches connections only through `route::DataRoutes` (the node implements it): this
//! module never imports `node`.

pub mod agent;
mod early;
mod iov;
pub mod kv;
pub mod landing;
pub mod pattern;
pub mod route;
#[cfg(test)]
mod send_tests;

pub use agent::{DataError, HostAgent, DATA_CHUNK};
pub use iov::copy_into;
pub use kv::HostKv;
pub use landing::{LandError, Landing};
pub use route::{DataOut, DataRoutes};
