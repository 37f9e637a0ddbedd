"""AsyncLLMEngine on a model-free engine: streaming, cancellation, queue limit, step failures, shutdown."""

from __future__ import annotations

import asyncio

import pytest

from tests.server.fake_engine import FakeEngine
from tokenmill.engine.async_engine import AsyncLLMEngine, EngineOverloadedError
from tokenmill.errors import RequestFailedError
from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import SamplingParams


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


async def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_generate_streams_cumulative_outputs_to_the_end():
    async def main():
        engine = AsyncLLMEngine(FakeEngine())
        outputs = [o async for o in engine.generate("a", [1, 2], SamplingParams(max_tokens=5))]
        await engine.shutdown(1.0)
        return outputs

    outputs = run(main())
    assert outputs[-1].finished and outputs[-1].outputs[0].token_ids == [1, 2, 3, 4, 5]
    assert all(not o.finished for o in outputs[:-1])


def test_bad_input_raises_before_streaming_and_the_loop_keeps_serving():
    async def main():
        engine = AsyncLLMEngine(FakeEngine())
        with pytest.raises(InvalidRequestError) as info:
            await engine.add_request("bad", [], SamplingParams(max_tokens=2))
        assert info.value.field == "prompt"
        outputs = [o async for o in engine.generate("good", [3], SamplingParams(max_tokens=2))]
        await engine.shutdown(1.0)
        return outputs

    assert run(main())[-1].finished


def test_consumer_that_stops_early_aborts_the_request():
    fake = FakeEngine(step_delay_s=0.01)

    async def main():
        engine = AsyncLLMEngine(fake)
        async for output in engine.generate("x", [1], SamplingParams(max_tokens=1000)):
            if len(output.outputs[0].token_ids) >= 3:
                break
        await _wait_for(lambda: engine.stats()["num_in_flight"] == 0 and not fake.requests)
        await engine.shutdown(1.0)

    run(main())
    assert fake.aborted == ["x"]


