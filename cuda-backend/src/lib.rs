//! kvferry backends: the host-memory TCP node (always built) and the CUDA agent (feature `cuda`).

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod host;
pub mod node;
