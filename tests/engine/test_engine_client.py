"""The seams between the front end and the core: plain data crosses them (pickle), the server talks to
the engine only through EngineClient (an import check, and the whole app run against a stand-in
client with no model behind it), and the runtime imports neither the bench nor matplotlib."""

from __future__ import annotations

import ast
import asyncio
import pickle
import subprocess
import sys
from pathlib import Path

import httpx

import pagedserve
from pagedserve import SamplingParams
from pagedserve.core.kv_cache_manager import BlockInfo, KVCacheStats
from pagedserve.core.request import Request
from pagedserve.engine.core_messages import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest
from pagedserve.engine.input_processor import EngineInput, InputProcessor
from pagedserve.engine.protocol import EngineClient, EngineStats, ModelInfo
from pagedserve.entrypoints.openai.api_server import build_app
from pagedserve.entrypoints.openai.serving_base import ServerConfig
from pagedserve.outputs import CompletionOutput, RequestMetrics, RequestOutput

SERVER_DIR = Path(pagedserve.__file__).parent / "entrypoints" / "openai"
# What the server may import from the package: the client interface and plain data.
ALLOWED = ("pagedserve.engine.protocol", "pagedserve.engine.async_engine", "pagedserve.engine.input_processor",
           "pagedserve.outputs", "pagedserve.sampling_params", "pagedserve.entrypoints", "pagedserve.config",
           "pagedserve.structured_output.params", "pagedserve.pooling_params",  # request parameters
           # the serve command's --ray launcher (cli.py): Ray Serve replicas build this same app in process
           "pagedserve.serving.ray_options", "pagedserve.serving.ray_app")
ENGINE_INTERNALS = {"scheduler", "runner", "kv_caches", "kv_stats", "step_records", "output_processor", "core"}


def test_requests_and_outputs_pickle():
    params = SamplingParams(temperature=0.7, seed=3, stop=["x"], max_tokens=5)
    req = Request("r", [1, 2, 3], params, eos_token_id=2, seed=3)
    req.output_token_ids = [4]
    back = pickle.loads(pickle.dumps(req))
    assert (back.request_id, back.all_token_ids, back.seed, back.params) == ("r", [1, 2, 3, 4], 3, params)
    core_req = EngineCoreRequest("r", [1, 2], params, 2, 1.5, seed=3)
    assert pickle.loads(pickle.dumps(core_req)) == core_req
    outs = EngineCoreOutputs([EngineCoreOutput("r", [5, 6], [(-0.1, [(5, -0.1)]), (-0.2, [(6, -0.2)])], "stop", 6)],
                             2.0)
    assert pickle.loads(pickle.dumps(outs)) == outs
    ro = RequestOutput("r", "hi", [1], [CompletionOutput(0, "a", [5], finish_reason="length")], True,
                       RequestMetrics(1.0, 1.1, 1.2, 1.3, [1.2]))
    assert pickle.loads(pickle.dumps(ro)) == ro


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_server_modules_import_only_the_client_interface():
    files = sorted(SERVER_DIR.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        for name in _imports(path):
            if name.startswith("pagedserve."):
                assert name.startswith(ALLOWED), f"{path.name} imports {name}"
        attrs = {n.attr for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute)}
        used = attrs & ENGINE_INTERNALS
        assert not used, f"{path.name} reaches into the engine: {sorted(used)}"


class StandInClient(EngineClient):
    """An EngineClient with no model: each request 'generates' its prompt's token ids reversed, one
    per output, so the test knows every token the server must pass on."""

    def __init__(self, tokenizer) -> None:
        self._inputs = InputProcessor(tokenizer, len(tokenizer), 256, 4096, None, "stand-in")
        self.max_in_flight = 8
        self.streams = 0
        self.aborted: list[str] = []
        self._stats = EngineStats(0, 0, 0, KVCacheStats(10, 0, 10, 16, 0, 0))

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def drain_threadsafe(self, grace_s: float) -> None:
        pass

    def has_capacity(self, num_requests: int = 1) -> bool:
        return self.streams + num_requests <= self.max_in_flight

    @property
    def num_in_flight(self) -> int:
        return self.streams

    @property
    def input_processor(self) -> InputProcessor:
        return self._inputs

    @property
    def unavailable_reason(self) -> str | None:
        return None

    def model_info(self) -> ModelInfo:
        return ModelInfo("stand-in", "/nowhere", 256, len(self._inputs.tokenizer), 4096, 4)

    def initial_stats(self) -> EngineStats:
        return self._stats

    async def stats(self) -> EngineStats:
        return self._stats

    async def kv_snapshot(self) -> list[BlockInfo]:
        return []

    async def reset_prefix_cache(self) -> bool:
        return True

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def add_request(self, request_id, prompt, params=None, arrival_time=None):
        assert isinstance(prompt, EngineInput)  # the server validated it with input_processor
        tokens = list(reversed(prompt.prompt_token_ids))[: prompt.params.max_tokens]
        tok = self._inputs.tokenizer

        async def outputs():
            self.streams += 1
            try:
                for i in range(1, len(tokens) + 1):
                    done = i == len(tokens)
                    yield RequestOutput(request_id, prompt.prompt, prompt.prompt_token_ids, [CompletionOutput(
                        0, tok.decode(tokens[:i]), tokens[:i], finish_reason="length" if done else None,
                        text_delta=tok.decode(tokens[:i])[len(tok.decode(tokens[:i - 1])):],
                        token_ids_delta=[tokens[i - 1]])], done, RequestMetrics(0.0, 0.0, 0.0, 0.0))
                    await asyncio.sleep(0)
            finally:
                self.streams -= 1

        return outputs()


def test_server_runs_on_any_engine_client(smollm2_tokenizer):
    client = StandInClient(smollm2_tokenizer)
    app = build_app(client, ServerConfig(served_model_name="stand-in"))
    prompt = [9906, 1917, 11, 856, 836]
    want = list(reversed(prompt))[:4]

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as http:
                r = await http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4})
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["choices"][0]["text"] == smollm2_tokenizer.decode(want)
                assert body["usage"]["completion_tokens"] == 4
                r = await http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "stream": True})
                text = "".join(__import__("json").loads(line[6:])["choices"][0]["text"]
                               for line in r.text.splitlines() if line.startswith("data: {"))
                assert text == smollm2_tokenizer.decode(want)
                r = await http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 300})
                assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # its limit: 256
                assert (await http.get("/v1/models")).json()["data"][0]["max_model_len"] == 256
                assert "pagedserve:kv_blocks_total" in (await http.get("/metrics")).text

    asyncio.run(asyncio.wait_for(main(), 60))
    assert client.streams == 0


def test_runtime_imports_neither_bench_nor_matplotlib():
    code = ("import sys, pagedserve, pagedserve.entrypoints.llm, pagedserve.entrypoints.openai.api_server, "
            "pagedserve.entrypoints.openai.cli, pagedserve.engine.async_engine\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('matplotlib', 'pagedserve.bench')))\n"
            "print(bad)\nsys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
