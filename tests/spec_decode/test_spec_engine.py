"""Speculative decoding end to end: greedy output identical to plain decoding for every method (busy
batch, preemption, chunked prefill, prefix-cache hits), seeded text unchanged, the sampled distribution
kept, stop conditions inside an accepted run, aborts and bad configurations."""

from __future__ import annotations

import collections

import pytest

from pagedserve import LLM
from pagedserve.sampling_params import SamplingParams

# Repetitive prompts, so that n-gram lookup finds something to propose.
PROMPTS = [
    "one two three four one two three four one two three four one two",
    "The cat sat on the mat. The cat sat on the mat. The cat sat on the",
    "a b c d e f g a b c d e f g a b c",
    "Hello world, hello world, hello world, hello",
    "def f(x): return x\ndef g(x): return x\ndef h(x): return",
    "red green blue red green blue red green",
]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
ALWAYS = {"disable_by_batch_size": 10_000}  # tests speculate on every step, whatever the timings say


def _methods(draft_dir) -> dict[str, dict]:
    return {"ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, **ALWAYS},
            "draft_model": {"method": "draft_model", "model": str(draft_dir), "num_speculative_tokens": 3, **ALWAYS},
            "layer_skip": {"method": "layer_skip", "num_draft_layers": 1, "num_speculative_tokens": 3, **ALWAYS}}


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def plain_tokens(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), block_size=4, num_blocks=256)
    return _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))


@pytest.mark.parametrize("options", [{"num_blocks": 256}, {"num_blocks": 256, "max_num_batched_tokens": 9},
                                     {"num_blocks": 40}], ids=["busy-batch", "chunked", "preempting"])
@pytest.mark.parametrize("method", ["ngram", "draft_model", "layer_skip"])
def test_greedy_output_equals_plain_decoding(tiny_llama_dir, tiny_qwen2_dir, plain_tokens, method, options):
    spec = _methods(tiny_qwen2_dir)[method]
    llm = LLM(str(tiny_llama_dir), block_size=4, speculative_config=spec, **options)
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == plain_tokens
    stats = llm.engine.stats()
    assert stats.spec_decode.num_draft_tokens > 0, "nothing was speculated: the test would prove nothing"
    if options["num_blocks"] == 40:
        assert stats.num_preemptions > 0
    assert stats.kv.free_blocks == stats.kv.total_blocks  # draft slots included, nothing leaks
    # Prefix-cache hits: the same prompts again find their blocks (the draft's cache follows them).
    again = _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert again == plain_tokens and llm.engine.kv_stats().prefix_cache_hits > 0


def test_a_draft_identical_to_the_target_is_always_accepted(tiny_llama_dir, plain_tokens):
    spec = {"method": "draft_model", "model": str(tiny_llama_dir), "num_speculative_tokens": 4, **ALWAYS}
    llm = LLM(str(tiny_llama_dir), block_size=4, num_blocks=256, speculative_config=spec)
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == plain_tokens
    s = llm.engine.stats().spec_decode
    assert s.acceptance_rate == 1.0 and s.mean_accepted_length > 3
    assert s.accepted_per_pos[0] == s.num_drafts


