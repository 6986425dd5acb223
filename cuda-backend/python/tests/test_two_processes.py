"""Two Python processes on loopback: a context and a generation transceiver, each over its own
numpy KV pool shaped like a real model's (blocks x layers x K/V x kv heads x tokens per block x
head dim). One context rank and one generation rank (TP1); heterogeneous TP is
test_hetero_tp.py's."""

import functools
import json
import os
import signal

import procs
from procs import line

PEER = os.path.join(os.path.dirname(__file__), "peer.py")
start = functools.partial(procs.start, PEER)
MODEL = procs.LLAMA3_8B


def spec(requests, gen_blocks, blocks, **extra):
    s = {"layout": MODEL, "seed": 7, "blocks": blocks, "requests": requests,
         "gen_blocks": gen_blocks, "wait_ms": 60_000}
    s.update(extra)
    return s


def pair(s):
    ctx = start("ctx", s)
    params = line(ctx)
    gen = start("gen", s)
    gen.stdin.write(params + "\n")
    gen.stdin.flush()
    assert line(gen) == "asked"
    return ctx, gen


def test_paged_cache_moves_byte_for_byte():
    # Four requests, blocks scattered on both sides and mapped to different ids.
    requests = [[0, 5, 9], [1, 2, 3, 4, 6, 7], [11], [8, 10]]
    gen_blocks = [[11, 0, 4], [10, 9, 8, 7, 6, 5], [1], [3, 2]]
    ctx, gen = pair(spec(requests, gen_blocks, blocks=12))
    g = json.loads(line(gen))
    c = json.loads(line(ctx))
    assert gen.wait(30) == 0 and ctx.wait(30) == 0
    assert sorted(s["state"] for s in g["statuses"]) == ["complete"] * 4, g
    assert sorted(s["id"] for s in g["statuses"]) == [5000, 5001, 5002, 5003]
    assert g["mismatched"] == []
    assert [s["state"] for s in c["statuses"]] == ["complete"] * 4, c
    for stats in (g["stats"], c["stats"]):
        assert stats["blocks_free"] == stats["blocks_total"] == 12
        assert stats["staging_free"] == stats["staging_slots"]


def killed_mid_transfer(victim):
    # 256 MiB in 16 requests; the victim is killed right after the gen has asked for all.
    requests = [[8 * i + j for j in range(8)] for i in range(16)]
    # Requests still parked for a connection that is not up when the ctx dies wait out the
    # dialer's reconnect budget (`gen::MAX_RECONNECT_ATTEMPTS`, about 40 s) before they fail.
    s = spec(requests, requests, blocks=128, wait_ms=90_000,
             config={"kv_transfer_sender_future_timeout_ms": 5_000})
    ctx, gen = pair(s)
    dead, alive = (gen, ctx) if victim == "gen" else (ctx, gen)
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait(10)
    out = json.loads(line(alive))
    assert alive.wait(60) == 0
    return out


def check_survivor(out, expected_reasons):
    states = [s["state"] for s in out["statuses"]]
    assert len(states) == 16, out
    failed = [s for s in out["statuses"] if s["state"] != "complete"]
    assert failed, "the kill landed after every transfer had finished"
    assert {s["reason"] for s in failed} <= expected_reasons, failed
    stats = out["stats"]
    assert stats["blocks_free"] == stats["blocks_total"], stats
    assert stats["staging_free"] == stats["staging_slots"], stats


def test_gen_killed_mid_transfer_ctx_fails_and_frees():
    out = killed_mid_transfer("gen")
    # A lost connection fails what it carried; a request never asked for, its sender budget.
    check_survivor(out, {"unreachable", "timeout", "peer-aborted", "agent"})


def test_ctx_killed_mid_transfer_gen_fails_and_frees():
    out = killed_mid_transfer("ctx")
    check_survivor(out, {"unreachable", "peer-aborted", "agent"})
    assert out["mismatched"] == []
