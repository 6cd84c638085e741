"""AsyncLLMEngine on a tiny random-weight Llama: streams, abort, admission bound, faults, idle, stop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pagedserve import SamplingParams
from pagedserve.config import EngineConfig
from pagedserve.engine.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    EngineOverloadedError,
    EngineStepError,
)
from pagedserve.engine.llm_engine import LLMEngine

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
PROMPTS = ["Hello world", "The quick brown fox", "1 2 3 4"]


@pytest.fixture
def engine(tiny_llama_dir) -> LLMEngine:
    return LLMEngine(EngineConfig.from_kwargs(str(tiny_llama_dir), num_blocks=128, block_size=4, max_num_seqs=4))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


async def _drain(stream) -> list:
    return [out async for out in stream]


async def _started(engine: LLMEngine, **kwargs) -> AsyncLLMEngine:
    eng = AsyncLLMEngine(engine, **kwargs)
    eng.start()
    return eng


def _all_free(e: LLMEngine) -> bool:
    s = e.kv_stats()
    return s.free_blocks == s.total_blocks


def test_streams_match_offline_generate(engine, tiny_llm):
    expected = [o.outputs[0].token_ids for o in tiny_llm.generate(PROMPTS, GREEDY, use_tqdm=False)]

    async def main():
        eng = await _started(engine)
        streams = [await eng.add_request(f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS)]
        results = await asyncio.gather(*(_drain(s) for s in streams))
        assert await eng.call(_all_free)
        await eng.stop()
        return results

    for outs, want in zip(run(main()), expected, strict=True):
        assert outs[-1].finished and all(not o.finished for o in outs[:-1])
        assert outs[-1].outputs[0].token_ids == want
        assert [t for o in outs for t in o.outputs[0].token_ids_delta] == want  # deltas add up
        assert "".join(o.outputs[0].text_delta for o in outs) == outs[-1].outputs[0].text


def test_abort_frees_blocks_before_the_next_step(engine):
    async def main():
        eng = await _started(engine)
        stream = await eng.add_request("long", "Tell me everything", LONG)
        first = await anext(stream)
        assert not first.finished
        assert not await eng.call(_all_free)
        eng.abort("long")
        # commands run in order on the engine thread: this call sees the state right after the abort
        assert await eng.call(_all_free)
        assert await eng.call(lambda e: len(e.scheduler.running)) == 0
        assert await _drain(stream) == []  # the aborted stream just ends
        assert eng.num_in_flight == 0
        await eng.stop()

    run(main())


def test_admission_bound(engine):
    async def main():
        eng = await _started(engine, max_in_flight=2)
        a = await eng.add_request("a", "one", GREEDY)
        b = await eng.add_request("b", "two", GREEDY)
        with pytest.raises(EngineOverloadedError):
            await eng.add_request("c", "three", GREEDY)
        await asyncio.gather(_drain(a), _drain(b))
        assert eng.has_capacity(2)
        assert (await _drain(await eng.add_request("c", "three", GREEDY)))[-1].finished
        await eng.stop()

    run(main())


def test_refused_request_raises_value_error(engine):
    async def main():
        eng = await _started(engine)
        with pytest.raises(ValueError, match="prompt"):
            await eng.add_request("x", "word " * 600, GREEDY)  # longer than the context
        with pytest.raises(ValueError, match="max_tokens"):
            await eng.add_request("y", "hi", SamplingParams(max_tokens=100_000))
        assert eng.num_in_flight == 0
        assert (await _drain(await eng.add_request("z", "hi", GREEDY)))[-1].finished
        await eng.stop()

    run(main())


def test_priority_reaches_the_core_and_fcfs_refuses_it(engine, tiny_llama_dir):
    async def refused():
        eng = await _started(engine)
        with pytest.raises(ValueError, match="^priority must be 0"):
            await eng.add_request("x", "hi", GREEDY, priority=2)
        assert eng.num_in_flight == 0
        await eng.stop()

    async def threaded(prio_engine: LLMEngine):
        eng = await _started(prio_engine)
        await eng.add_request("p", "hi", LONG, priority=-3)
        assert await eng.call(lambda e: e.scheduler.requests["p"].priority) == -3
        eng.abort("p")
        assert await eng.call(_all_free)
        await eng.stop()

    run(refused())
    run(threaded(LLMEngine(EngineConfig.from_kwargs(str(tiny_llama_dir), num_blocks=128, block_size=4,
                                                    scheduling_policy="priority"))))


def test_step_error_fails_that_steps_requests_and_the_loop_goes_on(engine, monkeypatch):
    """One sequence runs at a time: the failing step carries A only; B waits and is served after."""
    engine.scheduler.config.max_num_seqs = 1
    real = engine.runner.execute
    calls = {"n": 0}

    def flaky(sched):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected fault")
        return real(sched)

    monkeypatch.setattr(engine.runner, "execute", flaky)

    async def main():
        eng = await _started(engine)
        a = await eng.add_request("a", "first", LONG)
        b = await eng.add_request("b", "second", GREEDY)
        with pytest.raises(EngineStepError, match="injected fault"):
            await _drain(a)
        outs = await _drain(b)
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == GREEDY.max_tokens
        assert eng.is_running and eng.num_step_errors == 1
        assert await eng.call(_all_free)
        await eng.stop()

    run(main())


def test_dead_loop(engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("broken beyond repair")

    monkeypatch.setattr(engine.runner, "execute", broken)
    monkeypatch.setattr(engine, "abort_request", broken)  # recovery fails too: the loop dies

    async def main():
        eng = await _started(engine)
        stream = await eng.add_request("a", "hi", GREEDY)
        with pytest.raises(EngineDeadError):
            await _drain(stream)
        assert not eng.is_running and eng.dead_error is not None
        with pytest.raises(EngineDeadError):
            await eng.add_request("b", "hi", GREEDY)
        await eng.stop()

    run(main())


def test_idle_loop_sleeps(engine):
    """No busy loop: once the work is done the thread waits; no iteration runs until a command comes."""
    iterations = {"n": 0}

    def hook(e, outputs):
        iterations["n"] += 1

    async def main():
        eng = await _started(engine, on_step=hook)
        await _drain(await eng.add_request("a", "hi", GREEDY))
        # read on the engine thread: `fn` runs inside an iteration, before that iteration's hook
        before = await eng.call(lambda e: iterations["n"])
        await asyncio.sleep(0.3)  # waiting to observe that nothing happens
        after = await eng.call(lambda e: iterations["n"])
        assert after == before + 1  # only the iteration of the first call itself
        await eng.stop()

    run(main())


def test_slow_reader_gets_outputs_merged(engine):
    async def main():
        eng = await _started(engine)
        stream = await eng.add_request("a", "hi", GREEDY)
        while not await eng.call(lambda e: not e.has_unfinished_requests()):
            await asyncio.sleep(0.01)  # let the engine run ahead of this reader
        outs = await _drain(stream)
        await eng.stop()
        return outs

    outs = run(main())
    assert len(outs) < GREEDY.max_tokens  # several steps arrived as one output
    final = outs[-1].outputs[0]
    assert [t for o in outs for t in o.outputs[0].token_ids_delta] == final.token_ids
    assert "".join(o.outputs[0].text_delta for o in outs) == final.text


def test_stop_aborts_in_flight(engine):
    async def main():
        eng = await _started(engine)
        stream = await eng.add_request("a", "hi", LONG)
        await anext(stream)
        await eng.stop()
        assert not eng.is_running
        try:
            rest = await _drain(stream)
            assert rest and rest[-1].outputs[0].finish_reason == "abort"
        except EngineDeadError:
            pass
        assert _all_free(engine)
        with pytest.raises(EngineDeadError):
            await eng.add_request("b", "hi", GREEDY)

    run(main())


def test_build_makes_and_steps_the_engine_on_one_thread(tiny_llama_dir, tiny_llm):
    """AsyncLLMEngine.build: the factory runs on the thread that later steps the engine."""
    built_on = []

    def factory() -> LLMEngine:
        built_on.append(threading.current_thread())
        return LLMEngine(EngineConfig.from_kwargs(str(tiny_llama_dir), num_blocks=128, block_size=4))

    expected = tiny_llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids

    async def main():
        eng = AsyncLLMEngine.build(factory)
        eng.start()
        outs = await _drain(await eng.add_request("r0", PROMPTS[0], GREEDY))
        stepped_on = await eng.call(lambda e: threading.current_thread())
        await eng.stop()
        return outs, stepped_on

    outs, stepped_on = run(main())
    assert stepped_on is built_on[0] and stepped_on is not threading.main_thread()
    assert outs[-1].outputs[0].token_ids == expected


def test_build_reraises_factory_errors_and_stop_before_start_ends_the_thread(tiny_llama_dir):
    def broken() -> LLMEngine:
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        AsyncLLMEngine.build(broken)
    eng = AsyncLLMEngine.build(lambda: LLMEngine(EngineConfig.from_kwargs(str(tiny_llama_dir), num_blocks=64,
                                                                          block_size=4)))
    thread = eng._built_on
    run(eng.stop())
    thread.join(5)
    assert not thread.is_alive()


def test_stream_interval_gathers_tokens_but_never_the_first_or_last(engine):
    async def main():
        eng = AsyncLLMEngine(engine, stream_interval=4)
        eng.start()
        outs = await _drain(await eng.add_request("r", "Hello world", GREEDY))  # 12 tokens
        await eng.stop()
        return outs

    outs = run(main())
    sizes = [len(o.outputs[0].token_ids_delta) for o in outs]
    assert sizes[0] == 1 and all(n >= 4 for n in sizes[1:-1]) and sum(sizes) == 12
    assert len(outs) <= 1 + 11 // 4 + 1 and outs[-1].finished
    assert [t for o in outs for t in o.outputs[0].token_ids_delta] == outs[-1].outputs[0].token_ids
    assert "".join(o.outputs[0].text_delta for o in outs) == outs[-1].outputs[0].text


def test_client_stats_snapshot_and_model_info(engine):
    async def main():
        eng = AsyncLLMEngine(engine, served_model_name="tiny")
        before = eng.initial_stats()
        eng.start()
        stream = await eng.add_request("long", "Tell me everything", LONG)
        await anext(stream)
        stats, snap = await eng.stats(), await eng.kv_snapshot()
        eng.abort("long")
        after = await eng.stats()
        await eng.stop()
        return before, stats, snap, after, eng.model_info()

    before, stats, snap, after, info = run(main())
    assert before.kv.used_blocks == 0 and before.num_running == 0
    assert stats.num_running == 1 and stats.kv.used_blocks > 0
    assert [b.block_id for b in snap if b.owners == ["long"]] and len(snap) == stats.kv.total_blocks
    assert after.kv.used_blocks == 0 and after.num_running == 0
    assert (info.name, info.max_num_seqs, info.capacity_tokens) == ("tiny", 4, 128 * 4)
