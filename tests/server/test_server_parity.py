"""The real SmolLM2 behind the server gives, greedily, exactly the text of the offline `LLM.generate`."""

from __future__ import annotations

import pytest

from pagedserve import SamplingParams
from tests.server.test_server_support import launch_server

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MESSAGES = [{"role": "user", "content": "What is 12 times 7?"}]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def server():
    with launch_server("smollm2-135m", "--kv-cache-memory-gb", "0.25", "--max-num-seqs", "8") as s:
        yield s


def test_greedy_completions_equal_offline_generate(server, smollm2_llm):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    offline = [o.outputs[0].text for o in smollm2_llm.generate(PROMPTS, params, use_tqdm=False)]
    client = server.openai()
    r = client.completions.create(model="smollm2-135m", prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == offline
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2-135m", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stream=True))
    assert streamed == offline[0]


def test_greedy_chat_equals_offline_chat(server, smollm2_llm):
    offline = smollm2_llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    r = server.openai().chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                temperature=0)
    assert r.choices[0].message.content == offline[0].outputs[0].text
    assert r.usage.prompt_tokens == len(offline[0].prompt_token_ids)