def test_a_draft_model_that_sat_out_plain_steps_catches_up(tiny_llama_dir, plain_tokens, monkeypatch):
    """The controller keeps most steps plain; the draft computes nothing then and catches up when it
    next drafts. With the target as its own draft, any stale K/V would show as a rejection: requests
    one after another (reusing each other's blocks), and then all at once."""
    from pagedserve.spec_decode.controller import SpeculationController

    plan = SpeculationController.plan
    monkeypatch.setattr(SpeculationController, "plan", lambda self, batch, cands, model_based: (
        plan(self, batch, cands, model_based) if self._step % 5 == 0 else {}))
    spec = {"method": "draft_model", "model": str(tiny_llama_dir), "num_speculative_tokens": 2, **ALWAYS}
    llm = LLM(str(tiny_llama_dir), block_size=4, num_blocks=256, speculative_config=spec)
    alone = [_tokens(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in PROMPTS]
    assert alone == plain_tokens
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == plain_tokens
    s = llm.engine.stats().spec_decode
    assert s.num_drafts > len(PROMPTS) and s.num_steps_plain > s.num_steps_speculated
    assert s.acceptance_rate == 1.0


def test_seeded_text_is_the_same_with_and_without_speculation_alone_or_in_a_batch(tiny_llama_dir):
    sampled = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=20, seed=11, ignore_eos=True)
    plain = LLM(str(tiny_llama_dir), block_size=4, num_blocks=256)
    want = plain.generate(PROMPTS[0], sampled, use_tqdm=False)[0].outputs[0].token_ids
    spec = {"method": "draft_model", "model": str(tiny_llama_dir), "num_speculative_tokens": 3, **ALWAYS}
    llm = LLM(str(tiny_llama_dir), block_size=4, num_blocks=256, speculative_config=spec)
    alone = llm.generate(PROMPTS[0], sampled, use_tqdm=False)[0].outputs[0].token_ids
    crowd = [SamplingParams(temperature=1.0, max_tokens=20)] * 4 + [sampled]
    busy = llm.generate(PROMPTS[1:5] + PROMPTS[:1], crowd, use_tqdm=False)[-1].outputs[0].token_ids
    assert want == alone == busy
    assert llm.engine.stats().spec_decode.num_accepted_tokens > 0


def test_sampled_distribution_is_kept(tiny_llama_dir):
    """Unseeded requests at temperature 1 with top-k/top-p: the second and third tokens (which the draft
    proposes and the target verifies) are distributed as without speculation (two-sample chi-square)."""
    params = SamplingParams(temperature=1.0, top_k=8, top_p=0.95, max_tokens=3, ignore_eos=True)
    n = 300
    prompt = PROMPTS[2]
    plain = LLM(str(tiny_llama_dir), block_size=4, num_blocks=512, seed=1)
    spec = {"method": "draft_model", "model": str(tiny_llama_dir), "num_speculative_tokens": 2, **ALWAYS}
    llm = LLM(str(tiny_llama_dir), block_size=4, num_blocks=512, seed=2, speculative_config=spec)
    a = _tokens(plain.generate([prompt] * n, params, use_tqdm=False))
    b = _tokens(llm.generate([prompt] * n, params, use_tqdm=False))
    assert llm.engine.stats().spec_decode.num_draft_tokens > 0
    for pos in (1, 2):
        ca = collections.Counter(t[pos] for t in a)
        cb = collections.Counter(t[pos] for t in b)
        keys = [k for k in set(ca) | set(cb) if ca[k] + cb[k] >= 10]
        other_a = n - sum(ca[k] for k in keys)
        other_b = n - sum(cb[k] for k in keys)
        rows = [(ca[k], cb[k]) for k in keys] + ([(other_a, other_b)] if other_a + other_b else [])
        chi2 = sum((x - y) ** 2 / (x + y) for x, y in rows if x + y)  # equal sample sizes
        dof = max(1, len(rows) - 1)
        assert chi2 < dof + 4 * (2 * dof) ** 0.5 + 10, (pos, chi2, dof)


