//! `kvferry.KvCacheTransceiver`: the reference transceiver's API over an embedded instance
//! (every TP rank of the layout, one pool each, in this process).
//! Every call returns at once (the driver thread does the I/O and answers commands without
//! waiting on the network); the status checks wait only when asked to (`at_least`), with the
//! GIL released and Ctrl-C honoured.

use crate::errors::{command, error, ClosedError, ConfigError, KvFerryError};
use crate::layout::Layout;
use crate::params::{self, ContextParams};
use crate::pool::{lend, lend_ranks, LentPool};
use crate::request::id_and_blocks;
use crate::status::TransferStatus;
use kvferry_backends::node::embed::handle::{EmbedSpec, EmbeddedInstance};
use kvferry_backends::node::spec::NodeSpec;
use kvferry_core::config::TransceiverConfig;
use kvferry_core::transceiver::Side;
use kvferry_core::RequestId;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a status wait runs between checks for Python signals (Ctrl-C).
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// The instance and the engine memory it works on (a pool per rank); dropped instance first,
/// so the driver thread is joined before the buffers are released.
#[derive(Debug)]
struct Open {
    rank: EmbeddedInstance,
    pools: Vec<LentPool>,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.rank.close();
        if self.pools.iter().any(|p| p.kv.is_shared()) {
            // Something still points into a buffer (it cannot, once the driver is joined;
            // this guards the guarantee): keep the buffers exported for ever rather than free
            // them.
            std::mem::forget(std::mem::take(&mut self.pools));
        }
    }
}

#[pyclass(frozen, module = "kvferry")]
#[derive(Debug)]
pub struct KvCacheTransceiver {
    /// `None` once closed; shared so one thread may wait for statuses while another closes.
    open: Mutex<Option<Arc<Open>>>,
    side: Side,
    layout: Layout,
    /// Rank 0's bound address (context side).
    listening: Option<String>,
}

fn side_of(py: Python<'_>, role: &str) -> PyResult<Side> {
    match role {
        "context" | "ctx" => Ok(Side::Context),
        "generation" | "gen" => Ok(Side::Generation),
        _ => Err(error::<ConfigError>(
            py,
            "role",
            format!("role {role:?} is not \"context\" or \"generation\""),
        )),
    }
}

/// Checks and lends `pool` for the configured backend, one per rank: host buffers, or
/// (feature `cuda`, TP1 only) a CUDA tensor.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn lend_for(
    py: Python<'_>,
    config: &TransceiverConfig,
    pool: &Bound<'_, PyAny>,
    layout: &Layout,
) -> PyResult<Vec<LentPool>> {
    #[cfg(feature = "cuda")]
    if config.backend == kvferry_core::config::Backend::Cuda {
        if layout.tp_size != 1 {
            // Several ranks' CUDA pools in one process are untested over CUDA IPC (the
            // ranks of a CUDA instance would each export and map pools): refused, not guessed.
            let msg = "backend \"cuda\" serves tp_size 1; use backend \"host\" for tp_size > 1";
            return Err(error::<ConfigError>(py, "tp_size", msg.into()));
        }
        return Ok(vec![crate::cuda_pool::lend_cuda(py, pool, layout)?]);
    }
    lend_ranks(py, pool, layout, |p| lend(py, p, layout))
}

impl KvCacheTransceiver {
    fn open(&self, py: Python<'_>) -> PyResult<Arc<Open>> {
        self.open
            .lock()
            .expect("open lock")
            .clone()
            .ok_or_else(|| error::<ClosedError>(py, "closed", "the transceiver is closed".into()))
    }

    fn on_side(&self, py: Python<'_>, side: Side, call: &str) -> PyResult<()> {
        if self.side == side {
            return Ok(());
        }
        let msg = format!(
            "{call} belongs to the other side; this is a {:?} transceiver",
            self.side
        );
        Err(error::<crate::errors::RequestError>(py, "wrong-side", msg))
    }

