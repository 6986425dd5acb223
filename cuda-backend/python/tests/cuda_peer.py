"""One side of a two-process transfer over the CUDA backend, driven by test_cuda.py.

    python cuda_peer.py ctx SPEC_JSON -> prints {"params": [hex, ...]}, then {"statuses": ...}
    python cuda_peer.py gen SPEC_JSON -> reads one line {"params": [...]}, prints "asked", then
                                         {"statuses": ..., "stats": ..., "mismatched": [...],
                                          "touched": [...]}

Both pools are torch CUDA tensors that start `lead` blocks into a larger tensor, as a caching
allocator's sub-allocation does, so the IPC export must carry the offset. The ctx pool is filled
from `seed`; the gen recomputes it and compares every byte it received, checks that blocks it did
not name and the lead-in before its pool still hold the poison, and may hand its pool over
`__cuda_array_interface__` only (`gen_cai`) instead of DLPack.
"""

import json
import sys

import torch

import kvferry
from procs import emit, statuses

POISON = 0x5A5A


def layout(spec):
    return kvferry.Layout(**spec["layout"])


def dtype(spec):
    return getattr(torch, spec["layout"]["dtype"])


def source(spec):
    """The ctx pool's contents, on the CPU, as int16 (bit patterns, so NaNs compare)."""
    g = torch.Generator().manual_seed(spec["seed"])
    shape = layout(spec).pool_shape(spec["blocks"])
    return torch.randint(-32768, 32768, shape, dtype=torch.int16, generator=g)


def backed_pool(spec, fill):
    """A pool `lead` blocks into a larger CUDA tensor, and that tensor."""
    shape = layout(spec).pool_shape(spec["blocks"] + spec["lead"])
    backing = torch.full(shape, fill, dtype=torch.int16, device="cuda")
    return backing, backing.view(dtype(spec))[spec["lead"]:]


class CaiOnly:
    """A tensor seen only through `__cuda_array_interface__` (as Numba or CuPy hand it)."""

    def __init__(self, t):
        self.t = t

    @property
    def __cuda_array_interface__(self):
        return self.t.__cuda_array_interface__


def run_ctx(spec):
    _backing, pool = backed_pool(spec, 0)
    pool.view(torch.int16).copy_(source(spec).cuda())
    # The engine's writes must be done before the gen reads: kvferry reads on its own stream.
    torch.cuda.synchronize()
    with kvferry.KvCacheTransceiver("context", layout(spec), pool, {"backend": "cuda"}) as tx:
        params = [tx.respond_and_send_async(kvferry.Request(1000 + i, b)).to_bytes().hex()
                  for i, b in enumerate(spec["requests"])]
        emit({"params": params})
        done = tx.check_context_transfer_status(len(params), timeout_ms=spec["wait_ms"])
        emit({"statuses": statuses(done)})


def compare(spec, backing, pool, targets, done):
    src = source(spec)
    bits = pool.view(torch.int16).cpu()
    mismatched, named = [], set()
    for s in done:
        ctx_blocks, gen_blocks = targets[s.request_id]
        named.update(gen_blocks)
        for c, g in zip(ctx_blocks, gen_blocks):
            if s.state != "complete" or not torch.equal(bits[g], src[c]):
                mismatched.append([s.request_id, c, g])
    lead = backing[: spec["lead"]].cpu()
    untouched = [b for b in range(spec["blocks"]) if b not in named]
    touched = [b for b in untouched if not bool((bits[b] == POISON).all())]
    if not bool((lead == POISON).all()):
        touched.append("lead")
    return mismatched, touched


def run_gen(spec):
    backing, pool = backed_pool(spec, POISON)
    torch.cuda.synchronize()
    params = json.loads(sys.stdin.readline())["params"]
    given = CaiOnly(pool) if spec.get("gen_cai") else pool
    with kvferry.KvCacheTransceiver("generation", layout(spec), given, {"backend": "cuda"}) as tx:
        targets = {}
        for i, (hexed, blocks) in enumerate(zip(params, spec["gen_blocks"])):
            p = kvferry.ContextParams.from_bytes(bytes.fromhex(hexed))
            tx.request_and_receive_async(kvferry.Request(5000 + i, blocks), p)
            targets[5000 + i] = (spec["requests"][i], blocks)
        print("asked", flush=True)
        done = tx.check_gen_transfer_status(len(params), timeout_ms=spec["wait_ms"])
        # A status means the pull's fence has passed: torch may read the blocks now.
        mismatched, touched = compare(spec, backing, pool, targets, done)
        emit({"statuses": statuses(done), "stats": dict(tx.stats()),
              "mismatched": mismatched, "touched": touched})


if __name__ == "__main__":
    spec = json.loads(sys.argv[2])
    {"ctx": run_ctx, "gen": run_gen}[sys.argv[1]](spec)
