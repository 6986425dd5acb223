"""One side of a two-process transfer, driven by the tests in this folder.

    python peer.py ctx  SPEC_JSON   -> prints {"params": [hex, ...]}, then {"statuses": ..., "stats": ...}
    python peer.py gen  SPEC_JSON   -> reads one line {"params": [...]}, prints "asked", then
                                       {"statuses": ..., "stats": ..., "mismatched": [...]}

The ctx pool is filled from `seed`; the gen recomputes it and compares every byte it received.
"""

import json
import sys

import numpy as np

import kvferry
from procs import emit, statuses


def layout(spec):
    return kvferry.Layout(**spec["layout"])


def ctx_pool(spec):
    lay = layout(spec)
    rng = np.random.default_rng(spec["seed"])
    bits = rng.integers(0, 1 << 16, size=lay.pool_shape(spec["blocks"]), dtype=np.uint16)
    return bits.view(np.float16)


def run_ctx(spec):
    pool = ctx_pool(spec)
    config = spec.get("config", {})
    with kvferry.KvCacheTransceiver("context", layout(spec), pool, config) as tx:
        params = []
        for i, blocks in enumerate(spec["requests"]):
            p = tx.respond_and_send_async(kvferry.Request(1000 + i, blocks))
            params.append(p.to_bytes().hex())
        emit({"params": params})
        done = tx.check_context_transfer_status(len(params), timeout_ms=spec["wait_ms"])
        emit({"statuses": statuses(done), "stats": dict(tx.stats())})


def run_gen(spec):
    lay = layout(spec)
    pool = np.zeros(lay.pool_shape(spec["blocks"]), dtype=np.float16)
    params = json.loads(sys.stdin.readline())["params"]
    config = spec.get("config", {})
    with kvferry.KvCacheTransceiver("generation", lay, pool, config) as tx:
        targets = {}
        for i, (hexed, blocks) in enumerate(zip(params, spec["gen_blocks"])):
            p = kvferry.ContextParams.from_bytes(bytes.fromhex(hexed))
            tx.request_and_receive_async(kvferry.Request(5000 + i, blocks), p)
            targets[5000 + i] = (spec["requests"][i], blocks)
        print("asked", flush=True)
        done = tx.check_gen_transfer_status(len(params), timeout_ms=spec["wait_ms"])
        source = ctx_pool(spec)
        mismatched = []
        for s in done:
            if s.state != "complete":
                continue
            ctx_blocks, gen_blocks = targets[s.request_id]
            for c, g in zip(ctx_blocks, gen_blocks):
                if pool[g].tobytes() != source[c].tobytes():
                    mismatched.append([s.request_id, c, g])
        emit({"statuses": statuses(done), "stats": dict(tx.stats()), "mismatched": mismatched})


if __name__ == "__main__":
    spec = json.loads(sys.argv[2])
    {"ctx": run_ctx, "gen": run_gen}[sys.argv[1]](spec)
