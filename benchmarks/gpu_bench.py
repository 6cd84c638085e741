"""The GPU figures in one process (gpu_check.sh runs it): parity with transformers on CUDA (float32
token for token, bfloat16 agreement), decode attention GB/s (Triton vs the PyTorch reference), the
64-request workload, the nano-vllm shape (256 sequences, input and output lengths uniform in 100–1,024,
ignore_eos), the batch-1 decode step against the memory floor, and transformers `generate` on the
same workload. Models are random-weight, built here from configs (nothing is downloaded): SmolLM2-135M's
shape and a Qwen3-0.6B-like Llama. The engine runs with decode CUDA graphs and, beside it, with
enforce_eager (and the decode attention micro with the tensor-core dots on and off). Each section runs
even if an earlier one failed.

    python benchmarks/gpu_bench.py --tokenizer DIR --out DIR [--hbm-gbps 4800]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import make_workload  # noqa: E402

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0)
QWEN3_06B_LIKE = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, max_position_embeddings=4096,
                      rope_theta=1000000.0)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "List three fruits:",
           "Explain how a transformer processes a sentence, step by step.", "Q: What is 12 times 7?\nA:",
           "The weather today is", "In 1969, the Apollo 11 mission"]


def emit(out: Path, name: str, **values) -> None:
    line = json.dumps({"section": name, **values})
    print(line, flush=True)
    with open(out / "gpu.jsonl", "a") as f:
        f.write(line + "\n")


def build_model(folder: Path, tokenizer, shape: dict) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, rms_norm_eps=1e-5, initializer_range=0.02, **shape)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def hf_model(folder: Path, dtype: torch.dtype, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation=attn).cuda().eval()
    model.generation_config.eos_token_id = None  # never stop early: the engine runs with ignore_eos
    return model


def parity(out: Path, folder: Path, tokenizer) -> None:
    from pagedserve import LLM, SamplingParams

    ids = [tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        llm = LLM(str(folder), device="cuda", dtype=dtype_name, kv_cache_memory_gb=4)
        ours = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in ids], params,
                                                                use_tqdm=False)]
        hf = hf_model(folder, dtype, attn="eager")  # the plain reference: no fused attention kernel
        theirs = []
        for p in ids:
            x = torch.tensor([p], device="cuda")
            with torch.no_grad():
                y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                                pad_token_id=0)
            theirs.append(y[0, len(p):].tolist())
        same = sum(a == b for a, b in zip(ours, theirs, strict=True))
        agree = sum(x == y for a, b in zip(ours, theirs, strict=True) for x, y in zip(a, b, strict=False))
        prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
                     for a, b in zip(ours, theirs, strict=True))
        emit(out, "parity", dtype=dtype_name, identical_sequences=f"{same}/{len(ids)}",
             token_agreement=agree / (32 * len(ids)), agreeing_prefix=prefix / (32 * len(ids)),
             backend=llm.engine.model.attention_backend.name)
        del llm, hf
        torch.cuda.empty_cache()


def attention_micro(out: Path, hbm_gbps: float) -> None:
    """Decode attention alone, SmolLM2's heads (9 query, 3 KV, head_dim 64), bf16 cache, block 16."""
    from pagedserve.attention.backends.torch_ref import TorchPagedAttention
    from pagedserve.attention.backends.triton_paged import TritonPagedAttention
    from pagedserve.attention.metadata import CommonAttentionMetadata

    heads, kv_heads, dim, bs = 9, 3, 64, 16
    for batch in (1, 64, 256):
        for ctx in (512, 4096):
            blocks_per = ctx // bs
            num_blocks = batch * blocks_per + 1
            tables = torch.randperm(num_blocks - 1)[: batch * blocks_per].view(batch, blocks_per) + 1
            slots = (tables[:, -1] * bs + bs - 1).cuda()
            common = CommonAttentionMetadata(slots, [1] * batch, [ctx] * batch, tables.tolist(), bs,
                                             torch.device("cuda"))
            q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(batch, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            row = {}
            backends = {"triton": TritonPagedAttention(), "triton_no_dot": TritonPagedAttention(decode_dot=False),
                        "torch": TorchPagedAttention()}
            for name, backend in backends.items():
                kc, vc = backend.allocate_kv_cache(num_blocks, bs, kv_heads, dim, torch.bfloat16, torch.device("cuda"))
                meta = backend.build_metadata(common)
                for _ in range(3):
                    backend(q, k, v, kc, vc, meta, dim ** -0.5)
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    backend(q, k, v, kc, vc, meta, dim ** -0.5)
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end) / 20
                kv_bytes = batch * ctx * kv_heads * dim * 2 * 2
                row[name] = dict(ms=round(ms, 4), gbps=round(kv_bytes / ms / 1e6, 1),
                                         of_hbm=round(kv_bytes / ms / 1e6 / hbm_gbps, 3))
                del kc, vc
            emit(out, "decode_attention", batch=batch, context=ctx, **row)