def test_cancelled_consumer_aborts_the_request():
    fake = FakeEngine(step_delay_s=0.01)

    async def main():
        engine = AsyncLLMEngine(fake)

        async def consume():
            async for _ in engine.generate("c", [1], SamplingParams(max_tokens=1000)):
                pass

        task = asyncio.create_task(consume())
        await _wait_for(lambda: fake.num_steps >= 3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _wait_for(lambda: not fake.requests)
        await engine.shutdown(1.0)

    run(main())
    assert fake.aborted == ["c"]


def test_waiting_queue_over_max_queue_is_refused():
    fake = FakeEngine()
    fake._gate.clear()  # hold the first step so the next adds pile up between steps

    async def main():
        engine = AsyncLLMEngine(fake, max_queue=2)
        first = await engine.add_request("r0", [1], SamplingParams(max_tokens=1))
        await _wait_for(lambda: fake.num_steps == 0 and fake.requests and not engine._commands)
        await asyncio.sleep(0.05)  # the loop is now inside step(), blocked on the gate
        adds = [asyncio.create_task(engine.add_request(f"r{i}", [1], SamplingParams(max_tokens=1)))
                for i in range(1, 6)]
        await asyncio.sleep(0.05)
        fake._gate.set()
        results = await asyncio.gather(*adds, return_exceptions=True)
        outputs = [o async for o in first]
        await engine.shutdown(1.0)
        return results, outputs

    results, outputs = run(main())
    refused = [r for r in results if isinstance(r, EngineOverloadedError)]
    assert len(refused) == 3 and "max-queue" in str(refused[0])
    assert outputs[-1].finished


def test_step_failure_fails_in_flight_requests_and_later_requests_work():
    async def main():
        engine = AsyncLLMEngine(FakeEngine(fail_on_step=2))
        with pytest.raises(RequestFailedError, match="simulated device failure"):
            async for _ in engine.generate("f", [1], SamplingParams(max_tokens=10)):
                pass
        outputs = [o async for o in engine.generate("ok", [1], SamplingParams(max_tokens=3))]
        await engine.shutdown(1.0)
        return engine, outputs

    engine, outputs = run(main())
    assert outputs[-1].finished and engine.num_step_errors == 1


def test_shutdown_drains_then_aborts_what_is_left():
    fake = FakeEngine(step_delay_s=0.02)

    async def main():
        engine = AsyncLLMEngine(fake)
        short = await engine.add_request("short", [1], SamplingParams(max_tokens=3))
        long = await engine.add_request("long", [1], SamplingParams(max_tokens=100000))
        short_outputs: list = []
        long_outputs: list = []

        async def drain(stream, sink):
            async for o in stream:
                sink.append(o)

        tasks = [asyncio.create_task(drain(short, short_outputs)), asyncio.create_task(drain(long, long_outputs))]
        await asyncio.sleep(0.01)
        await engine.shutdown(drain_timeout_s=0.5)
        await asyncio.gather(*tasks)
        with pytest.raises(EngineOverloadedError):
            await engine.add_request("late", [1], SamplingParams(max_tokens=1))
        assert not engine.is_running
        return short_outputs, long_outputs

    short_outputs, long_outputs = run(main())
    assert short_outputs[-1].outputs[0].finish_reason == "length"
    assert long_outputs[-1].finished and long_outputs[-1].outputs[0].finish_reason == "abort"
    assert fake.aborted == ["long"]


def test_a_slow_consumer_gets_queued_deltas_merged_into_one():
    fake = FakeEngine()
    fake._gate.clear()  # hold the loop until the consumer is slow on purpose

    async def main():
        engine = AsyncLLMEngine(fake)
        stream = await engine.add_request("d", [7, 8], SamplingParams(max_tokens=6, output_kind="delta"))
        fake._gate.set()
        await _wait_for(lambda: not fake.requests)  # all 6 steps ran before we read anything
        outputs = [o async for o in stream]
        await engine.shutdown(1.0)
        return outputs

    outputs = run(main())
    assert len(outputs) == 1 and outputs[0].finished
    merged = outputs[0].outputs[0]
    assert merged.text == "1 2 3 4 5 6" and merged.token_ids == [1, 2, 3, 4, 5, 6]
    assert merged.finish_reason == "length" and outputs[0].prompt_token_ids == [7, 8]


def test_delta_streams_add_up_and_final_only_answers_once():
    async def main():
        engine = AsyncLLMEngine(FakeEngine(step_delay_s=0.005))
        deltas = [o async for o in engine.generate("d", [1], SamplingParams(max_tokens=5, output_kind="delta"))]
        finals = [o async for o in engine.generate("f", [1], SamplingParams(max_tokens=5, output_kind="final_only"))]
        await engine.shutdown(1.0)
        return deltas, finals

    deltas, finals = run(main())
    assert "".join(o.outputs[0].text for o in deltas) == "1 2 3 4 5"
    assert [t for o in deltas for t in o.outputs[0].token_ids] == [1, 2, 3, 4, 5]
    assert len(finals) == 1 and finals[0].outputs[0].token_ids == [1, 2, 3, 4, 5]


def test_shutdown_ends_a_delta_stream_with_an_empty_abort_and_fails_a_final_only_request():
    fake = FakeEngine(step_delay_s=0.02)

    async def main():
        engine = AsyncLLMEngine(fake)
        delta = await engine.add_request("d", [1], SamplingParams(max_tokens=100000, output_kind="delta"))
        final = await engine.add_request("f", [1], SamplingParams(max_tokens=100000, output_kind="final_only"))
        await _wait_for(lambda: fake.num_steps >= 3)
        received = [await delta.__anext__()]  # some deltas went out before the shutdown
        shutdown = asyncio.create_task(engine.shutdown(drain_timeout_s=0.1))
        received += [o async for o in delta]
        with pytest.raises(EngineOverloadedError, match="before this request finished"):
            async for _ in final:
                pass
        await shutdown
        return received

    received = run(main())
    last = received[-1]
    assert last.finished and last.outputs[0].finish_reason == "abort"
    # The abort repeats nothing that went out before (it may arrive merged with the last queued delta).
    ids = [t for o in received for t in o.outputs[0].token_ids]
    assert ids == list(range(1, len(ids) + 1)) and len(ids) >= 3
    assert "".join(o.outputs[0].text for o in received) == " ".join(map(str, ids))
