"""Misuse raises a clear kvferry exception with its reason, and never takes the interpreter
down."""

import pickle

import numpy as np
import pytest

import kvferry

LAYOUT = kvferry.Layout(num_layers=2, num_kv_heads=2, head_dim=16, tokens_per_block=4)
BLOCKS = 6


def pool(dtype=np.float16, blocks=BLOCKS):
    return np.zeros(LAYOUT.pool_shape(blocks), dtype=dtype)


@pytest.fixture
def ctx():
    with kvferry.KvCacheTransceiver("context", LAYOUT, pool()) as tx:
        yield tx


@pytest.fixture
def gen():
    with kvferry.KvCacheTransceiver("generation", LAYOUT, pool()) as tx:
        yield tx


def raises(exc, reason, fn, *args):
    with pytest.raises(exc) as e:
        fn(*args)
    assert e.value.reason == reason, e.value
    assert isinstance(e.value, kvferry.KvFerryError)
    return str(e.value)


@pytest.mark.parametrize("buf, reason", [
    (np.zeros(LAYOUT.block_bytes // 2 * 3 + 1, np.float16), "size"),
    (np.zeros(0, np.float16), "size"),
    (np.zeros(LAYOUT.pool_shape(BLOCKS), np.float32), "dtype"),
    (np.zeros(LAYOUT.pool_shape(BLOCKS), np.uint8), "dtype"),
    (np.zeros((BLOCKS, 2, 2, 2, 16, 4), np.float16), "shape"),
    (np.zeros(LAYOUT.pool_shape(2 * BLOCKS), np.float16)[::2], "not-contiguous"),
    (bytes(LAYOUT.block_bytes * BLOCKS), "readonly"),
    ([0.0] * 10, "not-a-buffer"),
])
def test_a_pool_that_does_not_fit_is_refused(buf, reason):
    msg = raises(kvferry.PoolError, reason, kvferry.KvCacheTransceiver, "context", LAYOUT, buf)
    assert msg


def test_flat_and_raw_buffers_of_the_right_size_are_taken():
    raw = bytearray(kvferry.Layout(2, 2, 16, 4, "uint8").block_bytes * 3)
    with kvferry.KvCacheTransceiver("context", kvferry.Layout(2, 2, 16, 4, "uint8"), raw) as tx:
        assert tx.stats()["blocks_total"] == 3
    with kvferry.KvCacheTransceiver("context", LAYOUT, pool().reshape(-1)) as tx:
        assert tx.stats()["blocks_total"] == BLOCKS


def test_bad_config_names_the_field():
    raises(kvferry.ConfigError, "max_tokens_in_buffer", kvferry.KvCacheTransceiver,
           "context", LAYOUT, pool(), {"max_tokens_in_buffer": 0})
    raises(kvferry.ConfigError, "config", kvferry.KvCacheTransceiver,
           "context", LAYOUT, pool(), {"kv_transfer_timeout": 5})
    raises(kvferry.ConfigError, "role", kvferry.KvCacheTransceiver, "decode", LAYOUT, pool())
    raises(kvferry.ConfigError, "dtype", kvferry.Layout, 2, 2, 16, 4, "float12")
    raises(kvferry.ConfigError, "layout", kvferry.Layout, 0, 2, 16, 4)


def test_use_after_close(ctx):
    ctx.close()
    ctx.close()  # idempotent
    assert ctx.closed
    raises(kvferry.ClosedError, "closed", ctx.respond_and_send_async, kvferry.Request(1, [0]))
    raises(kvferry.ClosedError, "closed", ctx.check_context_transfer_status, 1)
    raises(kvferry.ClosedError, "closed", ctx.stats)


def test_request_id_reused_while_active_and_blocks_held(ctx):
    ctx.respond_and_send_async(kvferry.Request(1, [0, 1]))
    raises(kvferry.RequestError, "id-in-use", ctx.respond_and_send_async, kvferry.Request(1, [2]))
    raises(kvferry.RequestError, "blocks", ctx.respond_and_send_async, kvferry.Request(2, [1]))
    raises(kvferry.RequestError, "blocks", ctx.respond_and_send_async, kvferry.Request(2, [BLOCKS]))
    raises(kvferry.RequestError, "blocks", ctx.respond_and_send_async, kvferry.Request(2, [3, 3]))
    raises(kvferry.RequestError, "no-blocks", ctx.respond_and_send_async, kvferry.Request(2, []))
    raises(kvferry.RequestError, "not-a-request", ctx.respond_and_send_async, object())
    # Cancelled, reported: the id and its blocks are free again.
    assert ctx.cancel_request(1)
    [s] = ctx.check_context_transfer_status(1, timeout_ms=10_000)
    assert (s.request_id, s.state, s.reason) == (1, "cancelled", "cancelled")
    ctx.respond_and_send_async(kvferry.Request(1, [0, 1]))
    assert not ctx.cancel_request(99)


def test_wrong_side_is_refused(ctx, gen):
    params = ctx.respond_and_send_async(kvferry.Request(1, [0]))
    raises(kvferry.RequestError, "wrong-side", gen.respond_and_send_async, kvferry.Request(1, [0]))
    raises(kvferry.RequestError, "wrong-side", ctx.request_and_receive_async,
           kvferry.Request(1, [0]), params)
    raises(kvferry.RequestError, "wrong-side", gen.check_context_transfer_status)


def test_foreign_or_damaged_context_params_raise(ctx, gen):
    params = ctx.respond_and_send_async(kvferry.Request(1, [0]))
    data = params.to_bytes()
    damaged = bytearray(data)
    damaged[-3] ^= 1
    req = kvferry.Request(2, [0])
    for foreign in [{"ctx_request_id": 1}, "params", 42]:
        raises(kvferry.ContextParamsError, "foreign", gen.request_and_receive_async, req, foreign)
    for bad in [b"", b"hello world", bytes(damaged), data[:20]]:
        raises(kvferry.ContextParamsError, "malformed", gen.request_and_receive_async, req, bad)
    raises(kvferry.ContextParamsError, "missing", gen.request_and_receive_async, req)
    raises(kvferry.RequestError, "block-count", gen.request_and_receive_async,
           kvferry.Request(2, [0, 1]), params)
    # Pickled and back: still checked, still the same request.
    again = pickle.loads(pickle.dumps(params))
    assert again.ctx_request_id == 1 and again.to_bytes() == data


def test_forged_token_is_refused_by_the_context_rank(ctx, gen):
    params = ctx.respond_and_send_async(kvferry.Request(1, [0]))
    data = params.to_bytes()
    import json, struct  # noqa: E401  (only this test forges)
    body = json.loads(data[12:])
    body["token"] = "%032x" % (int(body["token"], 16) ^ 1)
    forged_json = json.dumps(body).encode()
    forged = data[:8] + struct.pack("<I", crc32c(forged_json)) + forged_json
    gen.request_and_receive_async(kvferry.Request(7, [2]), forged)
    [s] = gen.check_gen_transfer_status(1, timeout_ms=20_000)
    assert s.request_id == 7 and s.state == "error", s
    assert gen.stats()["blocks_free"] == BLOCKS


def crc32c(data):
    """CRC-32C (Castagnoli), bit by bit: enough for one forged body."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_status_checks_do_not_wait_unless_asked(ctx):
    assert ctx.check_context_transfer_status() == []
    ctx.respond_and_send_async(kvferry.Request(1, [0]))
    assert ctx.check_context_transfer_status(1, timeout_ms=50) == []


TP2 = kvferry.Layout(num_layers=2, num_kv_heads=4, head_dim=16, tokens_per_block=4, tp_size=2)


def test_a_layout_splits_its_heads_over_tp_ranks():
    assert TP2.tp_size == 2 and TP2.num_kv_heads == 4
    # Each rank's block holds its two heads: half the model's bytes.
    assert TP2.block_shape == (2, 2, 2, 4, 16)
    assert TP2.block_bytes * 2 == kvferry.Layout(2, 4, 16, 4).block_bytes
    assert [TP2.rank_heads(r) for r in range(2)] == [(0, 2), (2, 4)]
    # Fewer heads than ranks: each head replicated on tp / heads ranks.
    rep = kvferry.Layout(2, 2, 16, 4, tp_size=4)
    assert rep.block_shape[2] == 1
    assert [rep.rank_heads(r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    raises(kvferry.ConfigError, "rank", TP2.rank_heads, 2)
    assert "tp_size=2" in repr(TP2)


@pytest.mark.parametrize("heads, tp", [(3, 2), (4, 3), (2, 0), (16, 32)])
def test_a_tp_size_the_heads_cannot_share_is_refused(heads, tp):
    raises(kvferry.ConfigError, "tp_size", kvferry.Layout, 2, heads, 16, 4, "float16", False, tp)


def tp2_pool(blocks=BLOCKS):
    return np.zeros(TP2.pool_shape(blocks), np.float16)


@pytest.mark.parametrize("pools", [
    lambda: tp2_pool(),
    lambda: [tp2_pool()],
    lambda: (tp2_pool(), tp2_pool(), tp2_pool()),
    lambda: [],
])
def test_tp_needs_one_pool_per_rank(pools):
    msg = raises(kvferry.PoolError, "ranks", kvferry.KvCacheTransceiver, "context", TP2, pools())
    assert "tp_size is 2" in msg


@pytest.mark.parametrize("bad, reason", [
    (np.zeros(TP2.block_bytes // 2 * 3 + 1, np.float16), "size"),
    # The whole model's block shape: not one rank's.
    (np.zeros(kvferry.Layout(2, 4, 16, 4).pool_shape(BLOCKS), np.float16), "shape"),
    (np.zeros(TP2.pool_shape(BLOCKS), np.float32), "dtype"),
    # A whole number of blocks, but not as many as rank 0's.
    (tp2_pool(BLOCKS + 1), "size"),
])
def test_a_rank_pool_that_does_not_fit_names_the_rank(bad, reason):
    for role in ("context", "generation"):
        msg = raises(kvferry.PoolError, reason, kvferry.KvCacheTransceiver, role, TP2,
                     [tp2_pool(), bad])
        assert "rank 1" in msg, msg


def test_tp_ranks_serve_and_report_together():
    pools = [tp2_pool(), tp2_pool()]
    with kvferry.KvCacheTransceiver("context", TP2, pools) as tx:
        p = tx.respond_and_send_async(kvferry.Request(1, [0, 3]))
        assert len(p.ctx_addresses) == 2 and len(set(p.ctx_addresses)) == 2
        assert p.ctx_address == p.ctx_addresses[0] == tx.listening
        # The engine's block ids are taken on every rank.
        assert tx.stats()["blocks_free"] == 2 * BLOCKS - 4
        raises(kvferry.RequestError, "blocks", tx.respond_and_send_async, kvferry.Request(2, [3]))
        assert tx.cancel_request(1)
        [s] = tx.check_context_transfer_status(1, timeout_ms=10_000)
        assert (s.request_id, s.state) == (1, "cancelled")
        assert tx.stats()["blocks_free"] == tx.stats()["blocks_total"] == 2 * BLOCKS


def test_context_params_of_another_tp_model_are_refused():
    with kvferry.KvCacheTransceiver("context", TP2, [tp2_pool(), tp2_pool()]) as ctx, \
            kvferry.KvCacheTransceiver("generation", LAYOUT, pool()) as gen:
        params = ctx.respond_and_send_async(kvferry.Request(1, [0]))
        raises(kvferry.RequestError, "other-model", gen.request_and_receive_async,
               kvferry.Request(1, [0]), params)