def test_stop_conditions_inside_an_accepted_run(tiny_llama_dir):
    spec = {"method": "draft_model", "model": str(tiny_llama_dir), "num_speculative_tokens": 4, **ALWAYS}
    llm = LLM(str(tiny_llama_dir), block_size=4, num_blocks=256, speculative_config=spec)
    plain = LLM(str(tiny_llama_dir), block_size=4, num_blocks=256)
    full = plain.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0]
    stop_id = full.token_ids[6]
    first = full.token_ids.index(stop_id)
    by_id = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_id]),
                         use_tqdm=False)[0].outputs[0]
    assert by_id.token_ids == full.token_ids[:first + 1] and by_id.finish_reason == "stop"
    for max_tokens in (1, 2, 5, 7):  # runs of 5 tokens per step: the cap falls inside them
        out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
        assert out.token_ids == full.token_ids[:max_tokens] and out.finish_reason == "length"
    stop_text = plain.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0].text[-3:]
    want = plain.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, stop=[stop_text]),
                          use_tqdm=False)[0].outputs[0]
    got = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, stop=[stop_text]),
                       use_tqdm=False)[0].outputs[0]
    assert got.text == want.text and got.finish_reason == "stop"
    lp = SamplingParams(temperature=0, max_tokens=8, logprobs=2, ignore_eos=True)
    a = plain.generate(PROMPTS[0], lp, use_tqdm=False)[0].outputs[0]
    b = llm.generate(PROMPTS[0], lp, use_tqdm=False)[0].outputs[0]
    assert a.token_ids == b.token_ids and len(b.logprobs) == 8
    for x, y in zip(a.logprobs, b.logprobs, strict=True):  # the target's logprobs, token by token
        assert x.keys() == y.keys()
        for t in x:
            assert abs(x[t].logprob - y[t].logprob) < 1e-4


def test_abort_mid_speculation_frees_every_block(tiny_llama_dir):
    spec = {"method": "draft_model", "model": str(tiny_llama_dir), "num_speculative_tokens": 3, **ALWAYS}
    llm = LLM(str(tiny_llama_dir), block_size=4, num_blocks=256, speculative_config=spec)
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    for _ in range(6):
        engine.step()
    assert any(r.spec_token_ids for r in engine.core.scheduler.running)
    engine.abort_request([f"r{i}" for i in range(len(PROMPTS))])
    while engine.has_unfinished_requests():
        engine.step()
    kv = engine.kv_stats()
    assert kv.free_blocks == kv.total_blocks and kv.active_requests == 0


def test_a_failing_proposer_costs_one_step_of_speculation(tiny_llama_dir, plain_tokens, monkeypatch):
    spec = {"method": "draft_model", "model": str(tiny_llama_dir), "num_speculative_tokens": 3, **ALWAYS}
    llm = LLM(str(tiny_llama_dir), block_size=4, num_blocks=256, speculative_config=spec)
    proposer = llm.engine.core.runner.speculator.proposer
    real = proposer.propose
    calls = {"n": 0}

    def flaky(items):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise RuntimeError("draft model failed")
        return real(items)

    monkeypatch.setattr(proposer, "propose", flaky)
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == plain_tokens
    assert calls["n"] >= 3


@pytest.mark.parametrize("spec, field", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 99}, "num_speculative_tokens"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "foo": 1}, "foo"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
    ({"method": "layer_skip", "num_speculative_tokens": 2, "num_draft_layers": 2}, "num_draft_layers"),
    ({"method": "ngram", "num_speculative_tokens": 12}, "num_speculative_tokens"),  # > this cache's room
])
def test_bad_configurations_fail_at_start_naming_the_field(tiny_llama_dir, spec, field):
    with pytest.raises(ValueError, match=field):
        LLM(str(tiny_llama_dir), block_size=4, num_blocks=2, max_num_batched_tokens=64, speculative_config=spec)


def test_a_draft_with_another_vocabulary_is_refused(tiny_llama_dir, tmp_path, smollm2_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path), safe_serialization=True)
    smollm2_tokenizer.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="speculative_config.model must share the target's vocabulary"):
        LLM(str(tiny_llama_dir), speculative_config={"method": "draft_model", "model": str(tmp_path),
                                                     "num_speculative_tokens": 2})


def test_static_policy_refuses_speculation(tiny_llama_dir):
    with pytest.raises(ValueError, match="policy"):
        LLM(str(tiny_llama_dir), policy="static", speculative_config={"method": "ngram", "num_speculative_tokens": 2})
