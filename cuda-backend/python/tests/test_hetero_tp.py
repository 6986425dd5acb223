"""Two Python processes on loopback across heterogeneous tensor parallelism: each process is
one instance holding all its TP ranks' numpy pools, shaped like a real model's paged KV cache
(blocks x layers x K/V x the rank's kv heads x tokens per block x head dim). Every head's bytes
depend on its global head index, and the generation side checks every byte of every rank."""

import functools
import json
import os

import pytest

import procs
from procs import line

PEER = os.path.join(os.path.dirname(__file__), "tp_peer.py")
start = functools.partial(procs.start, PEER)
MODEL = procs.LLAMA3_8B


@pytest.mark.parametrize("ctx_tp, gen_tp", [(2, 1), (1, 2), (4, 2)])
def test_paged_cache_moves_byte_for_byte_across_tp(ctx_tp, gen_tp):
    # Blocks scattered on both sides and mapped to different ids.
    requests = [[0, 5, 9], [1, 2, 3, 4, 6], [11], [8, 10]]
    gen_blocks = [[11, 0, 4], [10, 9, 8, 7, 6], [1], [3, 2]]
    spec = {"model": MODEL, "ctx_tp": ctx_tp, "gen_tp": gen_tp, "blocks": 12,
            "requests": requests, "gen_blocks": gen_blocks, "wait_ms": 60_000}
    ctx = start("ctx", spec)
    params = line(ctx)
    gen = start("gen", spec)
    gen.stdin.write(params + "\n")
    gen.stdin.flush()
    g = json.loads(line(gen))
    c = json.loads(line(ctx))
    assert gen.wait(30) == 0
    assert ctx.wait(30) == 0
    assert sorted(s["state"] for s in g["statuses"]) == ["complete"] * 4, g
    assert sorted(s["id"] for s in g["statuses"]) == [5000, 5001, 5002, 5003]
    assert g["mismatched"] == []
    assert [s["state"] for s in c["statuses"]] == ["complete"] * 4, c
    for stats, tp in ((g["stats"], gen_tp), (c["stats"], ctx_tp)):
        # Summed over the instance's ranks: every rank's blocks are the engine's again.
        assert stats["blocks_free"] == stats["blocks_total"] == 12 * tp, stats
        assert stats["staging_free"] == stats["staging_slots"]
