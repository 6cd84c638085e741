"""Engine behaviour on tiny random-weight models: parity with transformers, invariants, errors."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from tests.conftest import ENGINE_DEVICE, ENGINE_DTYPE, hf_greedy

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog and keeps running far away",
           "1 2 3 4 5 6", "A", "Once upon a time in a land far, far away, there lived a small dragon who"]


def _hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


@pytest.mark.parametrize("which", ["tiny_llama_dir", "tiny_qwen2_dir"])
@pytest.mark.parametrize("options", [{}, {"num_blocks": 14, "block_size": 4}, {"max_num_batched_tokens": 5},
                                     {"policy": "static", "max_num_seqs": 2}],
                         ids=["batch", "preempt", "chunked", "static"])
def test_greedy_matches_transformers(which, options, request):
    folder = request.getfixturevalue(which)
    llm = LLM(str(folder), device=ENGINE_DEVICE, dtype=ENGINE_DTYPE, **options)
    tok = llm.get_tokenizer()
    hf = _hf_model(folder)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf, tok.encode(prompt), 24, None), prompt
    assert llm.engine.kv_stats().free_blocks == llm.engine.kv_stats().total_blocks
    if "num_blocks" in options:
        assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 5}], ids=["batch", "chunked"])
def test_plain_pytorch_path_matches_transformers(tiny_qwen2_dir, options, monkeypatch):
    """With the fused CPU kernels off (no compiler, or PAGEDSERVE_CPU_KERNELS=0) output is unchanged."""
    monkeypatch.setattr("pagedserve.model.llama.cpu_ops", lambda: None)
    llm = LLM(str(tiny_qwen2_dir), **options)
    assert llm.engine.model.fused is None
    tok = llm.get_tokenizer()
    hf = _hf_model(tiny_qwen2_dir)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf, tok.encode(prompt), 24, None), prompt


def test_block_references_match_their_owners_and_all_are_freed(tiny_llm):
    """Blocks are shared now (cache hits, n > 1): each one's reference count is the number of tables
    holding it, and no step writes a block some other table still holds."""
    engine = tiny_llm.engine
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=30, n=2)
    for i, p in enumerate(PROMPTS * 2):
        engine.add_request(f"inv-{i}", p, params)
    execute = engine.runner.execute

    def checked_execute(sched):
        bs = engine.kv.block_size
        for s in sched.scheduled:
            start = s.request.num_computed_tokens
            for pos in range(start, start + s.num_new_tokens):
                block = s.block_ids[pos // bs]
                assert engine.kv.pool.ref_counts[block] == 1, f"{s.request.request_id} writes shared block {block}"
        return execute(sched)

    engine.core.runner.execute = checked_execute
    step = 0
    while engine.has_unfinished_requests():
        engine.step()
        holders: dict[int, int] = {}
        for table in engine.kv.block_tables.values():
            for b in table:
                holders[b] = holders.get(b, 0) + 1
        assert all(engine.kv.pool.ref_counts[b] == n for b, n in holders.items())
        assert sum(engine.kv.pool.ref_counts) == sum(holders.values())
        step += 1
        if step == 5:
            engine.abort_request(["inv-0", "inv-3"])
    st = engine.kv_stats()
    assert st.free_blocks == st.total_blocks and st.active_requests == 0


def test_seeded_request_same_alone_and_in_busy_batch(tiny_llama_dir):
    # On ENGINE_DEVICE, so a GPU run also covers every sampler stage (filters, penalties, logprobs).
    llm = LLM(str(tiny_llama_dir), num_blocks=64, block_size=4, max_num_seqs=8, device=ENGINE_DEVICE, dtype=ENGINE_DTYPE)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, min_p=0.01, repetition_penalty=1.1,
                            presence_penalty=0.2, seed=42, max_tokens=20, logprobs=2)
    alone = llm.generate(["Tell me a story"], seeded, use_tqdm=False)[0].outputs[0]
    noise = SamplingParams(temperature=1.2, max_tokens=25)
    batch = llm.generate(PROMPTS + ["Tell me a story"] + PROMPTS, [noise] * 5 + [seeded] + [noise] * 5,
                              use_tqdm=False)
    assert batch[5].outputs[0].token_ids == alone.token_ids
    assert batch[5].outputs[0].text == alone.text
    assert len(alone.logprobs) == 20


def test_bad_requests_are_refused_and_others_finish(tiny_llm):
    engine = tiny_llm.engine
    engine.add_request("good", "Hello there", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    engine.step()
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("empty", "", SamplingParams())
    with pytest.raises(ValueError, match="prompt_token_ids"):
        engine.add_request("ids", [10**9], SamplingParams())
    with pytest.raises(ValueError, match="max_model_len|limit"):
        engine.add_request("long", list(range(5000)), SamplingParams())
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request("huge", "hi", SamplingParams(max_tokens=100000))
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request("bad", "hi", SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good", "hi", SamplingParams())
    with pytest.raises(ValueError, match="logit_bias"):
        engine.add_request("bias", "hi", SamplingParams(logit_bias={10**9: 1.0}))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out
    assert list(done) == ["good"]
    assert len(done["good"].outputs[0].token_ids) == 10
    assert engine.kv_stats().free_blocks == engine.kv_stats().total_blocks


def test_n_stop_strings_logprobs_and_metrics(tiny_llm):
    greedy = tiny_llm.generate(["Hello world"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0]
    cut = greedy.text[len(greedy.text) // 2:][:4]
    assert cut
    stopped = tiny_llm.generate(["Hello world"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                                stop=[cut]), use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == cut
    assert stopped.text == greedy.text[: greedy.text.index(cut)]

    out = tiny_llm.generate(["Hello"], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8, logprobs=2),
                            use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for c in out.outputs:
        assert len(c.token_ids) == len(c.logprobs) <= 8
        for tok, lp in zip(c.token_ids, c.logprobs, strict=True):
            assert tok in lp and lp[tok].logprob <= 0
    m = out.metrics
    assert m.queue_time >= 0 and m.ttft >= m.queue_time and m.e2e_latency >= m.ttft
    assert m.mean_itl is None or m.mean_itl >= 0


def test_llm_chat_applies_template(tiny_llm):
    out = tiny_llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(temperature=0, max_tokens=4),
                        use_tqdm=False)[0]
    text = tiny_llm.get_tokenizer().decode(out.prompt_token_ids)
    assert "<|im_start|>user" in text and text.rstrip().endswith("assistant")


def test_llama3_rope_scaling_matches_transformers(tmp_path, smollm2_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      initializer_range=0.1, tie_word_embeddings=False, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path), safe_serialization=True)
    smollm2_tokenizer.save_pretrained(str(tmp_path))
    llm = LLM(str(tmp_path), device=ENGINE_DEVICE, dtype=ENGINE_DTYPE)
    hf = _hf_model(tmp_path)
    prompt = "A long enough prompt so that positions go well past the short original context " * 2
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(hf, smollm2_tokenizer.encode(prompt), 24, None)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs(tiny_llama_dir, dtype):
    llm = LLM(str(tiny_llama_dir), dtype=dtype, num_blocks=32, block_size=4)
    assert llm.engine.runner.kv_caches[0][0].dtype == getattr(torch, dtype)
    out = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 6 for o in out)


def test_logit_bias_bans_and_forces_tokens_in_a_mixed_batch(tiny_llm):
    """-100 on a token greedy decoding picks: it never appears; +100 on one token: every step takes it;
    the unbiased request beside them keeps its own greedy output (no cross-request effect)."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = tiny_llm.generate(["Hello world"], params, use_tqdm=False)[0].outputs[0].token_ids
    banned = {t: -100.0 for t in set(plain)}
    batch = tiny_llm.generate(["Hello world"] * 3, [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logit_bias=banned),
        SamplingParams(temperature=0.8, seed=1, max_tokens=12, ignore_eos=True, logit_bias={42: 100.0}),
        params], use_tqdm=False)
    assert not set(batch[0].outputs[0].token_ids) & set(plain)
    assert batch[1].outputs[0].token_ids == [42] * 12
    assert batch[2].outputs[0].token_ids == plain


