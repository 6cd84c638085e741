"""The official `openai` client against a real `pagedserve serve` process (tiny random-weight Llama)."""

from __future__ import annotations

import json

import openai
import pytest

from tests.server.test_server_support import launch_server, sse_events

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Tell me a story about a dragon."}]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with launch_server(str(tiny_llama_dir), "--num-blocks", "512", "--num-threads", "1") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


def test_completion(client, server):
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == server.model
    assert r.created > 0
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_completion_stream_equals_plain(client, server):
    plain = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=server.model, prompt=PROMPT, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == plain.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 16
    assert usage.usage.prompt_tokens == plain.usage.prompt_tokens


def test_chat(client, server):
    r = client.chat.completions.create(model=server.model, messages=MESSAGES, max_completion_tokens=10,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10


def test_chat_stream_role_content_finish_usage(client, server):
    plain = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=10, temperature=0,
                                           extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=10,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [c for c in chunks if c.choices]
    content = "".join(c.choices[0].delta.content or "" for c in body)
    assert content == plain.choices[0].message.content
    assert body[-1].choices[0].finish_reason == "length" and not body[-1].choices[0].delta.content
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert all(c.choices[0].delta.role is None for c in body[1:])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_n2_completions_and_chat(client, server):
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, n=2, temperature=1.0, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert 2 <= r.usage.completion_tokens <= 12
    chat = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=6, n=2, seed=3)
    assert sorted(c.index for c in chat.choices) == [0, 1]
    stream = list(client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=6, n=2,
                                                 seed=3, stream=True))
    finishes = {c.choices[0].index: c.choices[0].finish_reason for c in stream if c.choices[0].finish_reason}
    assert set(finishes) == {0, 1}
    roles = [c.choices[0].index for c in stream if c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]


def test_multiple_prompts_and_token_ids(client, server):
    ids = server.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    r = client.completions.create(model=server.model, prompt=[PROMPT, "Hello"], max_tokens=4, n=2, temperature=0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    by_ids = client.completions.create(model=server.model, prompt=ids, max_tokens=4, temperature=0)
    by_text = [c for c in r.choices if c.index == 0][0]
    assert by_ids.choices[0].text == by_text.text
    lists = client.completions.create(model=server.model, prompt=[ids, ids], max_tokens=4, temperature=0)
    assert [c.text for c in lists.choices] == [by_text.text, by_text.text]


def test_completion_logprobs(client, server):
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and len(top) >= 3
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely token
    assert lp.text_offset[0] == 0
    chunks = list(client.completions.create(model=server.model, prompt=PROMPT, max_tokens=5, temperature=0,
                                            logprobs=3, stream=True, extra_body={"ignore_eos": True}))
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == lp.tokens


def test_logit_bias(client, server):
    """OpenAI's logit_bias (string token ids): +100 forces a token on completions and chat, streamed too;
    -100 on it keeps it out of a greedy reply that would otherwise be made of it."""
    forced = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=0.7, seed=3,
                                       logit_bias={"42": 100}, logprobs=0, extra_body={"ignore_eos": True})
    tokens = forced.choices[0].logprobs.tokens
    assert tokens == [tokens[0]] * 6
    banned = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0,
                                       logit_bias={"42": -100, "43": 5}, extra_body={"ignore_eos": True})
    assert tokens[0] not in banned.choices[0].logprobs.tokens
    chat = list(client.chat.completions.create(model=server.model, messages=MESSAGES, max_completion_tokens=4,
                                               logit_bias={"42": 100}, stream=True, logprobs=True,
                                               extra_body={"ignore_eos": True}))
    tokens = [lp.token for c in chat if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert len(tokens) == 4 and len(set(tokens)) == 1


def test_structured_outputs(client, server):
    """chat.completions.parse with a pydantic model, json_schema, json_object refusal of bad input,
    vLLM's structured_outputs / guided_* fields, streamed and n=2: every reply matches."""
    import re
    from typing import Literal

    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        kind: Literal["cat", "dog"]
        name: str = Field(max_length=6)
        legs: int = Field(ge=0, le=8)
        tags: list[Literal["a", "b"]] = Field(max_length=2)

    parsed = client.chat.completions.parse(model=server.model, messages=MESSAGES, response_format=Pet,
                                           max_completion_tokens=120, temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, Pet)
    two = client.chat.completions.create(model=server.model, messages=MESSAGES, n=2, temperature=1.0, seed=4,
                                         max_completion_tokens=120,
                                         response_format={"type": "json_schema", "json_schema": {
                                             "name": "pet", "schema": Pet.model_json_schema(), "strict": True}})
    for c in two.choices:
        Pet.model_validate_json(c.message.content)
    streamed = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=20, temperature=0.9,
                                         seed=1, stream=True, extra_body={"structured_outputs": {"regex": "[0-9]{4}"}})
    assert re.fullmatch("[0-9]{4}", "".join(c.choices[0].text for c in streamed))
    choice = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0,
                                       extra_body={"guided_choice": ["left", "right"]})
    assert choice.choices[0].text in {"left", "right"}
    for body, param in [({"response_format": {"type": "xml"}}, "response_format"),
                        ({"structured_outputs": {"regex": "[bad"}}, "structured_outputs"),
                        ({"structured_outputs": {"yaml": "x"}}, "structured_outputs"),
                        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=server.model, prompt=PROMPT, max_tokens=4, extra_body=body)
        assert err.value.body["param"] == param


