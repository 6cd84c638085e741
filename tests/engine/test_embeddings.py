"""Embeddings (`LLM.embed`, PoolingParams) on tiny random-weight models: transformers' final hidden
states as the reference, and the same vector whatever runs beside it, however the prompt is chunked,
with the prefix cache warm and after a preemption."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F

from pagedserve import LLM, PoolingParams, SamplingParams
from pagedserve.engine.core_messages import EngineCoreOutput, EngineCoreRequest
from pagedserve.engine.input_processor import InputError
from tests.conftest import ENGINE_DEVICE, ENGINE_DTYPE

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog and keeps running far away",
           "1 2 3 4 5 6", "A", "Once upon a time in a land far, far away, there lived a small dragon who"]
LONG = ("In 1969, the Apollo 11 mission landed on the Moon. The astronauts walked on the surface while "
        "a third orbited above, and what they carried back to Earth mattered for science.")
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
SAME = dict(rtol=0, atol=1e-6)  # one vector computed two ways by the engine


def _llm(folder, **options) -> LLM:
    return LLM(str(folder), device=ENGINE_DEVICE, dtype=ENGINE_DTYPE, **{"num_blocks": 64, "block_size": 4, "max_num_seqs": 8, **options})


def _reference(folder, ids: list[int], pooling_type: str, normalize: bool = True) -> torch.Tensor:
    """transformers: the decoder's last_hidden_state (after the final norm), pooled the same way."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        states = hf.model(torch.tensor([ids])).last_hidden_state[0]
    vector = states[-1] if pooling_type == "LAST" else states.mean(dim=0)
    return F.normalize(vector, dim=0) if normalize else vector


def _vec(out) -> torch.Tensor:
    return torch.tensor(out.outputs.embedding)


def _all_free(llm: LLM) -> bool:
    s = llm.engine.kv_stats()
    return s.free_blocks == s.total_blocks and not llm.engine.has_unfinished_requests()


@pytest.fixture(scope="module")
def last_llm(tiny_llama_dir):
    return _llm(tiny_llama_dir)


@pytest.fixture(scope="module")
def mean_llm(tiny_llama_dir):
    return _llm(tiny_llama_dir, pooling_type="MEAN")


@pytest.mark.parametrize("which", ["tiny_llama_dir", "tiny_qwen2_dir"])
@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN"])
def test_matches_transformers_hidden_states(which, pooling_type, request):
    folder = request.getfixturevalue(which)
    llm = _llm(folder, pooling_type=pooling_type, max_num_batched_tokens=7)  # chunked prefill too
    tok = llm.get_tokenizer()
    outs = llm.embed(PROMPTS, use_tqdm=False)
    raw = llm.embed(PROMPTS, PoolingParams(normalize=False), use_tqdm=False)
    hidden = llm.engine.model_config.hidden_size
    for prompt, out, unnormalized in zip(PROMPTS, outs, raw, strict=True):
        ids = tok.encode(prompt)
        assert out.prompt_token_ids == ids and out.finished
        assert len(out.outputs.embedding) == out.outputs.hidden_size == hidden
        assert abs(_vec(out).norm().item() - 1.0) < 1e-5
        torch.testing.assert_close(_vec(out), _reference(folder, ids, pooling_type), rtol=0, atol=1e-4)
        torch.testing.assert_close(_vec(unnormalized), _reference(folder, ids, pooling_type, normalize=False),
                                   rtol=1e-4, atol=1e-4)
    assert _all_free(llm)


def test_plain_pytorch_path_gives_the_same_vectors(tiny_qwen2_dir, monkeypatch):
    """Without the fused CPU kernels (no C++ decoder stack) the final norm's output is pooled the same."""
    fused = _llm(tiny_qwen2_dir, pooling_type="MEAN")
    monkeypatch.setattr("pagedserve.model.llama.cpu_ops", lambda: None)
    plain = _llm(tiny_qwen2_dir, pooling_type="MEAN", max_num_batched_tokens=6)
    assert plain.engine.model.stack is None
    for a, b in zip(fused.embed(PROMPTS, use_tqdm=False), plain.embed(PROMPTS, use_tqdm=False), strict=True):
        torch.testing.assert_close(_vec(a), _vec(b), rtol=0, atol=1e-5)


