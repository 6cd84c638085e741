"""AsyncLLMEngine: the EngineClient of an in-process engine. One thread runs engine steps while
requests arrive; each request gets an async stream.

Input is validated and tokenized on the event loop with the client's own input processor (its own
tokenizer copy), so a refused request never reaches the engine thread and the thread gets token ids.

The LLMEngine is touched only by its own thread. The event loop hands it work (add / abort) through
a command list guarded by a Condition, on which the thread sleeps when it has nothing to do (no
polling, no sleeps). Outputs go back with `loop.call_soon_threadsafe`, one call per step, into
per-request asyncio queues, so a slow HTTP client only ever delays its own stream.

`AsyncLLMEngine.build` constructs the LLMEngine on the thread that will step it. PyTorch's CPU ops
run on OpenMP, and every thread that runs a parallel op gets its own OpenMP worker pool; with a
second pool on a 2-core machine libgomp stops spin-waiting and each of the ~200 ops in a step pays
a futex wake-up (measured here: 64 → 82 ms per decode step). One thread doing all tensor work keeps
one pool.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from pagedserve.config import EngineConfig
from pagedserve.core.kv_cache_manager import BlockInfo
from pagedserve.core.kv_events import KVEventLog
from pagedserve.engine.input_processor import EngineInput, InputProcessor, PromptType
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.protocol import EngineClient, EngineStats, ModelInfo, StepHook
from pagedserve.outputs import RequestOutput
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")



class EngineDeadError(RuntimeError):
    """The engine loop has stopped (crashed or shut down): nothing more will be served."""


class EngineStepError(RuntimeError):
    """An engine step raised while it was working on this request; the request was aborted."""


class EngineOverloadedError(RuntimeError):
    """Admission bound reached: the request was not queued."""


_CLOSED = object()  # put into an aborted stream's queue to wake its reader


class RequestStream:
    """The outputs of one request, in order. Ends after the finished output, or raises the error."""

    def __init__(self, request_id: str, stream_interval: int = 1) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[RequestOutput | BaseException | object] = asyncio.Queue()
        self._held: BaseException | None = None  # an error that came after outputs not yet read
        self.finished = False
        # Tokens gathered before the reader is woken (the first token and the last output never wait):
        # fewer, larger events cost the HTTP front end and its clients less CPU.
        self.stream_interval = stream_interval
        self._gathered: RequestOutput | None = None
        self._sent_first = False

    def put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, RequestOutput) and self.stream_interval > 1:
            item = item if self._gathered is None else merge_outputs(self._gathered, item)
            new = max((len(c.token_ids_delta) for c in item.outputs), default=0)
            if self._sent_first and not item.finished and new < self.stream_interval:
                self._gathered = item
                return
            self._gathered, self._sent_first = None, True
        elif self._gathered is not None:  # an error: what was gathered goes first
            self._queue.put_nowait(self._gathered)
            self._gathered = None
        self._queue.put_nowait(item)

    def close(self) -> None:
        """End the stream early (aborted): a reader waiting on it stops instead of hanging."""
        self.finished = True
        self._queue.put_nowait(_CLOSED)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        if self._held is not None:
            item, self._held = self._held, None
        else:
            item = await self._queue.get()
        if item is _CLOSED or self.finished:
            raise StopAsyncIteration
        # A client that reads slower than the engine steps gets what piled up as one output; an error
        # behind it comes on the next read, so the tokens made before it still reach the client.
        while isinstance(item, RequestOutput) and not item.finished and not self._queue.empty():
            nxt = self._queue.get_nowait()
            if nxt is _CLOSED:
                raise StopAsyncIteration
            if isinstance(nxt, BaseException):
                self._held = nxt
                break
            item = merge_outputs(item, nxt)
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        assert isinstance(item, RequestOutput)
        self.finished = item.finished
        return item


def merge_outputs(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    """`new` with the deltas of `old` prepended: what one output covering both steps would hold."""
    prev = {c.index: c for c in old.outputs}
    merged = []
    for c in new.outputs:
        p = prev.get(c.index)
        if p is not None:
            c = replace(c, text_delta=p.text_delta + c.text_delta,
                        token_ids_delta=list(p.token_ids_delta) + list(c.token_ids_delta))
        merged.append(c)
    return replace(new, outputs=merged)


@dataclass
class _Add:
    request: EngineInput
    future: asyncio.Future[None]


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[LLMEngine], object]
    future: asyncio.Future[object]


class AsyncLLMEngine(EngineClient):
    """Runs `engine` on a background thread. Every public method is called from the event loop."""

    def __init__(self, engine: LLMEngine, max_in_flight: int = 1024, on_step: StepHook | None = None,
                 served_model_name: str | None = None, stream_interval: int = 1, live_view: bool = True) -> None:
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        self.engine = engine
        self.stream_interval = stream_interval
        self.max_in_flight = max_in_flight
        self.on_step = on_step
        # The event loop tokenizes while the engine thread decodes: it gets its own tokenizer.
        self._input_processor = engine.input_processor.copy_for_another_thread()
        self._model_info = engine.model_info(served_model_name)
        self._cond = threading.Condition()
        self._commands: list[_Add | _Abort | _Call] = []  # guarded by _cond
        self._stopping = False
        self._draining = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}  # event-loop side: admitted, not yet finished
        self._active: set[str] = set()  # engine-thread side: ids the LLMEngine holds
        self.dead_error: BaseException | None = None
        self.num_step_errors = 0
        self._built_on: threading.Thread | None = None  # set by build(): the loop runs there
        self._go = threading.Event()
        if live_view:  # the served engine keeps its history and traces for the live page
            engine.enable_live_view()

    @classmethod
    def build(cls, factory: Callable[[], LLMEngine], **kwargs: Any) -> AsyncLLMEngine:
        """Make the LLMEngine with `factory()` on a new thread, which then waits for `start()` and
        runs the loop: model loading and every step happen on that one thread (see the module doc).
        Blocks until the engine is built; re-raises what the factory raised."""
        built: dict[str, Any] = {}
        ready = threading.Event()

        def thread_main() -> None:
            try:
                built["engine"] = cls(factory(), **kwargs)
            except BaseException as e:
                built["error"] = e
                return
            finally:
                ready.set()
            async_engine = built["engine"]
            async_engine._go.wait()
            if not async_engine._stopping:  # stopped before it ever started: nothing to run
                async_engine._run()

        thread = threading.Thread(target=thread_main, name="pagedserve-engine", daemon=True)
        thread.start()
        ready.wait()
        if "error" in built:
            raise built["error"]
        built["engine"]._built_on = thread
        return built["engine"]

    # --- lifecycle (event loop) ---------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine loop already started")
        self._loop = asyncio.get_running_loop()
        if self._built_on is not None:  # the thread that built the engine is waiting for this
            self._thread = self._built_on
            self._go.set()
            return
        self._thread = threading.Thread(target=self._run, name="pagedserve-engine", daemon=True)
        self._thread.start()

    async def stop(self, timeout: float | None = 30.0) -> None:
        """Abort what is still in flight and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._go.set()  # a built-but-never-started thread is parked on it
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
        self._fail_all(EngineDeadError("the server is shutting down"))

    def drain(self, grace_s: float) -> None:
        """Graceful shutdown, first half: admit nothing more; whatever still runs after `grace_s` is
        aborted, and its stream ends with a finish_reason "abort" output rather than a cut connection."""
        self._draining = True
        assert self._loop is not None
        self._loop.call_later(grace_s, self._abort_in_flight)

    def drain_threadsafe(self, grace_s: float) -> None:
        """`drain` from a signal handler or another thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.drain, grace_s)

    def _abort_in_flight(self) -> None:
        for rid in list(self._streams):
            self._submit(_Abort(rid))  # the stream stays registered: the engine's abort output ends it

    @property
    def unavailable_reason(self) -> str | None:
        """Why no new request is accepted, or None while the loop is alive and accepting."""
        if self._thread is None:
            return "the engine loop has not started"
        if self.dead_error is not None or not self._thread.is_alive():
            return f"the engine loop died: {self.dead_error!r}"
        if self._stopping or self._draining:
            return "the server is shutting down"
        return None

    # --- EngineClient ---------------------------------------------------------------------------

    @property
    def input_processor(self) -> InputProcessor:
        return self._input_processor

    def model_info(self) -> ModelInfo:
        return self._model_info

    async def stats(self) -> EngineStats:
        return await self.call(lambda e: e.stats())

    async def kv_snapshot(self) -> list[BlockInfo]:
        return await self.call(lambda e: e.kv_snapshot())

    async def reset_prefix_cache(self) -> bool:
        return await self.call(lambda e: e.reset_prefix_cache())

    async def live_snapshot(self, max_cells: int, max_rows: int) -> dict | None:
        return await self.call(lambda e: e.live_snapshot(max_cells, max_rows))

    async def live_block(self, block_id: int) -> dict | None:
        return await self.call(lambda e: e.live_block(block_id))

    async def live_request_trace(self, request_id: str) -> dict | None:
        return await self.call(lambda e: e.live_request_trace(request_id))

    def kv_events(self) -> KVEventLog | None:
        return self.engine.core.kv.kv_events  # the log takes its own lock: no hop to the engine thread

    def kv_block_size(self) -> int | None:
        return self.engine.core.kv.block_size

    def initial_stats(self) -> EngineStats:
        """Figures before the loop starts (read on the caller's thread: nothing runs yet)."""
        assert self._thread is None, "the loop runs: use `await stats()`"
        return self.engine.stats()

    @property
    def is_running(self) -> bool:
        """True while the loop thread is alive and accepting work (what /health reports)."""
        return self.unavailable_reason is None

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def has_capacity(self, num_requests: int = 1) -> bool:
        return len(self._streams) + num_requests <= self.max_in_flight

    # --- requests (event loop) ----------------------------------------------------------------

    async def add_request(self, request_id: str, prompt: PromptType | EngineInput,
                          params: SamplingParams | PoolingParams | None = None,
                          arrival_time: float | None = None, priority: int = 0) -> RequestStream:
        """Queue a request and wait until the engine accepted it. `prompt` may be an EngineInput the
        caller validated with `input_processor` (then `params`, `arrival_time` and `priority` are its own).

        Raises EngineOverloadedError beyond the admission bound, ValueError when the input is refused,
        EngineDeadError when the loop is not running.
        """
        if not self.is_running:
            raise EngineDeadError(self.unavailable_reason) from self.dead_error
        if not self.has_capacity():
            raise EngineOverloadedError(f"{len(self._streams)} requests in flight; the limit is {self.max_in_flight}")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        assert self._loop is not None
        if isinstance(prompt, EngineInput):
            request = prompt
            if request.request_id != request_id:
                raise ValueError(f"request_id {request_id!r} differs from the input's {request.request_id!r}")
        else:
            arrival = time.monotonic() if arrival_time is None else arrival_time
            if isinstance(params, PoolingParams):
                request = self._input_processor.process_pooling(request_id, prompt, params, arrival,
                                                                priority=priority)
            else:
                request = self._input_processor.process(request_id, prompt, params, arrival, priority=priority)
        stream = RequestStream(request_id, self.stream_interval)
        self._streams[request_id] = stream
        future: asyncio.Future[None] = self._loop.create_future()
        self._submit(_Add(request, future))
        try:
            await future
        except asyncio.CancelledError:
            self.abort(request_id)  # the caller went away while the request was being admitted
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request; the engine thread frees its KV blocks before its next step."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return  # already finished, failed or aborted
        stream.close()
        self._submit(_Abort(request_id))

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` on the engine thread between two steps, after every command sent before it
        (so after an `abort` it sees the blocks freed). For consistent reads of the engine's state."""
        if self._stopping or self.dead_error is not None or not (self._thread and self._thread.is_alive()):
            raise EngineDeadError("the engine loop is not running") from self.dead_error
        assert self._loop is not None
        future: asyncio.Future[object] = self._loop.create_future()
        self._submit(_Call(fn, future))
        return await future  # type: ignore[return-value]

    def _submit(self, command: _Add | _Abort | _Call) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    # --- event-loop callbacks (posted by the engine thread) ----------------------------------

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted meanwhile
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        for rid in request_ids:
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream.put(error)

    def _fail_all(self, error: BaseException) -> None:
        self._fail(list(self._streams), error)

    @staticmethod
    def _resolve(future: asyncio.Future, error: BaseException | None, result: object = None) -> None:
        if future.done():
            return  # the caller was cancelled
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def _post(self, fn: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is left to tell
            pass

    # --- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._serve_once():
                pass
        except BaseException as e:  # the loop is dead: fail everyone, /health turns 503
            logger.exception("engine loop died")
            self.dead_error = e
            self._post(self._fail_all, EngineDeadError(f"the engine loop died: {e!r}"))

    def _serve_once(self) -> bool:
        with self._cond:
            while not (self._commands or self._stopping or self.engine.has_unfinished_requests()):
                self._cond.wait()
            commands, self._commands = self._commands, []
            stopping = self._stopping
        for command in commands:
            self._apply(command)
        if stopping and self._active:
            self.engine.abort_request(sorted(self._active))
            self._active.clear()
        outputs = self._step() if self.engine.has_unfinished_requests() else []
        if self.on_step is not None:  # before delivery: a client never sees metrics older than its reply
            try:
                self.on_step(self.engine.stats(), outputs)
            except Exception:  # a metrics bug must not take the engine down
                logger.exception("on_step hook failed")
        if outputs:
            self._post(self._deliver, outputs)
        return not stopping

    def _apply(self, command: _Add | _Abort | _Call) -> None:
        if isinstance(command, _Abort):
            if command.request_id in self._active:
                self._active.discard(command.request_id)
                self.engine.abort_request(command.request_id)
            return
        if isinstance(command, _Call):
            try:
                self._post(self._resolve, command.future, None, command.fn(self.engine))
            except Exception as e:
                self._post(self._resolve, command.future, e)
            return
        error: BaseException | None = None
        try:
            self.engine.add_processed(command.request)
            self._active.add(command.request.request_id)
        except Exception as e:  # refused before it touched the engine's state
            error = e
        self._post(self._resolve, command.future, error)

    def _step(self) -> list[RequestOutput]:
        try:
            outputs = self.engine.step()
        except Exception as e:
            self.num_step_errors += 1
            logger.exception("engine step failed")
            # Fail the requests the step was working on. When none is running (the step failed
            # before scheduling) fail them all, or the same error would repeat forever; with no
            # request to blame at all the engine itself is broken: the loop dies.
            failed = [r for r in self.engine.running_request_ids() if r in self._active] or sorted(self._active)
            if not failed:
                raise
            self.engine.abort_request(failed)  # frees their blocks; if this raises, the loop is dead
            self._active.difference_update(failed)
            self._post(self._fail, failed, EngineStepError(f"engine step failed: {e!r}"))
            return []
        for out in outputs:
            if out.finished:
                self._active.discard(out.request_id)
        return outputs


EngineSource = EngineConfig | LLMEngine | Callable[[], LLMEngine]


def make_engine_client(engine: EngineClient | EngineSource, served_model_name: str | None = None,
                       stream_interval: int = 1) -> EngineClient:
    """An EngineClient as given, or the in-process one around an LLMEngine, or around one built from
    a config or a factory — then on the thread that will step it, which keeps PyTorch to one OpenMP
    pool (see AsyncLLMEngine.build): the fast way to serve."""
    if isinstance(engine, EngineClient):
        return engine
    options = {"served_model_name": served_model_name, "stream_interval": stream_interval}
    if isinstance(engine, LLMEngine):
        return AsyncLLMEngine(engine, **options)
    if isinstance(engine, EngineConfig):
        config = engine
        return AsyncLLMEngine.build(lambda: LLMEngine(config), **options)
    return AsyncLLMEngine.build(engine, **options)