def test_chat_logprobs(client, server):
    r = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.bytes == list(entry.token.encode())


def test_echo(client, server):
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    plain = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=3, temperature=0)
    assert r.choices[0].text == PROMPT + plain.choices[0].text


def test_seed_reproducible(client, server):
    def sample(seed: int) -> str:
        return client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=1.0,
                                         seed=seed, extra_body={"ignore_eos": True}).choices[0].text

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)
    chat = [client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=8, seed=99)
            .choices[0].message.content for _ in range(2)]
    assert chat[0] == chat[1]


def _spanning(text: str, tokens: list[str]) -> str | None:
    """A stop string made of the end of one token and the start of the next, found first at that spot."""
    if "".join(tokens) != text:
        return None  # a token that decodes differently alone (split UTF-8): offsets would not line up
    offset = 0
    for a, b in zip(tokens, tokens[1:], strict=False):
        offset += len(a)
        stop = a[-2:] + b[:2]
        if len(a) >= 3 and len(b) >= 3 and stop.isascii() and text.find(stop) == offset - 2:
            return stop
    return None


def _completion_case(client, server) -> tuple[str, str, str]:
    for prompt in (PROMPT, "Once upon a time", "Hello, my name is", "def main():"):
        r = client.completions.create(model=server.model, prompt=prompt, max_tokens=24, temperature=0, logprobs=0,
                                      extra_body={"ignore_eos": True})
        stop = _spanning(r.choices[0].text, r.choices[0].logprobs.tokens)
        if stop:
            return prompt, r.choices[0].text, stop
    pytest.skip("no token boundary suitable for a spanning stop string")


