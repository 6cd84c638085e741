"""BeamSearchState against transformers' own beam search (generate(num_beams=k)), step by step."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from pagedserve.core.beam_search import (
    Beam,
    BeamHypothesis,
    BeamSearchParams,
    BeamSearchState,
    beam_logprobs,
)

# Generation-config keys that do not change beam search; anything else (repetition penalty, min length,
# suppressed tokens...) would add a logits processor on the HF side only.
_NEUTRAL_GEN_KEYS = {"bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "output_attentions",
                     "output_hidden_states", "transformers_version", "_from_model_config"}

LLAMA_PROMPTS = [[1, 504, 3458, 314, 4649, 314], [1, 9, 1510, 7, 88]]


def _check_generation_config(model) -> None:
    extra = set(model.generation_config.to_diff_dict()) - _NEUTRAL_GEN_KEYS
    assert not extra, f"generation_config sets {extra}, which would change HF's beam search"


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    _check_generation_config(model)
    return model


@pytest.fixture(scope="module")
def hf_tiny_llama(tiny_llama_dir):
    return _load(tiny_llama_dir)


@pytest.fixture(scope="module")
def hf_tiny_qwen2(tiny_qwen2_dir):
    return _load(tiny_qwen2_dir)


@pytest.fixture(scope="module")
def hf_small_vocab():
    """A 24-token model with peaky logits: EOS shows up often, inside and beyond the top k candidates."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=24, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # wide-swinging EOS logits: EOS often ranks inside and just beyond the top k
        model.lm_head.weight[2] *= 3
    _check_generation_config(model)
    return model


def _drive(model, prompt: list[int], params: BeamSearchParams, eos: int | list[int] | None) -> list[BeamHypothesis]:
    """Run the state machine with full recomputation of every live beam (prompt + beam tokens)."""
    state = BeamSearchState(params, len(prompt), eos)
    assert state.live == [Beam([], 0.0)]
    for _ in range(params.max_tokens):
        ids = torch.tensor([prompt + b.token_ids for b in state.live])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1, :]
        before = [list(b.token_ids) for b in state.live]
        step = state.step(torch.log_softmax(logits.float(), dim=-1))
        # The engine forks its KV blocks from `continuing`: it must describe the new live list exactly.
        assert [before[p] + [t] for p, t in step.continuing] == [b.token_ids for b in state.live]
        assert len(state.live) <= params.beam_width
        if step.done:
            break
    assert state.done, "max_tokens steps must always end the search"
    with pytest.raises(RuntimeError):
        state.step(torch.zeros(len(state.live), 4))
    return state.finalize()


def _hf(model, prompt: list[int], k: int, lp: float, es: bool | str, m: int,
        eos: int | list[int] | None, pad: int) -> tuple[list[list[int]], list[float]]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=k, num_return_sequences=k,
                             do_sample=False, length_penalty=lp, early_stopping=es, max_new_tokens=m,
                             min_length=0, eos_token_id=eos, pad_token_id=pad, output_scores=True,
                             return_dict_in_generate=True)
    seqs = []
    for row, beam_idx in zip(out.sequences, out.beam_indices, strict=True):
        # Generated length from beam_indices (-1 past the end): the fill value is not always pad_token_id
        # (HF's `pad or eos[0]` picks EOS when pad is 0).
        n = int((beam_idx >= 0).sum())
        assert len(set(row[len(prompt) + n:].tolist())) <= 1
        seqs.append(row[len(prompt):len(prompt) + n].tolist())
    return seqs, out.sequences_scores.tolist()


def _compare(model, prompt, k, lp, es, m, eos, ignore_eos=False, pad=0) -> list[BeamHypothesis]:
    params = BeamSearchParams(beam_width=k, max_tokens=m, length_penalty=lp, early_stopping=es,
                              ignore_eos=ignore_eos)
    ours = _drive(model, prompt, params, eos)
    hf_seqs, hf_scores = _hf(model, prompt, k, lp, es, m, None if ignore_eos else eos, pad)
    assert ours[0].token_ids == hf_seqs[0]  # the best beam
    assert [h.token_ids for h in ours] == hf_seqs
    assert [h.score for h in ours] == pytest.approx(hf_scores, abs=1e-4)
    eos_set = set() if ignore_eos or eos is None else ({eos} if isinstance(eos, int) else set(eos))
    for h in ours:
        assert h.score == pytest.approx(h.cum_logprob / len(h.token_ids) ** lp, rel=1e-5)
        assert h.finish_reason == ("stop" if h.token_ids[-1] in eos_set else "length")
        assert len(h.token_ids) == m or h.finish_reason == "stop"
        assert not eos_set.intersection(h.token_ids[:-1])  # nothing continues past EOS
    return ours


