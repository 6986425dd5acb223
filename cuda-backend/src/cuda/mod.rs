//! The CUDA backend (feature `cuda`): a `TransferAgent` that moves KV fragments over NVLink
//! with one gather/scatter kernel launch per submitted batch of plan legs (the device expands
//! fragments from block ids and templates, `expand`), KV pools from `cuMemAlloc` or adopted from the embedding program (`adopt`), and CUDA IPC
//! so one process can map another's pool.
//!
//! cudarc loads `libcuda` (and `libnvrtc`) at run time, so this builds without CUDA; `probe()`
//! tells a caller whether a GPU is usable without panicking.

pub mod adopt;
pub mod agent;
pub mod device;
pub mod error;
pub mod expand;
pub mod kernel;
pub mod memory;
pub mod verify;

pub use agent::{CudaAgent, CudaAgentConfig};
pub use device::{probe, Event, Gpu, Stream};
pub use error::CudaError;
pub use kernel::{compile_ptx, CopyKernel, CopyPiece, KernelConfig};
pub use memory::{DeviceBuffer, IpcHandle, IpcMapping, PinnedBuffer, PoolExport, Region};
