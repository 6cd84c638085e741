"""Beam search inside the core: the best beams equal transformers' beam search token for token, beams
share blocks, and aborting frees every beam's blocks."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, BeamSearchParams, SamplingParams
from tests.engine.test_engine import _hf_model

PROMPTS = ["Hello world", "Once upon a time in a land far, far away"]


def _hf_beams(hf, ids: list[int], k: int, max_tokens: int, eos: int | None, length_penalty: float = 1.0,
              early_stopping: bool | str = False) -> list[list[int]]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          num_beams=k, num_return_sequences=k, do_sample=False, max_new_tokens=max_tokens,
                          length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=eos,
                          pad_token_id=eos if eos is not None else 0, return_dict_in_generate=True,
                          output_scores=True)
    beams = []
    for row, idx in zip(out.sequences, out.beam_indices, strict=True):
        n = int((idx >= 0).sum())  # generated length, the EOS included (padding after it excluded)
        beams.append(row[len(ids):len(ids) + n].tolist())
    return beams


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("options", [{}, {"num_blocks": 40}], ids=["roomy", "tight"])
def test_beams_equal_transformers_on_a_tiny_model(tiny_llama_dir, k, options):
    llm = LLM(str(tiny_llama_dir), block_size=4, **({"num_blocks": 256} | options))
    tok = llm.get_tokenizer()
    hf = _hf_model(tiny_llama_dir)
    params = BeamSearchParams(beam_width=k, max_tokens=10, length_penalty=0.5)
    outs = llm.beam_search(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ref = _hf_beams(hf, tok.encode(prompt), k, 10, tok.eos_token_id, 0.5)
        assert [s.tokens for s in out.sequences] == ref, prompt
    st = llm.engine.kv_stats()
    assert st.free_blocks == st.total_blocks and st.active_requests == 0


@pytest.mark.parametrize("k", [2, 4])
def test_best_beam_equals_transformers_on_smollm2(smollm2_llm, hf_smollm2, smollm2_tokenizer, k):
    prompt = "The capital of France is"
    out = smollm2_llm.beam_search(prompt, BeamSearchParams(beam_width=k, max_tokens=16))[0]
    ref = _hf_beams(hf_smollm2, smollm2_tokenizer.encode(prompt), k, 16, smollm2_tokenizer.eos_token_id)
    assert out.sequences[0].tokens == ref[0]
    assert out.sequences[0].text == smollm2_tokenizer.decode(ref[0], skip_special_tokens=True)


def test_beams_share_blocks_and_abort_frees_them(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), num_blocks=256, block_size=4)
    engine = llm.engine
    prompt = "Once upon a time in a land far, far away, there lived a small dragon who " * 3
    engine.add_request("beams", prompt, BeamSearchParams(beam_width=4, max_tokens=40, ignore_eos=True))
    prompt_blocks = -(-len(llm.get_tokenizer().encode(prompt)) // 4)
    for _ in range(8):
        engine.step()
    st = engine.kv_stats()
    assert st.active_requests == 4
    assert st.used_blocks < 4 * prompt_blocks  # the prompt's blocks are held once, shared by the beams
    engine.abort_request("beams")
    engine.step()
    assert not engine.has_unfinished_requests()
    st = engine.kv_stats()
    assert st.free_blocks == st.total_blocks and st.active_requests == 0


def test_bad_beam_params_are_refused(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), num_blocks=32, block_size=4)
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="beam_width"):
        llm.beam_search("Hello", BeamSearchParams(beam_width=16, max_tokens=60))  # cannot fit 128 slots
    st = llm.engine.kv_stats()
    assert st.free_blocks == st.total_blocks


def test_beam_search_needs_the_continuous_policy(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), num_blocks=64, block_size=4, policy="static")
    with pytest.raises(ValueError, match="continuous policy"):
        llm.beam_search("Hello", BeamSearchParams(beam_width=2, max_tokens=4))
    assert not llm.engine.has_unfinished_requests()
    st = llm.engine.kv_stats()
    assert st.free_blocks == st.total_blocks


def test_beams_under_preemption_finish_with_the_same_beams(tiny_llama_dir):
    """A cache too small for a long request and two searches at once: preempted beams take their parked
    siblings back to the queue (nobody holds blocks while waiting), and the searches end as alone."""
    params = BeamSearchParams(beam_width=4, max_tokens=12, ignore_eos=True)
    alone = LLM(str(tiny_llama_dir), num_blocks=256, block_size=4).beam_search(PROMPTS, params)
    llm = LLM(str(tiny_llama_dir), num_blocks=22, block_size=4)  # the long request alone fills it
    engine = llm.engine
    engine.add_request("long", "Once upon a time " * 6, SamplingParams(temperature=0, max_tokens=60,
                                                                       ignore_eos=True))
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"b{i}", p, params)
    finals = {}
    for _ in range(2000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = [c.token_ids for c in out.outputs]
    assert not engine.has_unfinished_requests(), "the engine stalled"
    assert engine.scheduler.num_preemptions > 0
    assert [finals[f"b{i}"] for i in range(len(PROMPTS))] == [[s.tokens for s in o.sequences] for o in alone]
    st = engine.kv_stats()
    assert st.free_blocks == st.total_blocks
