#!/usr/bin/env python3
"""Writes the hand-made seeds of `transceiver_ops` and `sim_scenario` in the byte format of
the `arbitrary` crate (1.x), one meaningful scenario per file:

- integers: little-endian, their own width; bool: one byte, low bit; Option: a bool, then
  the value; enum: a u32 whose (value * variants) >> 32 is the variant index;
- the last field of the input (`ops`) is read to the end: each element follows a 1 byte.

Run from the repository root: `python3 fuzz/scripts/gen_seeds.py`. Check a seed with
`cargo +nightly fuzz fmt transceiver_ops fuzz/corpus/transceiver_ops/<file>`. Rerun after
changing the `Input`, `Setup` or `Op` types (field order is the byte order).
"""
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")


def u8(v):
    return bytes([v])


def b(v):
    return u8(1 if v else 0)


def opt(v, enc=u8):
    return b(False) if v is None else b(True) + enc(v)


def variant(k, n):
    # Smallest u32 that the derive maps to variant k of n.
    return struct.pack("<I", -(-(k << 32) // n))


# ---- transceiver_ops ------------------------------------------------------------------------
OPS = ["Submit", "Complete", "Fail", "Cancel", "Advance", "Recycle", "Refuse", "Poll", "Pump",
       "PumpSome", "Step"]


def op(name, *fields):
    return variant(OPS.index(name), len(OPS)) + b"".join(fields)


def submit(blocks=1, match=True, deadline=None):
    return op("Submit", u8(blocks - 1), b(match), opt(deadline))


def complete(gen, rank=0, job=0):
    return op("Complete", b(gen), u8(rank), u8(job))


def fail(gen, rank=0, job=0, error=1):
    return op("Fail", b(gen), u8(rank), u8(job), u8(error))


def cancel(gen, rank=None, request=0):
    return op("Cancel", b(gen), opt(rank), u8(request))


def advance(ms):
    return op("Advance", struct.pack("<H", ms))


def recycle(gen, rank=0):
    return op("Recycle", b(gen), u8(rank))


def refuse(gen, rank=0, on=True):
    return op("Refuse", b(gen), u8(rank), b(on))


def poll(gen, rank=0):
    return op("Poll", b(gen), u8(rank))


PUMP = op("Pump")


def pump_some(n):
    return op("PumpSome", u8(n))


def step(gen):
    return op("Step", b(gen))


# Several operations at once (each is framed separately by `ops`).
STEPS = [step(False), step(True)]
DONE = [complete(g, r) for g in (False, True) for r in (0, 1, 0, 1)]


def setup(ctx_tp=1, gen_tp=1, mla=False, timeout=None, inflight_cancel=False,
          sender_timeout=None, slots=3, fallback=False, wait_ms=200, max_in_flight=8):
    return (u8(ctx_tp - 1) + u8(gen_tp - 1) + b(mla) + opt(None if timeout is None else timeout - 1)
            + b(inflight_cancel) + opt(None if sender_timeout is None else sender_timeout - 1)
            + u8(slots - 1) + b(fallback) + u8(wait_ms) + u8(max_in_flight - 1))


def ops(*items):
    flat = [o for i in items for o in (i if isinstance(i, list) else [i])]
    return b"".join(b(True) + o for o in flat)


TRANSCEIVER = {
    "happy_ctx_tp2_gen_tp1": setup(ctx_tp=2) + ops(submit(3), PUMP, DONE, STEPS, PUMP, STEPS),
    "happy_mla_tp2": setup(ctx_tp=2, gen_tp=2, mla=True) + ops(
        submit(2), submit(1), PUMP, DONE, DONE, STEPS),
    "wrong_token": setup() + ops(submit(2, match=False), PUMP, PUMP, STEPS),
    "timeout_warn_only": setup(timeout=50) + ops(
        submit(2), PUMP, advance(100), poll(True), advance(200), poll(True), DONE, STEPS),
    "inflight_cancel_evicts": setup(timeout=100, inflight_cancel=True) + ops(
        submit(2), PUMP, advance(150), step(True), complete(True), STEPS, PUMP, STEPS),
    "deadline_evicts": setup(timeout=200, inflight_cancel=True) + ops(
        submit(1, deadline=10), PUMP, advance(20), STEPS, PUMP, DONE, STEPS),
    "sender_timeout": setup(sender_timeout=30) + ops(
        submit(1, match=False), PUMP, advance(40), STEPS, PUMP, STEPS),
    "fail_mid_transfer": setup(ctx_tp=2) + ops(
        submit(3), PUMP, fail(False, rank=1), step(False), PUMP, STEPS, DONE, STEPS),
    "cancel_gen_in_flight": setup() + ops(
        submit(2), PUMP, cancel(True), PUMP, STEPS, DONE, STEPS),
    "cancel_ctx_one_rank_early": setup(ctx_tp=2) + ops(
        submit(1), cancel(False, rank=1), step(False), PUMP, STEPS),
    "recycle_then_evict": setup(timeout=100, inflight_cancel=True) + ops(
        submit(2), PUMP, recycle(True), submit(1), PUMP, advance(150), STEPS, DONE, STEPS),
    "staging_wait_fails": setup(slots=1, wait_ms=50) + ops(
        submit(1), submit(1), PUMP, advance(100), STEPS, PUMP, DONE, STEPS),
    "staging_fallback": setup(slots=1, fallback=True) + ops(
        submit(4), submit(4), submit(4), PUMP, DONE, DONE, STEPS),
    "agent_refuses": setup() + ops(refuse(True), submit(1), PUMP, STEPS, PUMP, STEPS),
    "max_in_flight_1": setup(max_in_flight=1) + ops(submit(1), submit(1), PUMP, DONE, STEPS),
    # Found by the fuzzer (a driver-model bug): an evicted job's fence arrives after both
    # sides ended the request; the slot comes back only when the rank polls it.
    "late_fence_after_both_ended": setup(timeout=200, inflight_cancel=True) + ops(
        submit(1, deadline=10), advance(20), step(False), step(True), PUMP, fail(True, error=0)),
    "pool_exhausted_reuse": setup() + ops(
        submit(4), submit(4), submit(4), submit(4), PUMP, DONE, DONE, STEPS, submit(4), PUMP,
        pump_some(1), DONE, STEPS),
}


# ---- sim_scenario ---------------------------------------------------------------------------
# `kvferry_sim::scenario::SCENARIOS`, in its order (a seed names its scenario by index).
SCENARIOS = ["default", "crashy", "partition-heavy", "hetero-tp", "mla", "asymmetric-partition",
             "silent-death", "wedged-agent", "stalled-reader", "abort-during-write",
             "failed-transfer-served", "timeout-frees-while-reading", "lost-notification",
             "evicted-before-send", "stale-endpoint", "abort-never-reclaimed"]
TP = {1: 0, 2: 1, 4: 2}


def sim(seed, scenario="default", ctx_inst=1, gen_inst=1, ctx_tp=2, ctx_pp=1, gen_tp=1,
        gen_pp=1, requests=4, fault_rate=1.0, timeout=None, inflight_cancel=False,
        recheck=False):
    return (struct.pack("<Q", seed) + u8(SCENARIOS.index(scenario)) + u8(ctx_inst - 1)
            + u8(gen_inst - 1) + u8(TP[ctx_tp]) + u8(ctx_pp - 1) + u8(TP[gen_tp]) + u8(gen_pp - 1)
            + u8(requests - 1) + u8(round(fault_rate * 10))
            + opt(None if timeout is None else timeout - 1) + b(inflight_cancel) + b(recheck))


SIM = {
    "default_no_faults": sim(1, fault_rate=0.0),
    "default_faults": sim(2),
    "crashy_2x2": sim(3, "crashy", ctx_inst=2, gen_inst=2, requests=8, fault_rate=2.0),
    "partition_timeout_evict": sim(4, "partition-heavy", ctx_inst=2, timeout=20,
                                   inflight_cancel=True, requests=8),
    "hetero_tp_pp": sim(5, "hetero-tp", ctx_tp=2, ctx_pp=2, gen_tp=4, requests=6),
    "mla_tp2": sim(6, "mla", gen_tp=2, requests=6, fault_rate=1.5),
    "warn_only_recheck": sim(7, timeout=5, requests=8, recheck=True),
    # A gray failure and two field hazards, so the fuzzer starts inside their fault mixes.
    "silent_death_2x1": sim(8, "silent-death", ctx_inst=2, requests=8, fault_rate=2.0),
    "lost_notification": sim(9, "lost-notification", ctx_tp=1, requests=8),
    "abort_during_write": sim(10, "abort-during-write", requests=8, fault_rate=2.0),
}


def write(target, seeds):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


write("transceiver_ops", TRANSCEIVER)
write("sim_scenario", SIM)
