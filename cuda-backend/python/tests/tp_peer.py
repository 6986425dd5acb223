"""One side of a two-process transfer across tensor parallelism, driven by test_hetero_tp.py.

    python tp_peer.py ctx SPEC_JSON -> prints {"params": [hex, ...]}, then {"statuses": ..., "stats": ...},
                                       then closes at once
    python tp_peer.py gen SPEC_JSON -> reads one line {"params": [...]}, then prints
                                       {"statuses": ..., "stats": ..., "mismatched": [...]}

One process is one instance: it holds a numpy pool per TP rank, each shaped
(blocks, layers, K/V, the rank's kv heads, tokens per block, head dim). Every element of a
request's block is a function of (request, block index in the request, layer, K/V, GLOBAL kv
head, token, dim), so a head that lands on the wrong rank, in the wrong slot or in the wrong
block is caught byte for byte whatever the two sides' TP.
"""

import json
import sys

import numpy as np

import kvferry
from procs import emit, statuses


def layout(spec, tp):
    return kvferry.Layout(**spec["model"], tp_size=tp)


def pattern(lay, request, index):
    """The whole model's block `index` of `request`: (layers, K/V, all kv heads, tokens, dim),
    as the uint16 bits of its float16 elements."""
    shape = (lay.num_layers, 2, lay.num_kv_heads, lay.tokens_per_block, lay.head_dim)
    key = np.uint64(request * 1_000_003 + index * 7_919 + 1)
    x = key
    for axis in np.indices(shape, dtype=np.uint64):
        x = x * np.uint64(1_000_033) + axis
    x = x * np.uint64(0x9E3779B97F4A7C15)
    return (x >> np.uint64(48)).astype(np.uint16)


def rank_slice(lay, rank, block):
    lo, hi = lay.rank_heads(rank)
    return block[:, :, lo:hi]


def pools(lay, blocks):
    return [np.zeros(lay.pool_shape(blocks), dtype=np.float16) for _ in range(lay.tp_size)]


def lent(kv):
    """What the transceiver takes: TP1's one pool itself, else the list of them."""
    return kv[0] if len(kv) == 1 else kv


def run_ctx(spec):
    lay = layout(spec, spec["ctx_tp"])
    kv = pools(lay, spec["blocks"])
    for i, blocks in enumerate(spec["requests"]):
        for j, c in enumerate(blocks):
            whole = pattern(lay, i, j)
            for r, pool in enumerate(kv):
                pool.view(np.uint16)[c] = rank_slice(lay, r, whole)
    with kvferry.KvCacheTransceiver("context", lay, lent(kv)) as tx:
        params = [tx.respond_and_send_async(kvferry.Request(1000 + i, blocks))
                  for i, blocks in enumerate(spec["requests"])]
        assert all(len(p.ctx_addresses) == lay.tp_size for p in params)
        emit({"params": [p.to_bytes().hex() for p in params]})
        done = tx.check_context_transfer_status(len(params), timeout_ms=spec["wait_ms"])
        emit({"statuses": statuses(done), "stats": dict(tx.stats())})
        # Closes at once, as an engine may: a context status means its bytes are sent, not
        # that the gen has read them all, and its ranks' connections then end in any order.
        # A gen request fails only for a lost rank it still reads from (the core's
        # `entry::needs`), so nothing here may fail.


def run_gen(spec):
    lay = layout(spec, spec["gen_tp"])
    kv = pools(lay, spec["blocks"])
    params = json.loads(sys.stdin.readline())["params"]
    with kvferry.KvCacheTransceiver("generation", lay, lent(kv)) as tx:
        for i, (hexed, blocks) in enumerate(zip(params, spec["gen_blocks"])):
            p = kvferry.ContextParams.from_bytes(bytes.fromhex(hexed))
            tx.request_and_receive_async(kvferry.Request(5000 + i, blocks), p)
        done = tx.check_gen_transfer_status(len(params), timeout_ms=spec["wait_ms"])
        mismatched = []
        for s in done:
            if s.state != "complete":
                continue
            i = s.request_id - 5000
            for j, g in enumerate(spec["gen_blocks"][i]):
                whole = pattern(lay, i, j)
                for r, pool in enumerate(kv):
                    if not np.array_equal(pool.view(np.uint16)[g], rank_slice(lay, r, whole)):
                        mismatched.append([s.request_id, j, r])
        emit({"statuses": statuses(done), "stats": dict(tx.stats()), "mismatched": mismatched})


if __name__ == "__main__":
    spec = json.loads(sys.argv[2])
    {"ctx": run_ctx, "gen": run_gen}[sys.argv[1]](spec)