    /// Statuses on `side`, waiting for at least `at_least` (see `Outcomes::take`).
    fn statuses(
        &self,
        py: Python<'_>,
        side: Side,
        at_least: Option<usize>,
        timeout_ms: Option<u64>,
        call: &str,
    ) -> PyResult<Vec<TransferStatus>> {
        self.on_side(py, side, call)?;
        let open = self.open(py)?;
        let at_least = at_least.unwrap_or(0);
        let deadline = timeout_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
        let mut got = Vec::new();
        loop {
            let need = at_least.saturating_sub(got.len());
            let slice = deadline.map_or(SIGNAL_CHECK, |d| {
                d.saturating_duration_since(Instant::now())
                    .min(SIGNAL_CHECK)
            });
            got.extend(py.allow_threads(|| open.rank.take(need, Some(slice))));
            let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
            let nothing_to_come = open.rank.pending() == 0 || open.rank.is_closed();
            if got.len() >= at_least || timed_out || nothing_to_come {
                break;
            }
            py.check_signals()?;
        }
        Ok(got.into_iter().map(TransferStatus::from).collect())
    }
}

#[pymethods]
impl KvCacheTransceiver {
    /// A transceiver of `role` ("context" or "generation") over `pool`, the engine's KV cache
    /// (a writable C-contiguous buffer of `layout`'s dtype, a whole number of blocks; with
    /// config backend "cuda", a CUDA tensor); for `layout.tp_size` > 1 a list of them, one per
    /// rank in rank order, each the same number of blocks.
    /// `config` takes the reference's field names; a context transceiver listens on `listen`
    /// (rank `r` on its port + `r`, or each on a port of its own for port 0).
    #[new]
    #[pyo3(signature = (role, layout, pool, config = None, listen = "127.0.0.1:0"))]
    fn new(
        py: Python<'_>,
        role: &str,
        layout: Layout,
        pool: &Bound<'_, PyAny>,
        config: Option<&Bound<'_, PyAny>>,
        listen: &str,
    ) -> PyResult<KvCacheTransceiver> {
        let side = side_of(py, role)?;
        let config = crate::config::from_py(py, config)?;
        let listen = listen.parse().map_err(|e| {
            error::<ConfigError>(py, "listen", format!("listen address {listen:?}: {e}"))
        })?;
        let pools = lend_for(py, &config, pool, &layout)?;
        let blocks = pools[0].blocks;
        if let Some(r) = pools.iter().position(|p| p.blocks != blocks) {
            let msg = format!(
                "rank {r}'s pool has {} blocks, rank 0's {blocks}: every rank's must have as many",
                pools[r].blocks
            );
            return Err(crate::pool::bad(py, "size", msg));
        }
        let spec = EmbedSpec {
            side,
            node: NodeSpec {
                layout: layout.core,
                pool_blocks: blocks,
                config,
                limits: Default::default(),
            },
            listen,
        };
        let kvs = pools.iter().map(|p| p.kv.clone()).collect();
        let rank = py
            .allow_threads(|| EmbeddedInstance::start(spec, kvs))
            .map_err(|e| error::<KvFerryError>(py, "start", e.to_string()))?;
        let listening = rank.listening().first().map(|a| a.to_string());
        let open = Open { rank, pools };
        Ok(KvCacheTransceiver {
            open: Mutex::new(Some(Arc::new(open))),
            side,
            layout,
            listening,
        })
    }

    /// Context side: serve `request`'s blocks (`request_id`, `block_ids`) to the generation
    /// side that presents the returned parameters.
    fn respond_and_send_async(
        &self,
        py: Python<'_>,
        request: &Bound<'_, PyAny>,
    ) -> PyResult<ContextParams> {
        self.on_side(py, Side::Context, "respond_and_send_async")?;
        let (id, blocks) = id_and_blocks(py, request)?;
        let open = self.open(py)?;
        let ticket = py
            .allow_threads(|| open.rank.send(RequestId(id), blocks))
            .map_err(|e| command(py, e))?;
        Ok(ContextParams { ticket })
    }

