//! The package's exceptions. Every one is a `KvFerryError` and carries `reason`: a stable short
//! name of the core's or the driver's typed reason (`id-in-use`, `blocks`, `wrong-side`, a
//! config field, ...), so an engine can branch on it without parsing messages.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    kvferry,
    KvFerryError,
    PyException,
    "Base of every kvferry error; `reason` names why."
);
create_exception!(
    kvferry,
    ConfigError,
    KvFerryError,
    "A config or layout that does not validate."
);
create_exception!(
    kvferry,
    PoolError,
    KvFerryError,
    "A KV pool buffer that does not fit the layout."
);
create_exception!(
    kvferry,
    RequestError,
    KvFerryError,
    "A request the transceiver refused."
);
create_exception!(
    kvferry,
    ContextParamsError,
    KvFerryError,
    "Context parameters that are not kvferry's, or damaged."
);
create_exception!(
    kvferry,
    ClosedError,
    KvFerryError,
    "The transceiver is closed."
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("KvFerryError", py.get_type::<KvFerryError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("PoolError", py.get_type::<PoolError>())?;
    m.add("RequestError", py.get_type::<RequestError>())?;
    m.add("ContextParamsError", py.get_type::<ContextParamsError>())?;
    m.add("ClosedError", py.get_type::<ClosedError>())?;
    Ok(())
}

/// An exception of type `E` with `message` and its `reason` attribute set.
pub fn error<E: pyo3::PyTypeInfo>(py: Python<'_>, reason: &str, message: String) -> PyErr {
    let err = PyErr::new::<E, _>(message);
    // Setting an attribute on a fresh exception instance cannot fail but for memory.
    let _ = err.value(py).setattr("reason", reason);
    err
}

/// A command the driver refused, as the exception the engine sees.
pub fn command(py: Python<'_>, e: kvferry_backends::node::embed::command::CommandError) -> PyErr {
    use kvferry_backends::node::embed::command::CommandError;
    match e {
        CommandError::Closed => error::<ClosedError>(py, "closed", e.to_string()),
        e => error::<RequestError>(py, e.reason(), e.to_string()),
    }
}
