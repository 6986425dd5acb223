//! `kvferry.TransferStatus`: how one request ended. When the engine sees it, the request's
//! blocks are its own again (no transfer pins them any more).

use kvferry_backends::node::embed::outcomes::Outcome;
use kvferry_core::request::RequestState;
use pyo3::prelude::*;

#[pyclass(frozen, module = "kvferry")]
#[derive(Clone, Debug)]
pub struct TransferStatus {
    #[pyo3(get)]
    request_id: u64,
    /// "complete", "error" or "cancelled".
    #[pyo3(get)]
    state: &'static str,
    /// The core's cause of a failure ("timeout", "unreachable", "peer-aborted", ...).
    #[pyo3(get)]
    reason: Option<&'static str>,
    #[pyo3(get)]
    detail: Option<String>,
}

impl From<Outcome> for TransferStatus {
    fn from(o: Outcome) -> TransferStatus {
        let state = match o.state {
            RequestState::ContextComplete | RequestState::GenComplete => "complete",
            RequestState::Cancelled => "cancelled",
            _ => "error",
        };
        TransferStatus {
            request_id: o.id.0,
            state,
            reason: o.cause.map(|c| c.name()),
            detail: o.detail,
        }
    }
}

#[pymethods]
impl TransferStatus {
    /// True when every byte moved.
    #[getter]
    fn ok(&self) -> bool {
        self.state == "complete"
    }

    fn __repr__(&self) -> String {
        format!(
            "TransferStatus(request_id={}, state={:?}, reason={:?}, detail={:?})",
            self.request_id, self.state, self.reason, self.detail
        )
    }
}