    /// Generation side: receive the KV cache `context_params` (or `request.context_params`)
    /// names into `request`'s blocks.
    #[pyo3(signature = (request, context_params = None))]
    fn request_and_receive_async(
        &self,
        py: Python<'_>,
        request: &Bound<'_, PyAny>,
        context_params: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.on_side(py, Side::Generation, "request_and_receive_async")?;
        let (id, blocks) = id_and_blocks(py, request)?;
        let from_request;
        let params = match context_params {
            Some(p) => p,
            None => {
                let missing = || {
                    let msg = "no context_params given and the request has none".to_string();
                    error::<crate::errors::ContextParamsError>(py, "missing", msg)
                };
                from_request = request.getattr("context_params").map_err(|_| missing())?;
                if from_request.is_none() {
                    return Err(missing());
                }
                &from_request
            }
        };
        let ticket = params::extract(py, params)?;
        let open = self.open(py)?;
        py.allow_threads(|| open.rank.receive(RequestId(id), blocks, ticket))
            .map_err(|e| command(py, e))
    }

    /// Context statuses: every one ready, after waiting until at least `at_least` are (fewer
    /// if fewer requests remain), or `timeout_ms` passes. `None`: do not wait.
    #[pyo3(signature = (at_least = None, timeout_ms = None))]
    fn check_context_transfer_status(
        &self,
        py: Python<'_>,
        at_least: Option<usize>,
        timeout_ms: Option<u64>,
    ) -> PyResult<Vec<TransferStatus>> {
        self.statuses(
            py,
            Side::Context,
            at_least,
            timeout_ms,
            "check_context_transfer_status",
        )
    }

    /// Generation statuses, as `check_context_transfer_status`.
    #[pyo3(signature = (at_least = None, timeout_ms = None))]
    fn check_gen_transfer_status(
        &self,
        py: Python<'_>,
        at_least: Option<usize>,
        timeout_ms: Option<u64>,
    ) -> PyResult<Vec<TransferStatus>> {
        self.statuses(
            py,
            Side::Generation,
            at_least,
            timeout_ms,
            "check_gen_transfer_status",
        )
    }

    /// Cancels `request` (or a request id); True if it was active. Its status still comes.
    fn cancel_request(&self, py: Python<'_>, request: &Bound<'_, PyAny>) -> PyResult<bool> {
        let id: u64 = match request.extract() {
            Ok(id) => id,
            Err(_) => id_and_blocks(py, request)?.0,
        };
        let open = self.open(py)?;
        py.allow_threads(|| open.rank.cancel(RequestId(id)))
            .map_err(|e| command(py, e))
    }

    /// Pool and staging occupancy, summed over the ranks: `blocks_total`, `blocks_free`,
    /// `staging_slots`, `staging_free`, `staging_poisoned`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let open = self.open(py)?;
        let o = py
            .allow_threads(|| open.rank.occupancy())
            .map_err(|e| command(py, e))?;
        let d = PyDict::new(py);
        d.set_item("blocks_total", o.blocks_total)?;
        d.set_item("blocks_free", o.blocks_free)?;
        d.set_item("staging_slots", o.staging_slots)?;
        d.set_item("staging_free", o.staging_free)?;
        d.set_item("staging_poisoned", o.staging_poisoned)?;
        Ok(d)
    }

    /// The context side's bound address ("host:port"), rank 0's (`ContextParams.ctx_addresses`
    /// has every rank's); None on the generation side.
    #[getter]
    fn listening(&self) -> Option<String> {
        self.listening.clone()
    }

    #[getter]
    fn role(&self) -> &'static str {
        match self.side {
            Side::Context => "context",
            Side::Generation => "generation",
        }
    }

    #[getter]
    fn layout(&self) -> Layout {
        self.layout.clone()
    }

    #[getter]
    fn closed(&self) -> bool {
        self.open.lock().expect("open lock").is_none()
    }

    /// Cancels what is in flight, stops the I/O thread and releases the pool. Idempotent.
    fn close(&self, py: Python<'_>) {
        let open = self.open.lock().expect("open lock").take();
        if let Some(open) = open {
            py.allow_threads(|| open.rank.close());
            // Last (unless a status wait still holds it): the buffer is released here, with
            // the GIL held.
            drop(open);
        }
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _ty: Option<PyObject>,
        _value: Option<PyObject>,
        _tb: Option<PyObject>,
    ) -> bool {
        self.close(py);
        false
    }
}