def test_default_is_last_and_a_request_may_ask_for_mean(tiny_llama_dir, last_llm, mean_llm):
    assert last_llm.engine.config.pooling_type == "LAST"
    last = _vec(last_llm.embed(LONG, use_tqdm=False)[0])
    mean = _vec(mean_llm.embed(LONG, use_tqdm=False)[0])
    asked = _vec(last_llm.embed(LONG, PoolingParams(pooling_type="MEAN"), use_tqdm=False)[0])
    torch.testing.assert_close(asked, mean, **SAME)
    assert not torch.allclose(last, mean, atol=1e-3)


@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN"])
def test_same_vector_alone_batched_chunked_and_with_the_cache_warm(tiny_llama_dir, pooling_type):
    alone_llm = _llm(tiny_llama_dir, pooling_type=pooling_type, enable_prefix_caching=False)
    alone = {p: _vec(alone_llm.embed(p, use_tqdm=False)[0]) for p in PROMPTS + [LONG]}
    greedy_alone = [o.outputs[0].token_ids for o in alone_llm.generate(PROMPTS, GREEDY, use_tqdm=False)]

    for options in ({}, {"max_num_batched_tokens": 5}):
        llm = _llm(tiny_llama_dir, pooling_type=pooling_type, **options)
        engine = llm.engine
        # Generation and embeddings interleaved in one batch, the embeddings of the prompts being generated.
        for i, p in enumerate(PROMPTS):
            engine.add_request(f"gen-{i}", p, GREEDY)
            engine.add_request(f"emb-{i}", p, PoolingParams())
        engine.add_request("emb-long", LONG, PoolingParams())
        finals = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finals[out.request_id] = out
        for i, p in enumerate(PROMPTS):
            assert finals[f"gen-{i}"].outputs[0].token_ids == greedy_alone[i], (options, p)
            emb = finals[f"emb-{i}"]
            assert emb.outputs[0].token_ids == [] and emb.outputs[0].finish_reason == "stop"
            torch.testing.assert_close(torch.tensor(emb.pooling_output), alone[p], **SAME)
        torch.testing.assert_close(torch.tensor(finals["emb-long"].pooling_output), alone[LONG], **SAME)
        assert _all_free(llm)

        # The cache is warm now (prompts generated and embedded): the vector stays the same. LAST may
        # take the hits (its last token is always computed); MEAN computes every token again.
        warm = llm.engine.kv_stats().prefix_cache_hits
        again = llm.embed([LONG, *PROMPTS], use_tqdm=False)
        for p, out in zip([LONG, *PROMPTS], again, strict=True):
            torch.testing.assert_close(_vec(out), alone[p], **SAME)
        hits = llm.engine.kv_stats().prefix_cache_hits - warm
        assert (hits > 0) == (pooling_type == "LAST")
        assert _all_free(llm)


SPEC = {"disable_by_batch_size": 10_000, "num_speculative_tokens": 3}  # speculate on every step


@pytest.mark.parametrize("options", [{"policy": "static", "max_num_seqs": 3},
                                     {"speculative_config": {"method": "ngram", "prompt_lookup_min": 1, **SPEC}},
                                     {"speculative_config": {"method": "layer_skip", "num_draft_layers": 1, **SPEC}}],
                         ids=["static", "ngram", "layer_skip"])
def test_same_vector_beside_static_batches_and_speculation(tiny_llama_dir, options):
    """The static baseline reserves a pooling request's prompt only; with speculative decoding the
    step's hidden states may come from the proposer (layer skip reuses its draft's states)."""
    ref_llm = _llm(tiny_llama_dir, pooling_type="MEAN")
    alone = [_vec(o) for o in ref_llm.embed(PROMPTS, use_tqdm=False)]
    greedy_alone = [o.outputs[0].token_ids for o in ref_llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    llm = _llm(tiny_llama_dir, pooling_type="MEAN", **options)
    engine = llm.engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"gen-{i}", p, GREEDY)
        engine.add_request(f"emb-{i}", p, PoolingParams())
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    for i in range(len(PROMPTS)):
        assert finals[f"gen-{i}"].outputs[0].token_ids == greedy_alone[i]
        torch.testing.assert_close(torch.tensor(finals[f"emb-{i}"].pooling_output), alone[i], **SAME)
    assert _all_free(llm)


