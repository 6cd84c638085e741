"""POST /v1/embeddings on a real `pagedserve serve` (tiny random-weight Llama): the official openai
client, base64 and float bodies, the vectors `LLM.embed` gives offline, and 400s naming the field."""

from __future__ import annotations

import base64
import struct
import threading

import openai
import pytest

from tests.server.test_server_support import launch_server

TEXTS = ["The capital of France is", "Hello world", "def fibonacci(n):"]
LONG = "hello " * 600  # > 512 tokens, the tiny model's context


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with launch_server(str(tiny_llama_dir), "--num-blocks", "512", "--num-threads", "1") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


@pytest.fixture(scope="module")
def offline(tiny_llama_dir):
    from pagedserve import LLM

    llm = LLM(str(tiny_llama_dir), num_blocks=512)
    return llm, {t: out.outputs.embedding for t, out in zip(TEXTS, llm.embed(TEXTS, use_tqdm=False), strict=True)}


def _close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b, strict=True)) <= tol


def test_openai_client_gets_one_vector_per_input(client, server, offline):
    llm, vectors = offline
    r = client.embeddings.create(input=TEXTS, model=server.model)  # the client asks for base64 and decodes it
    assert r.object == "list" and r.model == server.model
    assert [d.index for d in r.data] == [0, 1, 2] and all(d.object == "embedding" for d in r.data)
    assert all(len(d.embedding) == 64 for d in r.data)
    for text, d in zip(TEXTS, r.data, strict=True):
        assert _close(d.embedding, vectors[text])
        assert abs(sum(x * x for x in d.embedding) - 1.0) < 1e-5
    tok = llm.get_tokenizer()
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(tok.encode(t)) for t in TEXTS)
    floats = client.embeddings.create(input=TEXTS, model=server.model, encoding_format="float", dimensions=64,
                                      user="someone")
    assert [d.embedding for d in floats.data] == [d.embedding for d in r.data]  # base64 decodes to the same floats


def test_base64_is_little_endian_float32(server):
    body = {"input": TEXTS[0], "model": server.model}
    plain = server.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]
    encoded = server.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()["data"][0]["embedding"]
    raw = base64.b64decode(encoded)
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == plain


def test_token_id_inputs_and_truncation(server, offline):
    llm, vectors = offline
    tok = llm.get_tokenizer()
    ids = [tok.encode(t) for t in TEXTS]
    one = server.post("/v1/embeddings", json={"input": ids[0]}).json()
    assert len(one["data"]) == 1 and _close(one["data"][0]["embedding"], vectors[TEXTS[0]])
    many = server.post("/v1/embeddings", json={"input": ids}).json()
    assert [_close(d["embedding"], vectors[t]) for d, t in zip(many["data"], TEXTS, strict=True)] == [True] * 3
    cut = server.post("/v1/embeddings", json={"input": TEXTS[0], "truncate_prompt_tokens": 2}).json()
    want = llm.embed([ids[0][-2:]], use_tqdm=False)[0].outputs.embedding
    assert cut["usage"]["prompt_tokens"] == 2 and _close(cut["data"][0]["embedding"], want)


BAD = [({"input": ""}, "input"), ({"input": []}, "input"), ({"input": ["a", ""]}, "input"),
       ({"input": [10**9]}, "input"), ({"input": [[1, 2], []]}, "input"), ({"input": 5}, "input"),
       ({"input": [1, "a"]}, "input"), ({"input": LONG}, "input"), ({}, "input"),
       ({"input": "hi", "dimensions": 32}, "dimensions"), ({"input": "hi", "dimensions": 0}, "dimensions"),
       ({"input": "hi", "dimensions": "64"}, "dimensions"), ({"input": "hi", "encoding_format": "hex"},
                                                              "encoding_format"),
       ({"input": "hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
       ({"input": "hi", "truncate_prompt_tokens": 100000}, "truncate_prompt_tokens"),
       ({"input": "hi", "pooling_type": "MEAN"}, "pooling_type"), ({"input": "hi", "model": "other"}, "model")]


@pytest.mark.parametrize("body,param", BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD)])
def test_bad_request_names_the_field(server, body, param):
    r = server.post("/v1/embeddings", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"] and err["type"] == "invalid_request_error"


def test_wrong_dimensions_through_the_client(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(input="hi", model=server.model, dimensions=32)
    assert e.value.body["param"] == "dimensions"


def test_embeddings_beside_generation_leave_no_block_behind(client, server):
    """Completions stream while embeddings come and go (bad ones among them): both are served, the
    tokens are those of the completion run alone, and every KV block is free afterwards."""
    def complete() -> str:
        r = client.completions.create(model=server.model, prompt=TEXTS[0], max_tokens=24, temperature=0,
                                      extra_body={"ignore_eos": True})
        return r.choices[0].text

    alone = complete()
    texts: list[str] = []
    threads = [threading.Thread(target=lambda: texts.append(complete())) for _ in range(3)]
    for t in threads:
        t.start()
    first = client.embeddings.create(input=TEXTS, model=server.model, encoding_format="float").data
    for body, _ in BAD[:8]:
        assert server.post("/v1/embeddings", json=body).status_code == 400
    again = client.embeddings.create(input=TEXTS, model=server.model, encoding_format="float").data
    for t in threads:
        t.join(120)
    assert texts == [alone] * 3
    assert all(_close(a.embedding, b.embedding) for a, b in zip(first, again, strict=True))
    m = server.wait_idle()
    assert m[("pagedserve:kv_blocks_free", ())] == m[("pagedserve:kv_blocks_total", ())]
    assert m[("vllm:num_requests_running", ())] == 0
