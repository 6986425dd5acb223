//! `kvferry.ContextParams`: the opaque context parameters of one request, handed out by the
//! context side and passed by the serving layer to the generation side (in process, or as
//! bytes: `to_bytes`/`from_bytes`, and pickle). Bytes that are not kvferry's or were damaged
//! raise `ContextParamsError`; a forged token is refused by the context rank itself.

use crate::errors::{error, ContextParamsError};
use kvferry_backends::node::embed::ticket::ContextTicket;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

#[pyclass(frozen, module = "kvferry")]
#[derive(Clone, Debug)]
pub struct ContextParams {
    pub ticket: ContextTicket,
}

#[pymethods]
impl ContextParams {
    /// The encoded parameters (checked by `from_bytes`).
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.ticket.encode())
    }

    #[staticmethod]
    pub fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<ContextParams> {
        ContextTicket::decode(data)
            .map(|ticket| ContextParams { ticket })
            .map_err(|e| error::<ContextParamsError>(py, "malformed", e.to_string()))
    }

    /// The context side's request id.
    #[getter]
    fn ctx_request_id(&self) -> u64 {
        self.ticket.request.0
    }

    /// The context instance's rank 0 address.
    #[getter]
    fn ctx_address(&self) -> String {
        self.ticket.addrs[0].to_string()
    }

    /// Every context rank's address, in rank order.
    #[getter]
    fn ctx_addresses(&self) -> Vec<String> {
        self.ticket.addrs.iter().map(ToString::to_string).collect()
    }

    /// Pickle support: rebuilt through `from_bytes`, so an unpickled object is checked too.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let py = slf.py();
        let from_bytes = slf.get_type().getattr("from_bytes")?;
        let data = slf.get().to_bytes(py);
        PyTuple::new(py, [from_bytes, PyTuple::new(py, [data])?.into_any()])
    }

    fn __repr__(&self) -> String {
        format!(
            "ContextParams(ctx_request_id={}, ctx_addresses={:?}, blocks={})",
            self.ticket.request.0,
            self.ctx_addresses(),
            self.ticket.blocks.len()
        )
    }
}

/// The context parameters in `obj`: a `ContextParams` or its bytes; anything else raises.
pub fn extract(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<ContextTicket> {
    if let Ok(p) = obj.downcast::<ContextParams>() {
        return Ok(p.get().ticket.clone());
    }
    if let Ok(b) = obj.downcast::<PyBytes>() {
        return Ok(ContextParams::from_bytes(py, b.as_bytes())?.ticket);
    }
    let ty = obj.get_type().name()?;
    Err(error::<ContextParamsError>(
        py,
        "foreign",
        format!("context parameters must be kvferry.ContextParams or its bytes, not {ty}"),
    ))
}
