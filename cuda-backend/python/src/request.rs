//! `kvferry.Request`: what the transceiver needs of an engine's request. Any object with the
//! same attributes will do (`request_id`, `block_ids`, and on the generation side
//! `context_params`), so an engine may pass its own request objects.

use crate::errors::{error, RequestError};
use pyo3::prelude::*;

#[pyclass(module = "kvferry")]
#[derive(Debug)]
pub struct Request {
    #[pyo3(get, set)]
    request_id: u64,
    /// The request's blocks in the engine's pool, in token order.
    #[pyo3(get, set)]
    block_ids: Vec<u32>,
    #[pyo3(get, set)]
    context_params: Option<PyObject>,
}

#[pymethods]
impl Request {
    #[new]
    #[pyo3(signature = (request_id, block_ids, context_params = None))]
    fn new(request_id: u64, block_ids: Vec<u32>, context_params: Option<PyObject>) -> Request {
        Request {
            request_id,
            block_ids,
            context_params,
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "Request(request_id={}, block_ids=[{} blocks])",
            self.request_id,
            self.block_ids.len()
        )
    }
}

/// `request_id` and `block_ids` of any request-like object.
pub fn id_and_blocks(py: Python<'_>, req: &Bound<'_, PyAny>) -> PyResult<(u64, Vec<u32>)> {
    let attr = |name: &str| {
        req.getattr(name).map_err(|_| {
            let msg = format!("a request needs a `{name}` attribute");
            error::<RequestError>(py, "not-a-request", msg)
        })
    };
    let id = attr("request_id")?
        .extract()
        .map_err(|e| error::<RequestError>(py, "not-a-request", format!("request_id: {e}")))?;
    let blocks = attr("block_ids")?
        .extract()
        .map_err(|e| error::<RequestError>(py, "not-a-request", format!("block_ids: {e}")))?;
    Ok((id, blocks))
}
