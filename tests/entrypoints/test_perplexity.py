"""`pagedserve perplexity`: the engine's perplexity and KL against transformers' own computation on the
same windows, the window arithmetic, KV blocks freed, the CLI end to end and its argument errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from pagedserve.entrypoints.perplexity import evaluate, read_text, sliding_windows, tokenize_text

CONTEXT, STRIDE = 48, 20


@pytest.fixture(scope="module")
def text_tokens(smollm2_tokenizer) -> list[int]:
    _, text = read_text("pydoc-topics")
    return tokenize_text(smollm2_tokenizer, text[:2000], max_tokens=150)


@pytest.fixture(scope="module")
def core(tiny_llama_dir):
    from pagedserve.config import EngineConfig
    from pagedserve.engine.core import EngineCore

    # A token budget below the window: each window is fed in chunks through the paged cache.
    return EngineCore(EngineConfig.from_kwargs(str(tiny_llama_dir), num_blocks=16, block_size=4,
                                               max_num_batched_tokens=16))


@pytest.fixture(scope="module")
def hf_tiny(tiny_llama_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()


@pytest.fixture(scope="module")
def perturbed_dir(tiny_llama_dir, smollm2_tokenizer, tmp_path_factory):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir))
    torch.manual_seed(0)
    with torch.no_grad():
        w = model.model.layers[0].mlp.down_proj.weight
        w.add_(0.05 * torch.randn_like(w))
    folder = tmp_path_factory.mktemp("tiny-llama-perturbed")
    model.save_pretrained(str(folder), safe_serialization=True)
    smollm2_tokenizer.save_pretrained(str(folder))
    return folder


def hf_window_log_softmax(model, tokens: list[int]) -> list[torch.Tensor]:
    """Per window of the recipe, transformers' log-softmax rows of the positions it scores."""
    rows = []
    for begin, end, first in sliding_windows(len(tokens), CONTEXT, STRIDE):
        with torch.no_grad():
            logits = model(torch.tensor([tokens[begin:end]])).logits[0].float()
        rows.append(logits[first - begin - 1:end - begin - 1].log_softmax(dim=-1))
    return rows


def hf_recipe_perplexity(model, tokens: list[int]) -> float:
    """Hugging Face's perplexity recipe (labels masked with -100), weighted by the tokens each window
    scores: an independent statement of which tokens count."""
    ids = torch.tensor([tokens])
    nll_sum, n, prev_end = 0.0, 0, 0
    for begin in range(0, len(tokens), STRIDE):
        end = min(begin + CONTEXT, len(tokens))
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=labels).loss.double().item()
        valid = int((labels[:, 1:] != -100).sum())
        nll_sum += loss * valid
        n += valid
        prev_end = end
        if end == len(tokens):
            break
    assert n == len(tokens) - 1
    return math.exp(nll_sum / n)


def test_sliding_windows_score_every_token_once():
    for n, ctx, stride in [(10, 4, 2), (11, 4, 3), (5, 8, 3), (100, 16, 1), (2, 2, 1)]:
        scored = [t for _, end, first in sliding_windows(n, ctx, stride) for t in range(first, end)]
        assert scored == list(range(1, n)), (n, ctx, stride)
        assert all(end - begin <= ctx and begin < first for begin, end, first in sliding_windows(n, ctx, stride))
    # Disjoint windows (stride = context length): each window's first token is context only.
    assert sliding_windows(11, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 11, 9)]
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 4, 5)
    with pytest.raises(ValueError, match="context length"):
        sliding_windows(10, 1, 1)


def test_perplexity_equals_transformers_and_blocks_are_freed(core, hf_tiny, text_tokens):
    hf = hf_tiny
    result = evaluate(core.prompt_log_softmax, text_tokens, CONTEXT, STRIDE)
    assert result["scored_tokens"] == len(text_tokens) - 1
    assert result["perplexity"] == pytest.approx(hf_recipe_perplexity(hf, text_tokens), rel=1e-4)
    assert core.kv.pool.num_free == core.kv.pool.num_blocks
    # The rows themselves: full distributions, equal to transformers' at every scored position.
    for (begin, end, first), ref in zip(sliding_windows(len(text_tokens), CONTEXT, STRIDE),
                                        hf_window_log_softmax(hf, text_tokens), strict=True):
        ours = core.prompt_log_softmax(text_tokens[begin:end], first - begin)
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def test_kl_against_itself_is_zero(core, tiny_llama_dir, text_tokens):
    from pagedserve.config import EngineConfig
    from pagedserve.engine.core import EngineCore

    twin = EngineCore(EngineConfig.from_kwargs(str(tiny_llama_dir), num_blocks=16, block_size=4))
    result = evaluate(core.prompt_log_softmax, text_tokens, CONTEXT, STRIDE, reference=twin.prompt_log_softmax)
    assert abs(result["kl"]["mean"]) < 1e-6 and abs(result["kl"]["p99"]) < 1e-6
    assert result["top1_agreement"]["percent"] == 100.0
    assert result["perplexity_ratio"] == pytest.approx(1.0, rel=1e-5)
    assert twin.kv.pool.num_free == twin.kv.pool.num_blocks


