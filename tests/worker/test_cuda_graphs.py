"""Decode CUDA graphs without a GPU: the bucket rules, and DecodeGraphs over the Triton backend in
Triton's interpreter with EagerReplay standing in for the capture (each replay reads the same
persistent buffers a real graph reads), against the same engine run eagerly."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton_paged = pytest.importorskip("pagedserve.attention.backends.triton_paged")

from pagedserve import LLM, SamplingParams  # noqa: E402
from pagedserve.worker.cuda_graphs import (  # noqa: E402
    DecodeGraphs,
    EagerReplay,
    bucket_for,
    build_decode_graphs,
    capture_sizes,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MAX_SEQS = 5
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time there was a",
           "List three fruits:", "Q: What is 12 times 7?\nA:"]


def test_capture_sizes_are_vllm_like_buckets():
    assert capture_sizes(1) == [1]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    big = capture_sizes(320)
    assert big[:4] == [1, 2, 4, 8] and 256 in big and big[-3:] == [288, 304, 320]
    assert all(b - a == 16 for a, b in zip(big[big.index(256):], big[big.index(256) + 1:], strict=False))


@pytest.mark.parametrize("batch,bucket", [(1, 1), (3, 4), (4, 4), (5, 8), (9, 16), (64, 64), (65, None)])
def test_bucket_for_picks_the_smallest_that_holds_the_batch(batch, bucket):
    assert bucket_for(batch, capture_sizes(64)) == bucket


def _llm(folder) -> LLM:
    # enforce_eager: on a GPU these tests attach their own EagerReplay graphs
    return LLM(str(folder), num_blocks=96, block_size=4, max_num_seqs=MAX_SEQS, max_model_len=128,
               cpu_kernels=False, enable_prefix_caching=False, device=DEVICE.type, dtype="float32",
               enforce_eager=True)


def _use_triton(llm: LLM) -> None:
    """The CUDA backend (on CPU: in the interpreter), the same cache layout as the reference it replaces."""
    model = llm.engine.model
    model.attention_backend = llm.engine.runner.backend = triton_paged.TritonPagedAttention()
    for layer in model.layers:
        layer.self_attn.attention = model.attention_backend


def _attach_graphs(llm: LLM) -> tuple[DecodeGraphs, list[int]]:
    runner = llm.engine.runner
    graphs = DecodeGraphs(llm.engine.model, runner.kv_caches, MAX_SEQS, llm.engine.max_model_len, 4, DEVICE,
                          EagerReplay())
    graphs.capture_all()
    used: list[int] = []
    for size, replay in list(graphs._replays.items()):
        def spy(size=size, replay=replay):
            used.append(size)
            return replay()
        graphs._replays[size] = spy
    runner.graphs = graphs
    return graphs, used


def test_graph_steps_give_the_eager_tokens(tiny_llama_dir):
    # different lengths: the batch shrinks 5 -> 4 -> 3 -> 2 -> 1 and crosses buckets (5, 4, 2, 1)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 5, 7, 9, 11)]
    eager = _llm(tiny_llama_dir)
    _use_triton(eager)
    expected = [o.outputs[0].token_ids for o in eager.generate(PROMPTS, params, use_tqdm=False)]
    graphed = _llm(tiny_llama_dir)
    _use_triton(graphed)
    graphs, used = _attach_graphs(graphed)
    buffers = [t.data_ptr() for t in (graphs.input_ids, graphs.slot_mapping, graphs.block_tables,
                                      graphs.context_lens)]
    got = [o.outputs[0].token_ids for o in graphed.generate(PROMPTS, params, use_tqdm=False)]
    assert got == expected
    assert set(used) == {5, 4, 2, 1}  # 3 live rows replay bucket 4 with one padding row
    assert graphs.replays == len(used) == max(p.max_tokens for p in params) - 1
    assert buffers == [t.data_ptr() for t in (graphs.input_ids, graphs.slot_mapping, graphs.block_tables,
                                              graphs.context_lens)]
    assert graphed.engine.kv.pool.num_free == graphed.engine.kv.pool.num_blocks


def test_padding_rows_write_no_kv(tiny_llama_dir):
    llm = _llm(tiny_llama_dir)
    _use_triton(llm)
    graphs, used = _attach_graphs(llm)
    caches = llm.engine.runner.kv_caches
    before = [(k.clone(), v.clone()) for k, v in caches]
    # three decode rows in bucket 4; their slots are the last ones of blocks 1, 2, 3
    slots = [1 * 4 + 3, 2 * 4 + 3, 3 * 4 + 3]
    hidden = graphs.run([10, 20, 30], [3, 3, 3], slots, [4, 4, 4], [[0], [0], [0]])
    assert used == [4] and hidden.shape[0] == 3 and torch.isfinite(hidden).all()
    for (k0, v0), (k1, v1) in zip(before, caches, strict=True):
        changed = ((k0 != k1).any(-1) | (v0 != v1).any(-1)).nonzero().tolist()  # [kv_head, block, offset]
        assert {(b, o) for _, b, o in changed} == {(1, 3), (2, 3), (3, 3)}
    assert (graphs.slot_mapping[3] == -1) and (graphs.context_lens[3] == 0)


def test_no_graphs_on_cpu_or_when_eager(tiny_llama_dir):
    llm = _llm(tiny_llama_dir)
    model, runner = llm.engine.model, llm.engine.runner
    assert runner.graphs is None
    assert build_decode_graphs(model, runner.kv_caches, 8, 128, 4, torch.device("cpu"), False) is None
    assert build_decode_graphs(model, runner.kv_caches, 8, 128, 4, torch.device("cuda"), True) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_give_the_eager_tokens_on_gpu(tiny_llama_dir):
    prompts = PROMPTS * 3
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    runs = {}
    for eager in (True, False):
        llm = LLM(str(tiny_llama_dir), device="cuda", dtype="float32", max_num_seqs=16, enforce_eager=eager)
        assert (llm.engine.runner.graphs is None) == eager
        runs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        if not eager:
            assert llm.engine.runner.graphs.replays > 0
    assert runs[True] == runs[False]
