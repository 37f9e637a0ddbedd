"""A stream whose consumer stops reading holds a bounded buffer: past it the request is aborted, its KV blocks
are freed and the buffer is dropped, while a consumer that reads slowly loses nothing."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.server.conftest import make_engine
from tokenmill.errors import RequestFailedError
from tokenmill.sampling_params import SamplingParams

LIMIT = 8


def test_a_stream_that_is_never_read_is_aborted_and_its_kv_freed(model_dir):
    engine = make_engine(model_dir, max_unread_outputs=LIMIT)

    async def main():
        params = SamplingParams(max_tokens=200, ignore_eos=True, output_kind="delta")
        stream = await engine.add_request("never-read", [1, 2, 3], params)
        deadline = time.monotonic() + 60
        while engine.stats().get("num_in_flight", 1) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)  # let the loop run the buffer replacement it was sent
        held = stream._stream.queue.qsize()
        stats = engine.stats()
        with pytest.raises(RequestFailedError, match="read none") as failure:
            await stream.__anext__()
        await engine.shutdown(1.0)
        return held, stats, failure.value

    held, stats, error = asyncio.run(main())
    assert stats["num_in_flight"] == 0 and stats["kv_blocks_used"] == 0, stats
    assert held == 1, f"{held} items still buffered after the abort"  # only the error is left
    assert error.field == "stream"


def test_a_slow_but_reading_consumer_gets_everything(model_dir):
    # Each read takes everything queued, so only a reader slower than LIMIT steps between reads could lose.
    engine = make_engine(model_dir, max_unread_outputs=64)

    async def main():
        params = SamplingParams(max_tokens=60, ignore_eos=True, output_kind="delta")
        tokens = []
        async for output in engine.generate("slow-reader", [1, 2, 3], params):
            tokens.extend(output.outputs[0].token_ids)
            await asyncio.sleep(0.01)
        await engine.shutdown(1.0)
        return tokens

    assert len(asyncio.run(main())) == 60
