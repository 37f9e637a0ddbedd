"""Issue 14's slow-reader acceptance: a stream that is never read holds no more than its bounded buffer.

Starts a server on a tiny random checkpoint, opens streaming requests whose clients never read a byte (a 4 KiB
receive window, and a 64 KiB send buffer on the server's side instead of Linux's autotuned 4 MiB, so its writes
block after a few hundred events rather than megabytes later), and samples for `--seconds`
(default 120) what the server holds for them: requests in flight, KV blocks in use, outputs queued unread per
stream, and the process's resident memory. The bound is the engine's max_unread_outputs (1024 outputs): a
stream that reaches it is aborted and its KV freed. Prints one line per sample and a verdict.

    PYTHONPATH=. python3 benchmarks/never_read_stream.py [--seconds 120] [--streams 4]
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from tokenmill.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenmill.engine.async_engine import DEFAULT_MAX_UNREAD_OUTPUTS, AsyncLLMEngine
from tokenmill.engine.engine import LLMEngine
from tokenmill.server.app import build_app
from tokenmill.server.http_protocol import uvicorn_config
from tokenmill.tools.tiny_checkpoint import make_tiny_checkpoint

MAX_MODEL_LEN = 2048


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _serve(app: object) -> tuple[uvicorn.Server, int]:
    """uvicorn on 127.0.0.1 in a thread, its connections with a fixed 64 KiB send buffer (inherited from the
    listening socket)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, sock.getsockname()[1]


def _open_never_read(port: int, index: int, max_tokens: int, n: int) -> socket.socket:
    body = json.dumps({"model": "tiny", "prompt": f"never read {index}", "max_tokens": max_tokens, "n": n,
                       "ignore_eos": True, "stream": True}).encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: it sets the window
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock  # never read


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--n", type=int, default=4, help="choices per request (more events per token)")
    parser.add_argument("--max-unread", type=int, default=DEFAULT_MAX_UNREAD_OUTPUTS)
    args = parser.parse_args()

    overflowed: list[str] = []

    class _Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "unread" in record.getMessage():
                overflowed.append(record.getMessage())

    logging.getLogger("tokenmill.engine.async_engine").addHandler(_Count())
    folder = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", max_position_embeddings=MAX_MODEL_LEN)
    config = EngineConfig(model=str(folder), dtype="float32", max_model_len=MAX_MODEL_LEN, seed=0,
                          cache=CacheConfig(num_kv_blocks=4096),
                          scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=512))
    engine = AsyncLLMEngine(LLMEngine(config), max_unread_outputs=args.max_unread)
    server, port = _serve(build_app(engine, "tiny"))
    rss_before = _rss_mib()
    sockets = [_open_never_read(port, i, MAX_MODEL_LEN - 16, args.n) for i in range(args.streams)]
    started = time.monotonic()
    peak_unread = 0
    print(f"{args.streams} never-read streams (n={args.n}, up to {MAX_MODEL_LEN - 16} tokens each), "
          f"bound {args.max_unread} unread outputs; RSS {rss_before:.0f} MiB before")
    while (elapsed := time.monotonic() - started) < args.seconds:
        stats = engine.stats()
        unread = [s.unread for s in list(engine._streams.values())]  # noqa: SLF001 - what the streams hold
        peak_unread = max([peak_unread, *unread])
        print(f"{elapsed:6.1f} s  in flight {stats.get('num_in_flight', 0):2d}  KV blocks {stats['kv_blocks_used']:5d}"
              f"  unread per stream {unread}  aborted {len(overflowed)}  RSS {_rss_mib():.0f} MiB", flush=True)
        time.sleep(min(10.0, args.seconds - elapsed + 0.01))
    stats = engine.stats()
    rss_after = _rss_mib()
    for sock in sockets:
        sock.close()
    server.should_exit = True
    held = stats.get("num_in_flight", 0) == 0 and stats["kv_blocks_used"] == 0
    verdict = "PASS" if held and peak_unread <= args.max_unread + 1 else "FAIL"
    print(f"{verdict}: after {args.seconds:.0f} s: in flight {stats.get('num_in_flight', 0)}, KV blocks "
          f"{stats['kv_blocks_used']}, peak unread outputs per stream {peak_unread} (bound {args.max_unread}), "
          f"streams aborted for not reading {len(overflowed)}, RSS {rss_before:.0f} -> {rss_after:.0f} MiB")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
