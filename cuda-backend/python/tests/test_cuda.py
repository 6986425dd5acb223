"""The CUDA backend from Python: torch CUDA tensors as KV pools, adopted by the CUDA agent and
pulled over CUDA IPC between two processes, verified byte for byte; and the pool checks that
refuse what does not fit. Skips (with the reason) without torch, without a GPU, or in a build of
the package without the `cuda` feature."""

import functools
import json
import os
import sys

import pytest

import kvferry
import procs
from procs import line

torch = pytest.importorskip("torch", reason="torch is not installed")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device visible to torch", allow_module_level=True)
if "cuda" not in kvferry.BACKENDS:
    pytest.skip("this build of kvferry has no CUDA backend (feature cuda)",
                allow_module_level=True)

PEER = os.path.join(os.path.dirname(__file__), "cuda_peer.py")
start = functools.partial(procs.start, PEER)
MODEL = {"num_layers": 4, "num_kv_heads": 2, "head_dim": 64, "tokens_per_block": 16,
         "dtype": "float16"}
CUDA = {"backend": "cuda"}


def transfer(**extra):
    requests = [[0, 5, 9], [1, 2, 3, 4, 6, 7], [11]]
    gen_blocks = [[11, 0, 4], [10, 9, 8, 7, 6, 5], [1]]
    spec = {"layout": MODEL, "seed": 11, "blocks": 12, "lead": 3, "requests": requests,
            "gen_blocks": gen_blocks, "wait_ms": 60_000}
    spec.update(extra)
    ctx = start("ctx", spec)
    params = line(ctx)
    gen = start("gen", spec)
    gen.stdin.write(params + "\n")
    gen.stdin.flush()
    assert line(gen) == "asked"
    g, c = json.loads(line(gen)), json.loads(line(ctx))
    assert gen.wait(30) == 0 and ctx.wait(30) == 0
    assert [s["state"] for s in g["statuses"]] == ["complete"] * 3, g
    assert [s["state"] for s in c["statuses"]] == ["complete"] * 3, c
    assert g["mismatched"] == [], g
    assert g["touched"] == [], g
    assert g["stats"]["blocks_free"] == g["stats"]["blocks_total"] == 12


def test_torch_tensors_move_over_cuda_ipc_dlpack_to_cai():
    # The ctx hands its pool over DLPack, the gen over __cuda_array_interface__ only.
    transfer(gen_cai=True)


def test_bfloat16_tensors_move_over_cuda_ipc():
    # bfloat16 has no __cuda_array_interface__ typestr in torch: DLPack on both sides.
    transfer(layout=dict(MODEL, dtype="bfloat16"), seed=12)


def layout():
    return kvferry.Layout(**MODEL)


def refused(pool, reason, config=CUDA):
    with pytest.raises(kvferry.PoolError) as e:
        kvferry.KvCacheTransceiver("context", layout(), pool, config)
    assert e.value.reason == reason, e.value
    return str(e.value)


def test_cpu_tensor_with_the_cuda_backend_is_refused():
    msg = refused(torch.zeros(layout().pool_shape(4), dtype=torch.float16), "device")
    assert "host memory" in msg


def test_cuda_tensor_with_the_host_backend_is_refused():
    pool = torch.zeros(layout().pool_shape(4), dtype=torch.float16, device="cuda")
    assert "cuda" in refused(pool, "device", config=None)


def test_wrong_dtype_is_refused():
    pool = torch.zeros(layout().pool_shape(4), dtype=torch.float32, device="cuda")
    assert "float16" in refused(pool, "dtype")


def test_partial_block_is_refused():
    flat = torch.zeros(layout().block_bytes * 4 // 2 + 1, dtype=torch.float16, device="cuda")
    refused(flat, "size")


def test_wrong_shape_is_refused():
    n, l, k, h, t, d = layout().pool_shape(4)
    refused(torch.zeros((n, l, k, h, d, t), dtype=torch.float16, device="cuda"), "shape")


def test_non_contiguous_tensor_is_refused():
    pool = torch.zeros(layout().pool_shape(4), dtype=torch.float16, device="cuda")
    msg = refused(pool.transpose(4, 5), "not-contiguous")
    assert "contiguous()" in msg
    # Every other block: a whole number of blocks, the right dtype, but strided.
    refused(torch.zeros(layout().pool_shape(8), dtype=torch.float16, device="cuda")[::2],
            "not-contiguous")


def test_object_without_a_device_protocol_is_refused():
    refused(bytearray(layout().block_bytes * 4), "not-a-cuda-array")


def test_the_transceiver_holds_the_tensor_until_close():
    pool = torch.zeros(layout().pool_shape(4), dtype=torch.float16, device="cuda")
    before = sys.getrefcount(pool)
    tx = kvferry.KvCacheTransceiver("context", layout(), pool, CUDA)
    assert sys.getrefcount(pool) > before
    assert tx.stats()["blocks_total"] == 4
    tx.close()
    assert sys.getrefcount(pool) == before