def test_kl_against_a_perturbed_copy_equals_transformers(core, hf_tiny, perturbed_dir, text_tokens):
    from transformers import LlamaForCausalLM

    from pagedserve.config import EngineConfig
    from pagedserve.engine.core import EngineCore

    other = EngineCore(EngineConfig.from_kwargs(str(perturbed_dir), num_blocks=16, block_size=4))
    result = evaluate(other.prompt_log_softmax, text_tokens, CONTEXT, STRIDE, reference=core.prompt_log_softmax)
    p = torch.cat(hf_window_log_softmax(hf_tiny, text_tokens))
    q = torch.cat(hf_window_log_softmax(LlamaForCausalLM.from_pretrained(str(perturbed_dir)).eval(), text_tokens))
    kl = (p.exp() * (p - q)).sum(dim=1).double()
    assert result["kl"]["mean"] > 1e-4
    assert result["kl"]["mean"] == pytest.approx(kl.mean().item(), rel=1e-3)
    assert result["kl"]["p99"] == pytest.approx(torch.quantile(kl, 0.99).item(), rel=1e-3)
    top1 = (p.argmax(dim=1) == q.argmax(dim=1)).double().mean().item()
    assert result["top1_agreement"]["percent"] == pytest.approx(100 * top1, abs=1e-9)
    assert result["perplexity_ratio"] == pytest.approx(result["perplexity"] / result["reference"]["perplexity"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagedserve.entrypoints.cli", "perplexity", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_end_to_end_with_kl(tiny_llama_dir, tmp_path):
    out = tmp_path / "ppl.json"
    proc = _cli("--model", str(tiny_llama_dir), "--file", "licenses", "--context-length", "64", "--stride", "32",
                "--max-tokens", "100", "--num-blocks", "32", "--reference-options", '{"cpu_kernels": false}',
                "--json", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    for figure in ("perplexity:", "scored tokens: 100", "elapsed:", "scored tokens/s", "reference perplexity:",
                   "mean KL(reference || model):", "99th percentile:", "top-1 agreement:"):
        assert figure in proc.stdout, proc.stdout
    result = json.loads(out.read_text())
    assert result["scored_tokens"] == 100 and result["windows"] == 3 and result["perplexity"] > 1
    assert result["engine_options"] == {"num_blocks": 32}
    assert result["reference"]["engine_options"] == {"num_blocks": 32, "cpu_kernels": False}
    assert result["kl"]["mean"] < 1e-3  # the same weights, other kernels: rounding only


@pytest.mark.parametrize("args, message", [
    (["--stride", "600"], "stride must be in [1, context length = 512], got 600"),
    (["--context-length", "1"], "context length must be >= 2"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--reference-options", "[1]"], "--reference-options must be a JSON object"),
    (["--reference-options", "{"], "--reference-options is not JSON"),
    (["--reference-options", '{"no_such": 1}'], "unknown engine option(s): ['no_such']"),
])
def test_bad_arguments_are_clear_errors_before_any_load(tmp_path, capsys, args, message):
    from pagedserve.entrypoints.cli import main

    text = tmp_path / "t.txt"
    text.write_text("hello world")
    assert main(["perplexity", "--model", str(tmp_path / "never-loaded"), "--file", str(text), *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_file_and_too_long_a_context(tiny_llama_dir, tmp_path, capsys):
    from pagedserve.entrypoints.cli import main

    assert main(["perplexity", "--model", str(tiny_llama_dir), "--file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
    text = tmp_path / "t.txt"
    text.write_text("hello world, " * 20)
    assert main(["perplexity", "--model", str(tiny_llama_dir), "--file", str(text), "--num-blocks", "8",
                 "--context-length", "1024", "--stride", "512"]) == 2
    assert "exceeds the model's max_model_len (512)" in capsys.readouterr().err
