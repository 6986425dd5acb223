//! A `TransceiverConfig` from a Python mapping with the reference's field names
//! (`max_tokens_in_buffer`, `kv_transfer_timeout_ms`, `kv_transfer_sender_future_timeout_ms`,
//! ...): through JSON, so the core's own parser rejects unknown fields and names the bad one.
//! `backend` is "host" (numpy pools) or, in a build with feature `cuda`, "cuda" (CUDA tensors).

use crate::errors::{error, ConfigError};
use kvferry_core::config::{Backend, TransceiverConfig};
use pyo3::prelude::*;
use pyo3::types::PyDict;

pub fn from_py(py: Python<'_>, config: Option<&Bound<'_, PyAny>>) -> PyResult<TransceiverConfig> {
    let Some(config) = config.filter(|c| !c.is_none()) else {
        return Ok(TransceiverConfig::default());
    };
    let dict = PyDict::new(py);
    dict.call_method1("update", (config,)).map_err(|e| {
        error::<ConfigError>(
            py,
            "type",
            format!("config must be a mapping of field names: {e}"),
        )
    })?;
    let json: String = py
        .import("json")?
        .call_method1("dumps", (dict,))?
        .extract()?;
    let c = TransceiverConfig::from_json_str(&json).map_err(|e| {
        let reason = match &e {
            kvferry_core::config::ConfigError::Invalid { field, .. } => *field,
            _ => "config",
        };
        error::<ConfigError>(py, reason, e.to_string())
    })?;
    match c.backend {
        Backend::Host => Ok(c),
        #[cfg(feature = "cuda")]
        Backend::Cuda => Ok(c),
        b => Err(error::<ConfigError>(
            py,
            "backend",
            format!("backend {b:?} is not in this build of the package; use \"host\""),
        )),
    }
}