# --- scheduling_policy="priority" ----------------------------------------------------------------


def _run_recording(engine) -> tuple[dict[str, list[int]], list[str], list[str]]:
    """Step to the end: each request's tokens, the order requests were first scheduled, and finished."""
    tokens: dict[str, list[int]] = {}
    started: list[str] = []
    finished: list[str] = []
    while engine.has_unfinished_requests():
        outs = engine.step()
        for r in engine.scheduler.running:
            if r.request_id not in started:
                started.append(r.request_id)
        for out in outs:
            if out.finished:
                finished.append(out.request_id)
                tokens[out.request_id] = out.outputs[0].token_ids
    assert engine.kv_stats().free_blocks == engine.kv_stats().total_blocks
    return tokens, started, finished


def test_priority_ordering_under_load_and_greedy_output_unchanged(tiny_llama_dir):
    """Two seats, four bulk requests (priority 5) running and queued; three urgent ones (priority 0)
    arrive later: they take the seats at once (the bulk ones running are preempted) and all finish
    first. Every request's greedy tokens equal those of the same requests under fcfs."""
    bulk = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    urgent = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    options = dict(num_blocks=64, block_size=4, max_num_seqs=2)
    llm = LLM(str(tiny_llama_dir), scheduling_policy="priority", **options)
    engine = llm.engine
    for i, p in enumerate(PROMPTS[:4]):
        engine.add_request(f"bulk{i}", p, bulk, priority=5)
    engine.step()
    engine.step()
    assert sorted(r.request_id for r in engine.scheduler.running) == ["bulk0", "bulk1"]
    for i, p in enumerate(PROMPTS[1:4]):
        engine.add_request(f"urgent{i}", p, urgent, priority=0)
    tokens, started, finished = _run_recording(engine)
    assert finished[:3] == ["urgent0", "urgent1", "urgent2"]
    assert started.index("urgent2") < started.index("bulk2") < started.index("bulk3")
    assert engine.scheduler.num_preemptions >= 2  # bulk0 and bulk1 gave their seats up

    fcfs = LLM(str(tiny_llama_dir), **options)
    expected = fcfs.generate(PROMPTS[:4] + PROMPTS[1:4], [bulk] * 4 + [urgent] * 3, use_tqdm=False)
    names = [f"bulk{i}" for i in range(4)] + [f"urgent{i}" for i in range(3)]
    assert {n: o.outputs[0].token_ids for n, o in zip(names, expected, strict=True)} == tokens


