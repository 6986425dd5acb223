//! The NIXL transfer engine (feature `nixl`): host or device memory (`memory`) moved by NIXL over UCX, driven from a
//! thread of its own. It knows nothing of the node (`node::nixl_host` builds the agents the core
//! sees on top of it), so it imports nothing of the crate.
//!
//! NIXL's behaviour shapes it (measured, see `/work/shared/NIXL.md` and DESIGN.md):
//! posting may do the whole copy inside the call, so posting and polling happen on the
//! driver thread (`driver`), never inside a core call; dropping an in-flight request does not
//! cancel it, so a cancelled job stays in the job table (`jobs`) until NIXL reports a terminal
//! status; deregistration is not a fence, so teardown drains to terminal within a bound and
//! leaks the registration and its memory when the bound passes.

pub mod driver;
pub mod engine;
pub mod error;
pub mod jobs;
pub mod md;
pub mod memory;
pub mod pool;
pub mod probe;
pub mod runtime;
pub mod ucx;

pub use driver::{Driver, Read};
pub use engine::{Engine, XferState};
pub use error::NixlError;
pub use memory::PoolMemory;
pub use pool::HostPool;
