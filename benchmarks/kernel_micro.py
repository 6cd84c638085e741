"""Microbenchmarks of the fused CPU kernels on their own, with the shapes of SmolLM2-135M.

attention: 30 layers of decode attention (paged_decode_attention), each layer with its own K/V cache
as in the engine, every request at the same context length or (--spread) at lengths drawn evenly
from 10% to 190% of it, longest first, as in a continuous batch (its running requests are listed
oldest first, and the oldest have the longest contexts); blocks scattered at random over the cache
(as after a long-running server's churn) or in order (as a fresh engine hands them out).
matmul: all 121 matrices of a model (30 layers x 4, plus the output projection) at a given row count,
best of 5 passes, with the checkpoint's own weights or --quantization int8 / w8a8.
argmax: greedy argmax over a [batch, 49152] logits batch, the fused kernel against torch.argmax.
prefill: the engine prefilling the 64 prompts of benchmarks/throughput.py (7,631 tokens, one output
token each), three passes.

    .venv/bin/python benchmarks/kernel_micro.py attention --batch 64 --context 200 [--in-order] [--spread]
    .venv/bin/python benchmarks/kernel_micro.py matmul --rows 1 16 64 [--model HF_DIR --quantization w8a8]
    .venv/bin/python benchmarks/kernel_micro.py argmax --batch 64
    .venv/bin/python benchmarks/kernel_micro.py prefill
"""

from __future__ import annotations

import argparse
import time

import torch

from pagedserve.kernels import cpu_ops

LAYERS, KV_HEADS, GROUP, HEAD_DIM, BLOCK = 30, 3, 3, 64, 16  # SmolLM2-135M


def bench_attention(batch: int, context: int, in_order: bool, spread: bool) -> None:
    ops = cpu_ops()
    gen = torch.Generator().manual_seed(0)
    lens = (torch.randint(context // 10, 2 * context - context // 10 + 1, (batch,), generator=gen) if spread
            else torch.full((batch,), context, dtype=torch.long)).sort(descending=True).values
    per_request = -(-int(lens.max()) // BLOCK)
    num_blocks = batch * per_request + 64

    def cache(*shape: int) -> torch.Tensor:  # huge pages advised before the first touch, as the engine does
        t = torch.empty(*shape)
        ops.advise_huge_pages(t)
        return t.normal_()

    caches = [(cache(KV_HEADS, num_blocks, HEAD_DIM, BLOCK), cache(KV_HEADS, num_blocks, BLOCK, HEAD_DIM))
              for _ in range(LAYERS)]
    order = torch.arange(num_blocks) if in_order else torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0))
    tables = order[: batch * per_request].view(batch, per_request).contiguous()
    q = torch.randn(batch, KV_HEADS * GROUP, HEAD_DIM)
    out = torch.empty_like(q)
    for k, v in caches:  # warm-up
        ops.paged_decode_attention(out, q, k, v, tables, lens, HEAD_DIM ** -0.5)
    passes = 10
    start = time.perf_counter()
    for _ in range(passes):
        for k, v in caches:
            ops.paged_decode_attention(out, q, k, v, tables, lens, HEAD_DIM ** -0.5)
    step = (time.perf_counter() - start) / passes
    read = int(lens.sum()) * KV_HEADS * HEAD_DIM * 4 * 2 * LAYERS
    print(f"attention batch={batch} context={'~' if spread else ''}{context} "
          f"blocks {'in order' if in_order else 'scattered'}: "
          f"{step * 1e3:.1f} ms per step of {LAYERS} layers, {read / step / 1e9:.1f} GB/s of K/V")


def bench_matmul(rows: list[int], model: str, quantization: str | None) -> None:
    from pagedserve import LLM
    from pagedserve.model.layers.linear import Linear

    llm = LLM(model, max_num_seqs=4, quantization=quantization)
    layers = [m for m in llm.engine.model.modules() if isinstance(m, Linear) and m.fused_linear is not None]
    print(f"{model} quantization={quantization}: kernels {llm.engine.model.fused.simd_level()}")
    for n in rows:
        inputs = [torch.randn(n, m.in_features) for m in layers]
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for m, x in zip(layers, inputs, strict=True):
                m(x)
            best = min(best, time.perf_counter() - start)
        print(f"matmul rows={n}: {best * 1e3:.2f} ms for all {len(layers)} matrices")


def bench_argmax(batch: int) -> None:
    ops = cpu_ops()
    logits = torch.randn(batch, 49152)
    for name, fn in (("argmax_rows kernel", ops.argmax_rows), ("torch.argmax", lambda t: t.argmax(dim=-1))):
        fn(logits)
        start = time.perf_counter()
        for _ in range(50):
            fn(logits).tolist()
        print(f"{name}, [{batch}, 49152]: {(time.perf_counter() - start) / 50 * 1e3:.2f} ms")


def bench_prefill() -> None:
    from throughput import make_workload  # benchmarks/throughput.py (this folder is on sys.path)

    from pagedserve import LLM, SamplingParams

    llm = LLM("smollm2-135m", max_num_seqs=64, max_num_batched_tokens=2048)
    work = make_workload(llm.engine.tokenizer, 64, 0)
    prompts = [{"prompt_token_ids": ids} for ids, _ in work]
    one_token = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate(prompts[:4], one_token, use_tqdm=False)  # warm-up
    for _ in range(3):
        start = time.perf_counter()
        llm.generate(prompts, one_token, use_tqdm=False)
        print(f"prefill of {sum(len(ids) for ids, _ in work)} prompt tokens: {time.perf_counter() - start:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    att = sub.add_parser("attention")
    att.add_argument("--batch", type=int, default=64)
    att.add_argument("--context", type=int, default=200)
    att.add_argument("--in-order", action="store_true", help="blocks in order instead of scattered")
    att.add_argument("--spread", action="store_true", help="context lengths spread around --context")
    mm = sub.add_parser("matmul")
    mm.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    mm.add_argument("--model", default="smollm2-135m")
    mm.add_argument("--quantization", default=None, choices=["int8", "w8a8"])
    sub.add_parser("argmax").add_argument("--batch", type=int, default=64)
    sub.add_parser("prefill")
    args = ap.parse_args()
    if cpu_ops() is None:
        raise SystemExit("the fused CPU kernels are not available here")
    if args.what == "attention":
        bench_attention(args.batch, args.context, args.in_order, args.spread)
    elif args.what == "matmul":
        bench_matmul(args.rows, args.model, args.quantization)
    elif args.what == "argmax":
        bench_argmax(args.batch)
    else:
        bench_prefill()


if __name__ == "__main__":
    main()
