//! kvferry backends: the host-memory TCP node (always built) and the CUDA agent (feature `cuda`).
//!
//! The node binary runs either backend: `kvferry-node ctx|gen` keeps KV pools in host memory
//! and moves bytes over its TCP connection; built with `--features cuda`, `--backend cuda
//! --device N` puts each pool on a GPU and the gen pulls the ctx's pool over CUDA IPC
//! (usage and protocol: `node::cuda_ipc`).

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod host;
pub mod layout;
#[cfg(feature = "nixl")]
pub mod nixl;
pub mod node;
