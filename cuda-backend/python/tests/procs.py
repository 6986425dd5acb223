"""What the two-process tests share: the test side starts a peer script and reads the JSON
lines it prints; the peer side prints them. (A helper module, not a test file.)"""

import json
import subprocess
import sys

# A Llama-3-8B-like cache: 32 layers, 8 kv heads, head dim 128, 16 tokens per block, fp16
# (2 MiB a block over the whole model).
LLAMA3_8B = {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128, "tokens_per_block": 16,
             "dtype": "float16"}


def start(peer, role, spec):
    """Runs peer script `peer` as `role` with `spec`, its stdin and stdout piped."""
    return subprocess.Popen(
        [sys.executable, peer, role, json.dumps(spec)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )


def line(proc):
    """The peer's next line; a peer that ended instead fails the test with its exit code."""
    out = proc.stdout.readline()
    assert out, f"peer exited early with {proc.wait()}"
    return out.strip()


def emit(obj):
    """Peer side: one JSON line, flushed at once (the test is waiting for it)."""
    print(json.dumps(obj), flush=True)


def statuses(items):
    """Peer side: transfer statuses as JSON-ready dicts."""
    return [
        {"id": s.request_id, "state": s.state, "reason": s.reason, "detail": s.detail}
        for s in items
    ]
