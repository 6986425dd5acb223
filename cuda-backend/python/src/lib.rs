//! The `kvferry` Python module: `KvCacheTransceiver` with the reference transceiver's API over
//! an embedded kvferry rank (`kvferry_backends::node::embed`), its KV pool in a buffer the
//! engine owns. One concept per file: `errors` (exceptions), `config`, `layout`, `pool` (the
//! engine's host buffer, checked), `device_array` (what a tensor says of its memory, DLPack or
//! `__cuda_array_interface__`), `cuda_pool` (a CUDA tensor, checked and adopted; feature
//! `cuda`), `params` (context parameters), `status`, `request`, `transceiver`.

use pyo3::prelude::*;

mod config;
#[cfg(feature = "cuda")]
mod cuda_pool;
mod device_array;
mod errors;
mod layout;
mod params;
mod pool;
mod request;
mod status;
mod transceiver;

#[pymodule]
fn kvferry(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<transceiver::KvCacheTransceiver>()?;
    m.add_class::<layout::Layout>()?;
    m.add_class::<params::ContextParams>()?;
    m.add_class::<request::Request>()?;
    m.add_class::<status::TransferStatus>()?;
    errors::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // The config `backend` values this build takes: "cuda" needs the crate's feature `cuda`.
    let backends: &[&str] = if cfg!(feature = "cuda") {
        &["host", "cuda"]
    } else {
        &["host"]
    };
    m.add("BACKENDS", pyo3::types::PyTuple::new(m.py(), backends)?)?;
    Ok(())
}