def test_generate_priority_list_orders_admission(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), num_blocks=64, block_size=4, max_num_seqs=1, scheduling_policy="priority")
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    started = []
    step = llm.engine.step

    def recording_step():
        outs = step()
        started.extend(r.request_id for r in llm.engine.scheduler.running if r.request_id not in started)
        return outs

    llm.engine.step = recording_step
    outs = llm.generate(PROMPTS[:4], params, use_tqdm=False, priority=[3, 1, 2, -1])
    assert [o.prompt for o in outs] == PROMPTS[:4]  # outputs stay in input order
    assert started == [outs[3].request_id, outs[1].request_id, outs[2].request_id, outs[0].request_id]
    plain = llm.generate(PROMPTS[:4], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    with pytest.raises(ValueError, match="priority has 2 values for 4 prompts"):
        llm.generate(PROMPTS[:4], params, use_tqdm=False, priority=[0, 1])
    with pytest.raises(ValueError, match="priority must be a list"):
        llm.generate(PROMPTS[:4], params, use_tqdm=False, priority=3)
    assert not llm.engine.has_unfinished_requests()


def test_priority_is_inherited_by_n_siblings_and_beams(tiny_llama_dir):
    from pagedserve.sampling_params import BeamSearchParams

    llm = LLM(str(tiny_llama_dir), num_blocks=64, block_size=4, scheduling_policy="priority")
    engine = llm.engine
    engine.add_request("n", "Hello world", SamplingParams(temperature=0.8, seed=1, n=3, max_tokens=4), priority=4)
    engine.add_request("beam", "Hello world", BeamSearchParams(beam_width=3, max_tokens=4), priority=-2)
    seen: dict[str, int] = {}
    while engine.has_unfinished_requests():
        engine.step()
        seen.update({rid: r.priority for rid, r in engine.scheduler.requests.items()})
    assert {rid: p for rid, p in seen.items() if rid.startswith("n#")} == {"n#0": 4, "n#1": 4, "n#2": 4}
    beams = {rid: p for rid, p in seen.items() if rid.startswith("beam")}
    assert len(beams) > 1 and set(beams.values()) == {-2}


def test_fcfs_refuses_a_priority(tiny_llm):
    with pytest.raises(ValueError, match=r"^priority must be 0 .*--scheduling-policy priority"):
        tiny_llm.engine.add_request("p", "hi", SamplingParams(max_tokens=2), priority=1)
    with pytest.raises(ValueError, match="^priority"):
        tiny_llm.generate(["hi", "there"], SamplingParams(max_tokens=2), use_tqdm=False, priority=[0, 2])
    with pytest.raises(ValueError, match="^priority must be an integer"):
        tiny_llm.engine.add_request("p", "hi", SamplingParams(max_tokens=2), priority=1.5)
    assert not tiny_llm.engine.has_unfinished_requests()
    assert tiny_llm.engine.kv_stats().free_blocks == tiny_llm.engine.kv_stats().total_blocks
    assert tiny_llm.generate(["hi"], SamplingParams(max_tokens=2), use_tqdm=False, priority=[0])[0].finished


def test_priority_needs_continuous_batching(tiny_llama_dir):
    with pytest.raises(ValueError, match="scheduling_policy must be 'fcfs' with policy 'static'"):
        LLM(str(tiny_llama_dir), policy="static", scheduling_policy="priority")


def test_chat_shows_tools_through_the_template(tiny_tool_llama_dir):
    """LLM.chat(tools=...) renders the tools the way the model's template shows them (vLLM's argument)."""
    llm = LLM(str(tiny_tool_llama_dir), num_blocks=64, block_size=4, max_num_seqs=2)
    tool = {"type": "function", "function": {"name": "lookup_city", "parameters": {"type": "object"}}}
    conv = [{"role": "user", "content": "hi"}]
    text = llm.get_tokenizer().decode(llm.apply_chat_template(conv, tools=[tool]))
    assert "<tools>" in text and "lookup_city" in text
    assert "<tools>" not in llm.get_tokenizer().decode(llm.apply_chat_template(conv))
    out = llm.chat(conv, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False, tools=[tool])
    assert out[0].prompt_token_ids == llm.apply_chat_template(conv, tools=[tool])