def test_stop_string(client, server):
    prompt, text, stop = _completion_case(client, server)
    r = client.completions.create(model=server.model, prompt=prompt, max_tokens=24, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == text[:text.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    incl = client.completions.create(model=server.model, prompt=prompt, max_tokens=24, temperature=0, stop=stop,
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert incl.choices[0].text == text[:text.find(stop) + len(stop)]


def test_stop_string_spanning_tokens_is_never_streamed(client, server):
    """The stop string starts inside one token and ends inside the next: after the first of them the
    text ends with a prefix of the stop string, which must be held back, then dropped. Streamed text
    only ever grows, so equality with the text before the stop string means none of it was sent."""
    prompt, text, stop = _completion_case(client, server)
    stream = client.completions.create(model=server.model, prompt=prompt, max_tokens=24, temperature=0,
                                       stop=[stop], stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == text[:text.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_stop_string_spanning_tokens_is_never_streamed(client, server):
    for content in ("Tell me a story about a dragon.", "What is the weather like?", "Write a poem."):
        args = dict(model=server.model, messages=[{"role": "user", "content": content}], max_tokens=24,
                    temperature=0, extra_body={"ignore_eos": True})
        r = client.chat.completions.create(**args, logprobs=True)
        text = r.choices[0].message.content
        stop = _spanning(text, [e.token for e in r.choices[0].logprobs.content])
        if stop:
            break
    else:
        pytest.skip("no token boundary suitable for a spanning stop string")
    chunks = list(client.chat.completions.create(**args, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text[:text.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_vllm_extensions(client, server):
    eos = server.post("/tokenize", json={"prompt": "<|im_end|>", "add_special_tokens": False}).json()["tokens"]
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=30, temperature=0,
                                  extra_body={"min_tokens": 5, "top_k": 5, "min_p": 0.01,
                                              "repetition_penalty": 1.1, "stop_token_ids": eos})
    assert r.usage.completion_tokens >= 5
    sampled = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0.8, top_p=0.9,
                                        presence_penalty=0.5, frequency_penalty=0.5, user="tester",
                                        extra_body={"top_k": 20})
    assert sampled.choices[0].finish_reason in ("stop", "length")


def test_models_version_tokenize(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model]
    with server.http() as http:
        assert http.get("/version").json()["version"]
        assert http.get("/health").status_code == 200
        tok = http.post("/tokenize", json={"prompt": "hello world"}).json()
        assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] > 0
        assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == "hello world"
        chat_tok = http.post("/tokenize", json={"messages": MESSAGES}).json()
        assert chat_tok["count"] > tok["count"]


def test_api_key(server):
    bad = server.openai()
    bad.api_key = "wrong"
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=server.model, prompt=PROMPT, max_tokens=2)
    with server.http() as http:
        http.headers.pop("Authorization")
        r = http.post("/v1/chat/completions", json={"messages": MESSAGES})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/health").status_code == 200  # probes and scrapers need no key
        assert http.get("/metrics").status_code == 200


def test_sse_wire_format(server):
    """Raw bytes: `data: {json}` events and a final `data: [DONE]`."""
    with server.http() as http, http.stream("POST", "/v1/completions",
                                            json={"prompt": PROMPT, "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        assert json.loads(e)["object"] == "text_completion"


@pytest.mark.slow
def test_structured_outputs_many_random_schemas_and_a_grammar(client, server):
    """100 seeded random schemas (nested objects, arrays, enums, required fields) through the openai
    client, a quarter of them streamed, all at once: every reply validates; an EBNF grammar too."""
    import random
    import re
    from concurrent.futures import ThreadPoolExecutor

    import jsonschema

    from tests.structured_output.test_structured_outputs import _random_schema

    rng = random.Random(1)
    schemas = [{"type": "object", "properties": {"v": _random_schema(rng)}, "required": ["v"],
                "additionalProperties": False} for _ in range(100)]

    def reply(i: int) -> str:
        kwargs = dict(model=server.model, messages=[{"role": "user", "content": f"Describe item {i} as JSON."}],
                      max_completion_tokens=300, temperature=0.7, seed=i,
                      response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schemas[i]}})
        if i % 4 == 0:
            return "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(stream=True, **kwargs) if c.choices)
        return client.chat.completions.create(**kwargs).choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(reply, range(len(schemas))))
    for schema, text in zip(schemas, replies, strict=True):
        jsonschema.validate(json.loads(text), schema)
    grammar = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=30, temperature=1.0, seed=3,
                                        extra_body={"structured_outputs": {"grammar": 'root ::= "(" [a-c]+ ")"'}})
    assert re.fullmatch(r"\([a-c]+\)", grammar.choices[0].text)
