"""kvferry: move a request's KV cache from a context (prefill) instance to a generation
(decode) instance, with the reference transceiver's API."""

from typing import Any, Literal, Mapping, Optional, Sequence, Tuple, Union

__version__: str
BACKENDS: Tuple[str, ...]
"""The config `backend` values this build takes: ("host",) or, built with feature cuda,
("host", "cuda")."""

class KvFerryError(Exception):
    """Base of every kvferry error. `reason` is a stable short name of why."""
    reason: str

class ConfigError(KvFerryError): ...
class PoolError(KvFerryError): ...
class RequestError(KvFerryError): ...
class ContextParamsError(KvFerryError): ...
class ClosedError(KvFerryError): ...

DType = Literal["float16", "bfloat16", "float32", "float64", "int8", "uint8", "float8"]

class Layout:
    """A model's KV cache geometry on an instance of `tp_size` ranks (PP1): the model's
    `num_kv_heads` split over the ranks (fewer heads than ranks: each replicated), which must
    divide one another (else `ConfigError` reason `tp_size`). One rank's block is
    (layers, K/V, the rank's kv heads, tokens per block, head dim) elements of `dtype`;
    `block_bytes`, `block_shape` and `pool_shape` are one rank's."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tokens_per_block: int
    dtype: str
    mla: bool
    tp_size: int
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int,
                 tokens_per_block: int, dtype: DType = "float16", mla: bool = False,
                 tp_size: int = 1) -> None: ...
    def rank_heads(self, rank: int) -> Tuple[int, int]:
        """The global kv heads rank `rank` holds, as (first, end)."""
    @property
    def block_bytes(self) -> int: ...
    @property
    def block_shape(self) -> Tuple[int, int, int, int, int]: ...
    def pool_shape(self, num_blocks: int) -> Tuple[int, int, int, int, int, int]: ...

class ContextParams:
    """Opaque context parameters of one request: from the context side to the generation side."""
    @property
    def ctx_request_id(self) -> int: ...
    @property
    def ctx_address(self) -> str:
        """The context instance's rank 0 address."""
    @property
    def ctx_addresses(self) -> list[str]:
        """Every context rank's address, in rank order."""
    def to_bytes(self) -> bytes: ...
    @staticmethod
    def from_bytes(data: bytes) -> "ContextParams": ...

class Request:
    """A request as the transceiver sees it; any object with these attributes will do."""
    request_id: int
    block_ids: list[int]
    context_params: Optional[Union[ContextParams, bytes]]
    def __init__(self, request_id: int, block_ids: Sequence[int],
                 context_params: Optional[Union[ContextParams, bytes]] = None) -> None: ...

class TransferStatus:
    """How a request ended; its blocks are the engine's again."""
    @property
    def request_id(self) -> int: ...
    @property
    def state(self) -> Literal["complete", "error", "cancelled"]: ...
    @property
    def reason(self) -> Optional[str]: ...
    @property
    def detail(self) -> Optional[str]: ...
    @property
    def ok(self) -> bool: ...

class KvCacheTransceiver:
    """The cache transceiver of one instance (all `layout.tp_size` ranks, in this process).
    `pool` is the engine's KV cache holding a whole
    number of blocks of `layout.dtype` (flat, or shaped `layout.pool_shape(n)`): with the host
    backend a writable C-contiguous buffer (numpy); with config `{"backend": "cuda"}` (a build
    listing "cuda" in `BACKENDS`) a C-contiguous CUDA tensor (DLPack or
    `__cuda_array_interface__`), adopted without a copy and held until `close()`; finish writes
    to blocks (e.g. `torch.cuda.synchronize()`) before sending them. A pool that does not fit
    raises `PoolError` (`reason`: `device`, `dtype`, `not-contiguous`, `size`, `shape`, ...).
    For `layout.tp_size` > 1 (host backend only) `pool` is a list or tuple of one such pool per
    rank, in rank order, each as many blocks (`reason` `ranks` for the wrong count; other
    refusals name the rank). A context instance's rank `r` listens on `listen`'s port + `r`
    (each on a port of its own for port 0). `config` takes the reference's field names (`max_tokens_in_buffer`,
    `kv_transfer_timeout_ms`, `kv_transfer_sender_future_timeout_ms`, `backend`, ...)."""
    def __init__(self, role: Literal["context", "generation"], layout: Layout, pool: Any,
                 config: Optional[Mapping[str, Any]] = None,
                 listen: str = "127.0.0.1:0") -> None: ...
    def respond_and_send_async(self, request: Any) -> ContextParams: ...
    def request_and_receive_async(self, request: Any,
                                  context_params: Optional[Union[ContextParams, bytes]] = None) -> None: ...
    def check_context_transfer_status(self, at_least: Optional[int] = None,
                                      timeout_ms: Optional[int] = None) -> list[TransferStatus]: ...
    def check_gen_transfer_status(self, at_least: Optional[int] = None,
                                  timeout_ms: Optional[int] = None) -> list[TransferStatus]: ...
    def cancel_request(self, request: Union[Any, int]) -> bool: ...
    def stats(self) -> dict[str, int]:
        """Pool and staging occupancy, summed over the ranks."""
    @property
    def listening(self) -> Optional[str]:
        """Rank 0's bound address on the context side; None on the generation side."""
    @property
    def role(self) -> Literal["context", "generation"]: ...
    @property
    def layout(self) -> Layout: ...
    @property
    def closed(self) -> bool: ...
    def close(self) -> None: ...
    def __enter__(self) -> "KvCacheTransceiver": ...
    def __exit__(self, *exc: Any) -> bool: ...