def run_engine(folder: Path, prompts: list[list[int]], max_tokens: list[int], max_num_seqs: int,
               **options) -> dict:
    from pagedserve import LLM, SamplingParams

    llm = LLM(str(folder), device="cuda", max_num_seqs=max_num_seqs, kv_cache_memory_gb=40,
              max_num_batched_tokens=8192, **options)
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    result = dict(tok_s=round(tokens / seconds, 1), tokens=tokens, seconds=round(seconds, 2),
                  backend=llm.engine.model.attention_backend.name, **graph_figures(llm))
    del llm
    torch.cuda.empty_cache()
    return result


def graph_figures(llm) -> dict:
    graphs = llm.engine.runner.graphs
    if graphs is None:
        return dict(cuda_graphs=False)
    return dict(cuda_graphs=True, graphs=len(graphs.sizes), capture_s=round(graphs.capture_seconds, 2),
                capture_mib=round(graphs.capture_bytes / 2**20, 1), graph_steps=graphs.replays)


def workload64(out: Path, folder: Path, tokenizer) -> list[tuple[list[int], int]]:
    work = make_workload(tokenizer, 64, 0)
    prompts, lengths = [p for p, _ in work], [n for _, n in work]
    for eager in (False, True):  # round 12 has the PyTorch reference path's figure
        emit(out, "workload64", model="smollm2-shape", seats=64,
             **run_engine(folder, prompts, lengths, 64, enforce_eager=eager))
    return work


def nano_vllm_shape(out: Path, folder: Path, name: str, vocab: int) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(100, 1024))] for _ in range(256)]
    lengths = [rng.randint(100, 1024) for _ in range(256)]
    for eager in (False, True):
        emit(out, "nano_vllm_shape", model=name, seqs=256,
             **run_engine(folder, prompts, lengths, 256, enforce_eager=eager))


def batch1_floor(out: Path, folder: Path, hbm_gbps: float) -> None:
    """The median decode step of one sequence (a whole engine step: schedule, forward, sample, update)
    against the floor: its weights and its mean KV context read once from HBM."""
    from pagedserve import LLM, SamplingParams

    for eager in (False, True):
        llm = LLM(str(folder), device="cuda", kv_cache_memory_gb=4, max_num_seqs=64, enforce_eager=eager)
        llm.generate(["warm up"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        engine = llm.engine
        engine.record_steps = True
        engine.step_records.clear()
        new_tokens = 256
        out_ = llm.generate(["The capital of France is"],
                            SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True), use_tqdm=False)
        steps = sorted(r.duration for r in engine.step_records if not r.num_prefill_seqs)
        median = steps[len(steps) // 2]
        cfg = engine.model_config
        weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        mean_ctx = len(out_[0].prompt_token_ids) + new_tokens / 2
        kv_bytes = int(mean_ctx * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
                       * engine.runner.kv_caches[0][0].element_size())
        floor = (weights + kv_bytes) / (hbm_gbps * 1e9)
        emit(out, "batch1_decode_step", median_ms=round(median * 1e3, 3), floor_ms=round(floor * 1e3, 4),
             ratio=round(median / floor, 1), weight_bytes=weights, kv_bytes=kv_bytes, **graph_figures(llm))
        del llm
        torch.cuda.empty_cache()


def transformers_generate(out: Path, folder: Path, work: list[tuple[list[int], int]]) -> None:
    """transformers `generate`, bf16, static batches of 64 (left-padded), each batch to its longest output."""
    hf = hf_model(folder, torch.bfloat16)
    prompts, lengths = [p for p, _ in work], [n for _, n in work]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        hf.generate(ids, attention_mask=mask, max_new_tokens=max(lengths), do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    # counted as the useful tokens (each request's own max_tokens), as the engine's are
    emit(out, "transformers_generate", tok_s=round(sum(lengths) / seconds, 1), seconds=round(seconds, 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--hbm-gbps", type=float, default=4800.0)  # H200
    # the figures this round has not got yet first, so that a short lease still takes them
    ap.add_argument("--sections", default="parity,batch1,workload64,attention,nano,transformers")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    # float32 means float32 (no TF32 in matmuls or cuDNN), for the engine and transformers alike
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    models = Path("/tmp/pagedserve-gpu-models")
    small = build_model(models / "smollm2-shape", tokenizer, SMOLLM2)
    emit(out, "machine", gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    work = make_workload(tokenizer, 64, 0)
    steps = {"parity": lambda: parity(out, small, tokenizer),
             "attention": lambda: attention_micro(out, args.hbm_gbps),
             "workload64": lambda: workload64(out, small, tokenizer),
             "batch1": lambda: batch1_floor(out, small, args.hbm_gbps),
             "transformers": lambda: transformers_generate(out, small, work),
             "nano": lambda: (nano_vllm_shape(out, small, "smollm2-shape", len(tokenizer)),
                              nano_vllm_shape(out, build_model(models / "qwen3-0.6b-like", tokenizer,
                                                               QWEN3_06B_LIKE), "qwen3-0.6b-like", len(tokenizer)))}
    for name in args.sections.split(","):
        try:
            steps[name]()
        except Exception:
            emit(out, name, error=traceback.format_exc()[-2000:])


if __name__ == "__main__":
    main()