@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN"])
def test_a_preempted_embedding_restarts_and_gives_the_same_vector(tiny_llama_dir, pooling_type):
    ref = _vec(_llm(tiny_llama_dir, pooling_type=pooling_type).embed(LONG, use_tqdm=False)[0])
    # 14 blocks of 4 slots: generations growing side by side run out, and the newest running request
    # (the embedding, chunked over several steps) is preempted and recomputed.
    llm = LLM(str(tiny_llama_dir), device=ENGINE_DEVICE, dtype=ENGINE_DTYPE, num_blocks=14, block_size=4, max_num_batched_tokens=6,
              pooling_type=pooling_type)
    engine = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for i in range(2):
        engine.add_request(f"gen-{i}", PROMPTS[2], greedy)
    engine.step()
    engine.add_request("emb", LONG, PoolingParams())
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    emb = finals["emb"]
    assert emb.metrics.num_preemptions > 0
    torch.testing.assert_close(torch.tensor(emb.pooling_output), ref, **SAME)
    assert finals["gen-0"].outputs[0].token_ids == finals["gen-1"].outputs[0].token_ids
    assert _all_free(llm)


def test_truncate_prompt_tokens_keeps_the_last_tokens(last_llm, mean_llm):
    ids = last_llm.get_tokenizer().encode(LONG)
    for llm in (last_llm, mean_llm):
        cut = llm.embed(LONG, PoolingParams(truncate_prompt_tokens=7), use_tqdm=False)[0]
        assert cut.prompt_token_ids == ids[-7:]
        torch.testing.assert_close(_vec(cut), _vec(llm.embed([ids[-7:]], use_tqdm=False)[0]), **SAME)
    assert last_llm.embed(LONG, PoolingParams(truncate_prompt_tokens=-1), use_tqdm=False)[0].prompt_token_ids == ids


def test_bad_inputs_are_refused_and_others_finish(last_llm):
    engine = last_llm.engine
    limit = engine.input_processor.limit
    vocab = engine.model_config.vocab_size
    engine.add_request("ok-gen", "Hello world", GREEDY)
    engine.add_request("ok-emb", "Hello world", PoolingParams())
    cases = [("", None, "prompt"), ([], None, "prompt_token_ids"), ([vocab], None, "prompt_token_ids"),
             ([1] * (limit + 1), None, "prompt"),
             ("hi", PoolingParams(dimensions=engine.model_config.hidden_size + 1), "dimensions"),
             ("hi", PoolingParams(truncate_prompt_tokens=limit + 1), "truncate_prompt_tokens")]
    for prompt, params, field in cases:
        with pytest.raises(InputError) as e:
            engine.add_request(None, prompt, params or PoolingParams())
        assert e.value.param == field and field in str(e.value)
    for bad in (dict(dimensions=0), dict(truncate_prompt_tokens=0), dict(normalize=1), dict(pooling_type="CLS")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PoolingParams(**bad)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals["ok-emb"].pooling_output is not None and len(finals["ok-gen"].outputs[0].token_ids) == 20
    full = last_llm.embed([[1] * limit], use_tqdm=False)[0]  # nothing is generated: the prompt may fill the context
    assert len(full.outputs.embedding) == engine.model_config.hidden_size
    assert _all_free(last_llm)


def test_aborting_an_embedding_frees_its_blocks(tiny_llama_dir):
    llm = _llm(tiny_llama_dir, pooling_type="MEAN", max_num_batched_tokens=4)
    engine = llm.engine
    engine.add_request("emb", LONG, PoolingParams())
    engine.step()
    assert engine.kv_stats().used_blocks > 0
    engine.abort_request("emb")
    outs = engine.step()
    assert [o.outputs[0].finish_reason for o in outs] == ["abort"] and outs[0].pooling_output is None
    assert _all_free(llm)
    assert not engine.runner.pooler._sums  # the partial sum went with it
    torch.testing.assert_close(_vec(llm.embed(LONG, use_tqdm=False)[0]),
                               _reference(tiny_llama_dir, llm.get_tokenizer().encode(LONG), "MEAN"), rtol=0, atol=1e-4)


def test_pooling_requests_and_outputs_pickle():
    params = PoolingParams(truncate_prompt_tokens=5)
    req = EngineCoreRequest("e", [1, 2], SamplingParams(max_tokens=1), None, 1.0, pooling_params=params)
    assert pickle.loads(pickle.dumps(req)) == req
    out = EngineCoreOutput("e", [], finish_reason="stop", pooling_output=[0.6, 0.8])
    assert pickle.loads(pickle.dumps(out)) == out
