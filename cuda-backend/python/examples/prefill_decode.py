"""One request's KV cache from a prefill process to a decode process.

    python prefill_decode.py            # runs both: the prefill side in a child process

The prefill side registers the request's blocks and hands back its context parameters; the
serving layer (here: a pipe) carries them, as bytes, to the decode side, which receives the
cache into its own blocks. Both wait for the terminal status before touching the blocks again.
"""

import subprocess
import sys

import numpy as np

import kvferry

# Llama-3-8B-like: 32 layers, 8 kv heads, head dim 128, 16 tokens per block, fp16.
LAYOUT = kvferry.Layout(num_layers=32, num_kv_heads=8, head_dim=128, tokens_per_block=16)
CONFIG = {"kv_transfer_timeout_ms": 10_000, "kv_transfer_sender_future_timeout_ms": 60_000}


def prefill():
    kv = np.zeros(LAYOUT.pool_shape(64), dtype=np.float16)  # the engine's KV cache
    blocks = [3, 7, 8]                                       # the request's blocks
    kv[blocks] = np.arange(3, dtype=np.float16)[:, None, None, None, None, None] + 1  # "prefill"
    with kvferry.KvCacheTransceiver("context", LAYOUT, kv, CONFIG) as tx:
        params = tx.respond_and_send_async(kvferry.Request(request_id=42, block_ids=blocks))
        print(params.to_bytes().hex(), flush=True)           # to the router
        [status] = tx.check_context_transfer_status(at_least=1)
        print(f"prefill: {status}", file=sys.stderr)


def decode(params_hex):
    kv = np.zeros(LAYOUT.pool_shape(64), dtype=np.float16)
    blocks = [0, 1, 2]
    params = kvferry.ContextParams.from_bytes(bytes.fromhex(params_hex))
    with kvferry.KvCacheTransceiver("generation", LAYOUT, kv, CONFIG) as tx:
        tx.request_and_receive_async(kvferry.Request(request_id=7, block_ids=blocks), params)
        [status] = tx.check_gen_transfer_status(at_least=1)
        print(f"decode: {status}")
        assert status.ok and all((kv[b] == i + 1).all() for i, b in enumerate(blocks))
        print(f"decode: {len(blocks)} blocks, {len(blocks) * LAYOUT.block_bytes} bytes, as sent")


if __name__ == "__main__":
    if sys.argv[1:] == ["prefill"]:
        prefill()
    else:
        child = subprocess.Popen([sys.executable, __file__, "prefill"], stdout=subprocess.PIPE,
                                 text=True)
        decode(child.stdout.readline().strip())
        sys.exit(child.wait())