def _early_eos(model, prompt: list[int]) -> int:
    """The most confident token of the greedy path's steps 2-6: used as EOS, the beams hit it early."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                             min_length=0, eos_token_id=None, pad_token_id=0, output_scores=True,
                             return_dict_in_generate=True)
    path = out.sequences[0, len(prompt):].tolist()
    confidence = [float(torch.log_softmax(s[0].float(), -1).max()) for s in out.scores]
    pos = max((p for p in range(1, 6) if path[p] not in path[:p]), key=lambda p: confidence[p])
    return path[pos]


@pytest.mark.parametrize("model_name", ["hf_tiny_llama", "hf_tiny_qwen2"])
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("lp", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("es", [False, True, "never"])
def test_matches_hf_with_early_eos(request, model_name, k, lp, es):
    model = request.getfixturevalue(model_name)
    prompt = LLAMA_PROMPTS[0]
    hyps = _compare(model, prompt, k, lp, es, 10, _early_eos(model, prompt))
    if es is True and k == 2:  # True stops as soon as k hypotheses are finished, here all by EOS
        assert all(h.finish_reason == "stop" and len(h.token_ids) < 10 for h in hyps)


@pytest.mark.parametrize("model_name", ["hf_tiny_llama", "hf_tiny_qwen2"])
@pytest.mark.parametrize("prompt", LLAMA_PROMPTS)
@pytest.mark.parametrize("k", [2, 4])
def test_matches_hf_to_max_length(request, model_name, prompt, k):
    # The tokenizer's own EOS: a random model practically never emits it, so all beams run to max length.
    model = request.getfixturevalue(model_name)
    eos = model.generation_config.eos_token_id
    hyps = _compare(model, prompt, k, 1.0, False, 8, eos, pad=eos)
    assert len(hyps) == k and all(len(h.token_ids) == 8 for h in hyps)


@pytest.mark.parametrize("es", [False, "never"])
def test_ignore_eos_matches_hf_without_eos(hf_tiny_llama, es):
    prompt = LLAMA_PROMPTS[0]  # the prompt whose early EOS ends beams in test_matches_hf_with_early_eos
    eos = _early_eos(hf_tiny_llama, prompt)
    hyps = _compare(hf_tiny_llama, prompt, 2, 0.5, es, 8, eos, ignore_eos=True)
    assert all(h.finish_reason == "length" and len(h.token_ids) == 8 for h in hyps)
    assert any(eos in h.token_ids for h in hyps)  # EOS was generated and treated as an ordinary token


def test_small_vocab_stress(hf_small_vocab):
    """Many random cases where EOS is frequent: early finishes, EOS beyond the top k, heuristic stops."""
    rng = random.Random(0)
    grid = list(itertools.product([2, 3, 4], [1.0, 0.5, 2.0, -0.5, 0.0], [False, True, "never"]))
    stopped_early = mixed = 0
    for k, lp, es in grid:
        prompt = [1] + [rng.randrange(3, 24) for _ in range(rng.randrange(1, 6))]
        m = rng.randrange(3, 13)
        hyps = _compare(hf_small_vocab, prompt, k, lp, es, m, 2)
        stopped_early += all(len(h.token_ids) < m for h in hyps)
        mixed += len({h.finish_reason for h in hyps}) == 2
    # The grid must actually exercise the EOS paths, not only max length.
    assert stopped_early > 0 and mixed > 0


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_small_vocab_several_eos_ids(hf_small_vocab, ignore_eos):
    # Several EOS ids: HF widens the candidate set to (1 + #EOS) * k.
    for k, es in [(2, False), (3, "never"), (4, True)]:
        _compare(hf_small_vocab, [1, 5, 9], k, 1.0, es, 10, [2, 7, 11], ignore_eos=ignore_eos)


def test_width_one_handcrafted():
    # early_stopping=False: an EOS ranked first that no live beam can beat ends the search at once.
    state = BeamSearchState(BeamSearchParams(beam_width=1, max_tokens=3), prompt_len=5, eos_token_id=0)
    step = state.step(torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0]]), dim=-1))
    assert step.continuing == [(0, 1)] and step.done
    assert [(h.token_ids, h.finish_reason) for h in state.finalize()] == [([0], "stop")]

    # "never" with a positive penalty bounds the live beam at max length, so it keeps going.
    params = BeamSearchParams(beam_width=1, max_tokens=3, early_stopping="never")
    state = BeamSearchState(params, prompt_len=5, eos_token_id=0)
    first = torch.log_softmax(torch.tensor([[3.0, 2.9, 0.0]]), dim=-1)
    step = state.step(first)
    assert step.continuing == [(0, 1)] and not step.done
    assert state.finalize()[0].token_ids == [0]
    later = torch.log_softmax(torch.tensor([[0.0, 5.0, -1.0]]), dim=-1)
    step = state.step(later)  # EOS is the 2nd candidate, beyond the top 1: dropped
    assert step.continuing == [(0, 1)] and not step.done
    step = state.step(later)
    assert step.done
    (hyp,) = state.finalize()
    cum = float(first[0, 1] + later[0, 1] + later[0, 1])
    assert hyp.token_ids == [1, 1, 1] and hyp.finish_reason == "length"
    assert hyp.cum_logprob == pytest.approx(cum) and hyp.score == pytest.approx(cum / 3)


def test_eos_beyond_top_k_is_dropped():
    # k=2, one live beam: EOS is the 3rd candidate, so it neither finishes nor continues.
    state = BeamSearchState(BeamSearchParams(beam_width=2, max_tokens=4), prompt_len=1, eos_token_id=3)
    step = state.step(torch.log_softmax(torch.tensor([[5.0, 4.0, 0.0, 3.0, 2.0]]), dim=-1))
    assert step.continuing == [(0, 0), (0, 1)] and not step.done
    # Finalized early (no hypothesis yet): the live beams, as if max length were reached now.
    assert [(h.token_ids, h.finish_reason) for h in state.finalize()] == [([0], "length"), ([1], "length")]


def test_beam_logprobs_temperature():
    logits = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float16)
    assert torch.allclose(beam_logprobs(logits), torch.log_softmax(logits.float(), -1))
    assert torch.allclose(beam_logprobs(logits, 0.5), torch.log_softmax(logits.float() * 2, -1))
    assert beam_logprobs(logits).dtype == torch.float32


@pytest.mark.parametrize("kwargs, field", [
    (dict(beam_width=0), "beam_width"), (dict(beam_width=65), "beam_width"), (dict(beam_width=2.0), "beam_width"),
    (dict(beam_width=True), "beam_width"), (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=1.5), "max_tokens"),
    (dict(length_penalty="1"), "length_penalty"), (dict(length_penalty=float("nan")), "length_penalty"),
    (dict(early_stopping="always"), "early_stopping"), (dict(early_stopping=1), "early_stopping"),
    (dict(early_stopping=None), "early_stopping"), (dict(temperature=-0.1), "temperature"),
    (dict(temperature="hot"), "temperature"), (dict(ignore_eos=1), "ignore_eos"),
])
def test_params_validation(kwargs, field):
    args = dict(beam_width=2, max_tokens=4) | kwargs
    with pytest.raises(ValueError, match=field):
        BeamSearchParams(**args)


def test_params_accepts_valid_values():
    for es in (True, False, "never"):
        BeamSearchParams(beam_width=64, max_tokens=1, early_stopping=es, length_penalty=0, temperature=0.7)
    BeamSearchParams(beam_width=1, max_tokens=100, length_penalty=-1.5)


def test_step_rejects_wrong_shape():
    state = BeamSearchState(BeamSearchParams(beam_width=2, max_tokens=4), prompt_len=1, eos_token_id=None)
    with pytest.raises(ValueError, match="shape"):
        state.step(torch.zeros(2, 10))
