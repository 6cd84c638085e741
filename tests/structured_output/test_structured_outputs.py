"""Structured outputs (xgrammar masks): every output matches its grammar, on a random-weight model (the
mask alone must make it valid) and on the real SmolLM2; the same tokens with speculation, in a busy batch
and with n > 1; bad grammars are refused before admission and nothing leaks."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from pagedserve import LLM, SamplingParams, StructuredOutputsParams

PROMPTS = ["Hello there", "List three fruits:", "The capital of France is", "def f(x):"]
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "kind": {"enum": ["cat", "dog", "bird"]},
                         "ok": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3},
                         "home": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{3}$"}},
                                  "required": ["zip"], "additionalProperties": False}},
          "required": ["name", "kind", "ok", "tags", "home"], "additionalProperties": False}


def _params(so: StructuredOutputsParams, **kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": 160, **kw}, structured_outputs=so)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), num_blocks=256, block_size=4, max_num_seqs=8)


def test_params_name_the_field():
    for bad in [{}, {"json": {}, "regex": "a"}, {"json": "{not json"}, {"json": [1]}, {"choice": []},
                {"choice": ["a", ""]}, {"regex": ""}, {"json_object": 1}]:
        with pytest.raises(ValueError, match="structured_outputs"):
            StructuredOutputsParams(**bad)
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"json": {}})


def test_json_schema_regex_choice_grammar_and_json_object(llm):
    cases = [(StructuredOutputsParams(json=PERSON), lambda t: jsonschema.validate(json.loads(t), PERSON)),
             (StructuredOutputsParams(json=json.dumps(PERSON)), lambda t: jsonschema.validate(json.loads(t), PERSON)),
             (StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t) or 1 / 0),
             (StructuredOutputsParams(choice=["red", "green", "blue"]), lambda t: t in {"red", "green", "blue"} or 1 / 0),
             (StructuredOutputsParams(grammar='root ::= "(" [a-c]+ ")"'), lambda t: re.fullmatch(r"\([a-c]+\)", t) or 1 / 0)]
    # (json_object allows any string and whitespace: a random-weight model need never close it; the
    # real-model test below checks it)
    params = [_params(so, max_tokens=400, temperature=0.8, seed=i) for i, (so, _) in enumerate(cases)]
    outs = llm.generate([PROMPTS[i % 4] for i in range(len(cases))], params, use_tqdm=False)
    for (_, check), out in zip(cases, outs, strict=True):
        assert out.outputs[0].finish_reason == "stop", out.outputs[0].text
        check(out.outputs[0].text)
    assert llm.engine.kv_stats().free_blocks == llm.engine.kv_stats().total_blocks


def test_greedy_tokens_equal_alone_in_a_batch_with_speculation_and_n2(llm, tiny_llama_dir):
    so = StructuredOutputsParams(json=PERSON)
    alone = [llm.generate([p], _params(so), use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    mixed = llm.generate(PROMPTS * 2, [_params(so)] * 4 + [SamplingParams(temperature=0, max_tokens=30)] * 4,
                         use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:4]] == alone
    spec = LLM(str(tiny_llama_dir), num_blocks=256, block_size=4, speculative_config=NGRAM)
    assert [o.outputs[0].token_ids for o in spec.generate(PROMPTS, _params(so), use_tqdm=False)] == alone
    two = llm.generate(PROMPTS[:1], _params(so, n=2, temperature=1.0, seed=5), use_tqdm=False)[0]
    for c in two.outputs:
        jsonschema.validate(json.loads(c.text), PERSON)


def _random_schema(rng: random.Random, depth: int = 0) -> dict:
    kind = rng.choice(["enum", "string", "boolean", "integer", "array"] + (["object"] * 2 if depth < 2 else []))
    if kind == "enum":
        return {"enum": rng.sample(["a", "b", "c", "d", 1, 2, True, None], rng.randint(1, 4))}
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 6)}
    if kind == "integer":
        return {"type": "integer", "minimum": 0, "maximum": rng.randint(1, 500)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "array":
        return {"type": "array", "items": _random_schema(rng, depth + 1), "maxItems": rng.randint(0, 3)}
    props = {f"k{i}": _random_schema(rng, depth + 1) for i in range(rng.randint(1, 4))}
    return {"type": "object", "properties": props, "required": rng.sample(list(props), rng.randint(0, len(props))),
            "additionalProperties": False}


@pytest.mark.slow
def test_many_random_schemas_all_validate(llm):
    rng = random.Random(0)
    schemas = [{"type": "object", "properties": {"v": _random_schema(rng)}, "required": ["v"],
                "additionalProperties": False} for _ in range(100)]
    params = [_params(StructuredOutputsParams(json=s), temperature=0.7, seed=i, max_tokens=300)
              for i, s in enumerate(schemas)]
    outs = llm.generate([PROMPTS[i % 4] for i in range(len(schemas))], params, use_tqdm=False)
    for schema, out in zip(schemas, outs, strict=True):
        assert out.outputs[0].finish_reason == "stop", (schema, out.outputs[0].text)
        jsonschema.validate(json.loads(out.outputs[0].text), schema)


def test_bad_grammar_is_refused_before_the_engine(llm):
    for bad in [{"regex": "[unclosed"}, {"grammar": "root ::= ???"}, {"json": {"type": "no-such-type"}}]:
        with pytest.raises(ValueError, match=f"structured_outputs.{next(iter(bad))}"):
            StructuredOutputsParams(**bad)


@pytest.mark.slow
def test_real_model_writes_the_schema():
    real = LLM("smollm2-135m", max_num_seqs=4)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                               "population": {"type": "integer", "minimum": 0, "maximum": 10**9}},
              "required": ["city", "population"], "additionalProperties": False}
    outs = real.chat([[{"role": "user", "content": f"Give a city in {c} as JSON."}] for c in ("France", "Japan")],
                     _params(StructuredOutputsParams(json=schema), max_tokens=60), use_tqdm=False)
    for out in outs:
        jsonschema.validate(json.loads(out.outputs[0].text), schema)
    ask = "Reply with a short JSON object with the keys name and color of a cat."
    free = real.chat([[{"role": "user", "content": ask}]],
                     _params(StructuredOutputsParams(json_object=True), max_tokens=120), use_tqdm=False)[0]
    assert isinstance(json.loads(free.outputs[0].text), dict)


def test_after_the_grammar_ends_only_stop_tokens_follow(llm):
    """ignore_eos keeps decoding past the end of the grammar: every further token is a stop token."""
    out = llm.generate(["Hello"], _params(StructuredOutputsParams(choice=["yes"]), max_tokens=8, ignore_eos=True,
                                          temperature=1.0, seed=0), use_tqdm=False)[0].outputs[0]
    eos = llm.engine.core.model_config.eos_token_id
    stops = {eos} | set(llm.get_tokenizer().all_special_ids)
    body = [t for t in out.token_ids if t not in stops]
    assert out.text == "yes" and len(body) < len(out.token_ids)
    assert out.token_ids[:len(body)] == body and set(out.token_ids[len(body):]) <= stops


class _GatedCompile:
    """Holds every grammar compilation until the test opens the gate (a compile that takes as long as
    the test wants, without timing), then compiles for real."""

    def __init__(self, manager, fail: bool = False) -> None:
        import threading

        self.manager, self.fail = manager, fail
        self.gate = threading.Event()
        self._real = manager._compile
        manager._compile = self

    def __call__(self, params):
        self.gate.wait(timeout=60)
        if self.fail:
            raise RuntimeError("xgrammar failed")
        return self._real(params)

    def restore(self) -> None:
        self.gate.set()
        self.manager._compile = self._real


def _fresh_schema(tag: str) -> dict:  # a schema no earlier test compiled
    return {"type": "object", "properties": {tag: {"enum": ["a", "b"]}}, "required": [tag],
            "additionalProperties": False}


def test_a_compiling_grammar_never_stalls_the_batch(llm):
    """While a new schema compiles, running requests keep producing tokens every step and the
    constrained request waits outside the scheduler; once compiled it runs and its output validates."""
    engine = llm.engine
    gated = _GatedCompile(engine.core.structured_outputs())
    try:
        engine.add_request("plain", PROMPTS[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
        schema = _fresh_schema("stall_probe")
        engine.add_request("constrained", PROMPTS[1], _params(StructuredOutputsParams(json=schema)))
        assert len(engine.core.pending_grammars) == 1 and "constrained" not in engine.core.scheduler.requests
        progressed = []
        for _ in range(5):
            progressed += [o.request_id for o in engine.step()]
        assert progressed.count("plain") == 5 and "constrained" not in progressed
        gated.gate.set()
        outs = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                outs[o.request_id] = o
        jsonschema.validate(json.loads(outs["constrained"].outputs[0].text), schema)
        # the same tokens as with the grammar already cached
        again = llm.generate([PROMPTS[1]], [_params(StructuredOutputsParams(json=schema))], use_tqdm=False)[0]
        assert again.outputs[0].token_ids == outs["constrained"].outputs[0].token_ids
    finally:
        gated.restore()
    assert engine.kv_stats().free_blocks == engine.kv_stats().total_blocks


def test_abort_while_compiling_and_a_failed_compile(llm):
    engine = llm.engine
    gated = _GatedCompile(engine.core.structured_outputs(), fail=True)
    try:
        engine.add_request("waits", PROMPTS[2], _params(StructuredOutputsParams(json=_fresh_schema("abort_probe"))))
        engine.abort_request(["waits"])
        assert not engine.core.pending_grammars
        assert [o.outputs[0].finish_reason for o in engine.step()] == ["abort"]
        engine.add_request("fails", PROMPTS[2], _params(StructuredOutputsParams(json=_fresh_schema("fail_probe"))))
        engine.add_request("fine", PROMPTS[3], SamplingParams(temperature=0, max_tokens=5))
        gated.gate.set()
        outs = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                outs[o.request_id] = o
        assert outs["fails"].outputs[0].finish_reason == "abort"
        assert outs["fine"].outputs[0].finish_reason in ("stop", "length")
    finally:
        gated.restore()
    assert not engine.core.pending_grammars
    assert engine.kv_stats().free_blocks == engine.kv_stats().total_blocks


def test_fused_mask_equals_xgrammars():
    """The word-wise CPU kernel masks exactly what xgrammar's apply_token_bitmask_inplace masks."""
    import torch
    import xgrammar as xgr

    from pagedserve.kernels import cpu_ops

    ops = cpu_ops()
    if ops is None:
        pytest.skip("no compiler: the fused kernels are not built")
    g = torch.Generator().manual_seed(0)
    vocab = 1000  # not a multiple of 32: the last word is partial
    bitmask = torch.randint(-2**31, 2**31 - 1, (6, (vocab + 31) // 32), generator=g, dtype=torch.int32)
    bitmask[1] = 0  # nothing allowed
    bitmask[2] = -1  # everything allowed
    bitmask[3, ::2] = 0
    logits = torch.randn(6, vocab, generator=g)
    rows = [0, 1, 2, 3, 5]  # row 4 is left alone
    ours, theirs = logits.clone(), logits.clone()
    ops.apply_token_bitmask_(ours, bitmask, torch.tensor(rows))
    xgr.apply_token_bitmask_inplace(theirs, bitmask, vocab_size=vocab, indices=rows)
    assert torch.equal(ours, theirs) and torch.equal(ours[4], logits[4])
    assert torch.isinf(ours[1]).all() and torch.equal(ours[2], logits[2])


@pytest.mark.slow
def test_real_model_many_random_schemas():
    """The real SmolLM2 on 16 seeded random schemas and prompts: every reply ends by itself and validates."""
    real = LLM("smollm2-135m", max_num_seqs=8)
    rng = random.Random(7)
    schemas = [{"type": "object", "properties": {"v": _random_schema(rng)}, "required": ["v"],
                "additionalProperties": False} for _ in range(16)]
    topics = ["a cat", "the weather", "a city", "a song", "a recipe", "a planet", "a book", "a car"]
    convs = [[{"role": "user", "content": f"Describe {topics[i % 8]} as JSON."}] for i in range(len(schemas))]
    params = [_params(StructuredOutputsParams(json=s), max_tokens=300) for s in schemas]
    outs = real.chat(convs, params, use_tqdm=False)
    for schema, out in zip(schemas, outs, strict=True):
        assert out.outputs[0].finish_reason == "stop", (schema, out.outputs[0].text)
        jsonschema.validate(json.loads(out.outputs[0].text), schema)
