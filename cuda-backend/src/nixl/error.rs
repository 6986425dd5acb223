//! Errors of the NIXL engine.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum NixlError {
    #[error("NIXL runtime not found: {0} (run .ci/install-nixl, or set KVFERRY_NIXL_LIB_DIR)")]
    Runtime(String),
    #[error("NIXL {op}: {source}")]
    Call {
        op: &'static str,
        source: nixl_sys::NixlError,
    },
    #[error("NIXL: {0}")]
    Invalid(String),
    #[error("the NIXL driver thread is gone")]
    DriverGone,
}

impl NixlError {
    /// Wraps a nixl-sys error with the call that returned it.
    pub fn call(op: &'static str) -> impl FnOnce(nixl_sys::NixlError) -> NixlError {
        move |source| NixlError::Call { op, source }
    }
}
