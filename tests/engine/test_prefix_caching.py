"""Prefix caching and n > 1 on shared blocks, end to end on tiny random-weight models: greedy output
equals transformers and the logits are bit-identical with the cache cold, warm, partly hit, after
eviction, under preemption and chunked prefill; n > 1 prefills its prompt once."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from tests.conftest import hf_greedy
from tests.engine.test_engine import _hf_model

SHARED = "You are a helpful assistant who answers questions about the sea and its creatures. " * 3
QUESTIONS = ["What is a whale?", "Why is the sea salty?", "Do fish sleep?", "How deep is the ocean?"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _recording(llm: LLM) -> list[torch.Tensor]:
    """Every logits tensor the engine samples from, in order (one row per sampled sequence)."""
    rows: list[torch.Tensor] = []
    model = llm.engine.model
    compute = model.compute_logits

    def record(hidden):
        out = compute(hidden)
        rows.append(out.clone())
        return out

    model.compute_logits = record
    return rows


def _run_alone(llm: LLM, prompt: str) -> tuple[list[int], list[torch.Tensor], int]:
    rows = _recording(llm)
    out = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    llm.engine.model.compute_logits = type(llm.engine.model).compute_logits.__get__(llm.engine.model)
    return out.outputs[0].token_ids, rows, out.num_cached_tokens


@pytest.fixture(scope="module")
def hf_reference(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    hf = _hf_model(tiny_llama_dir)
    return {q: hf_greedy(hf, tok.encode(SHARED + q), 12, None) for q in QUESTIONS}


@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 7}, {"num_blocks": 40}],
                         ids=["plain", "chunked", "small-cache"])
def test_cold_warm_and_partial_hits_give_identical_logits(tiny_llama_dir, hf_reference, options):
    llm = LLM(str(tiny_llama_dir), block_size=4, **({"num_blocks": 256} | options))
    cold = {}
    for q in QUESTIONS[:2]:
        llm.reset_prefix_cache()
        cold[q] = _run_alone(llm, SHARED + q)
        assert cold[q][0] == hf_reference[q] and cold[q][2] == 0
    llm.reset_prefix_cache()
    _run_alone(llm, SHARED + QUESTIONS[0])  # warms the shared prefix
    partial = _run_alone(llm, SHARED + QUESTIONS[1])  # hits the prefix, computes its own question
    assert partial[2] > 0 and partial[0] == cold[QUESTIONS[1]][0]
    assert all(torch.equal(a, b) for a, b in zip(cold[QUESTIONS[1]][1], partial[1], strict=True))
    warm = _run_alone(llm, SHARED + QUESTIONS[1])  # the whole prompt but its last token is cached
    assert warm[2] >= partial[2] and all(torch.equal(a, b) for a, b in zip(cold[QUESTIONS[1]][1], warm[1],
                                                                            strict=True))
    st = llm.engine.kv_stats()
    assert st.free_blocks == st.total_blocks and st.prefix_cache_hits > 0


def test_parity_in_one_batch_with_preemption_and_eviction(tiny_llama_dir, hf_reference):
    """A cache too small for everyone: preempted requests come back to their own (or evicted) blocks."""
    llm = LLM(str(tiny_llama_dir), num_blocks=24, block_size=4, max_num_seqs=4)
    for _ in range(2):  # the second round meets whatever the first left cached
        outs = llm.generate([SHARED + q for q in QUESTIONS], GREEDY, use_tqdm=False)
        for q, out in zip(QUESTIONS, outs, strict=True):
            assert out.outputs[0].token_ids == hf_reference[q], q
    assert llm.engine.scheduler.num_preemptions > 0
    st = llm.engine.kv_stats()
    assert st.free_blocks == st.total_blocks and st.prefix_cache_hits > 0


def test_caching_off_gives_the_same_tokens_and_no_hits(tiny_llama_dir, hf_reference):
    llm = LLM(str(tiny_llama_dir), num_blocks=256, block_size=4, enable_prefix_caching=False)
    for _ in range(2):
        outs = llm.generate([SHARED + q for q in QUESTIONS], GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == [hf_reference[q] for q in QUESTIONS]
        assert all(o.num_cached_tokens == 0 for o in outs)
    assert llm.engine.kv_stats().prefix_cache_queries == 0


def test_n4_shares_the_prompt_blocks():
    """512 prompt tokens with n = 4 (the real SmolLM2): one prompt's blocks plus each sample's tail,
    not four prompts."""
    bs = 16
    llm = LLM("smollm2-135m", num_blocks=256, block_size=bs, enable_prefix_caching=False)
    prompt = [(7 * i) % 5000 + 100 for i in range(512)]
    params = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=20, ignore_eos=True)
    llm.engine.add_request("shared", {"prompt_token_ids": prompt}, params)
    peak = 0
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
        peak = max(peak, llm.engine.kv_stats().used_blocks)
    tail_blocks = 4 * -(-20 // bs)  # each sample's own blocks for its 20 tokens (the prompt fills its blocks)
    assert peak <= 512 // bs + tail_blocks
    separate = 4 * (512 // bs + -(-20 // bs))
    assert separate >= 2 * peak  # what four separate requests hold


def test_n_samples_equal_separate_seeded_requests(tiny_llama_dir):
    """Forked samples draw from the same prompt logits with seed + i: the same text as four requests."""
    llm = LLM(str(tiny_llama_dir), num_blocks=256, block_size=4)
    prompt = SHARED + "Tell me more."
    params = SamplingParams(n=4, temperature=0.9, seed=11, max_tokens=10, ignore_eos=True)
    forked = llm.generate(prompt, params, use_tqdm=False)[0]
    llm.reset_prefix_cache()
    apart = llm.generate([prompt] * 4, [SamplingParams(temperature=0.9, seed=11 + i, max_tokens=10, ignore_eos=True)
                                        for i in range(4)], use_tqdm=False)
    assert [c.token_ids for c in forked.outputs] == [o.outputs[0].token_ids for o in apart]
    assert len({tuple(c.token_ids) for c in forked.outputs}) > 1


def test_aborting_a_forked_request_frees_every_block(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), num_blocks=128, block_size=4)
    engine = llm.engine
    engine.add_request("a", SHARED, SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=50, ignore_eos=True))
    engine.add_request("b", SHARED + "x", SamplingParams(n=2, temperature=1.0, seed=2, max_tokens=5))
    engine.abort_request("b")  # before its prompt: the siblings waiting for it leave too
    for _ in range(4):
        engine.step()
    engine.abort_request("a")
    engine.step()
    assert not engine.has_unfinished_requests()
    st = engine.kv_stats()
    assert st.free_blocks == st.total_blocks and st.active_requests == 0


def test_prompt_logprobs_are_the_same_cold_and_warm(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), num_blocks=128, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3)
    cold = llm.generate(SHARED, params, use_tqdm=False)[0]
    warm = llm.generate(SHARED, params, use_tqdm=False)[0]
    assert cold.prompt_logprobs[0] is None and len(cold.prompt_logprobs) == len(cold.prompt_token_ids)
    assert warm.num_cached_tokens == 0  # prompt logprobs need every position: no cache hit
    assert [{t: lp.logprob for t, lp in d.items()} for d in cold.prompt_logprobs[1:]] == \
        [{t: lp.logprob for t, lp in d.items()} for d in warm.prompt_logprobs[1:]]
    hf = _hf_model(tiny_llama_dir)
    with torch.no_grad():
        ref = hf(torch.tensor([cold.prompt_token_ids])).logits[0].float().log_softmax(-1)
    for pos, d in enumerate(cold.prompt_logprobs[1:], start=1):
        token = cold.prompt_token_ids[pos]
        assert d[token].logprob == pytest.approx(float(ref[pos - 1, token]), abs=1e-4)


def test_prompt_logprobs_survive_preemption_mid_prompt(tiny_llama_dir):
    """Chunks of a preempted prompt split elsewhere on the second pass: the logprobs still line up."""
    prompts = [SHARED + q for q in QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=1)
    roomy = LLM(str(tiny_llama_dir), num_blocks=256, block_size=4).generate(prompts, params, use_tqdm=False)
    tight = LLM(str(tiny_llama_dir), num_blocks=30, block_size=4, max_num_batched_tokens=13)
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    for a, b in zip(roomy, outs, strict=True):
        assert len(b.prompt_logprobs) == len(b.prompt_token_ids)
        assert [d and {t: lp.logprob for t, lp in d.items()} for d in a.prompt_logprobs] == \
            [d and {t: lp.logprob for t, lp in d.items()} for d in b.prompt_logprobs]
