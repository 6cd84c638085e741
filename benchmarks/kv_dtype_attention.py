"""Decode attention per layer call with a float32, float16 or bfloat16 KV cache (kv_cache_dtype).

The extension's paged_decode_attention is called directly with SmolLM2-135M's shapes (9 query heads,
3 KV heads, head_dim 64, block size 16), every request at the same context length. As in the engine,
each of the model's 30 layers has its own cache and a step reads every layer's once, so the K/V read
per step (over 1 GB at batch 64 in float32) is far beyond the caches of the CPU: the kernel streams
from memory, as it does in a real decode step. The blocks of each request are scattered at random over
a pool a quarter larger than what the batch uses (as after a long-running server's churn). The three
dtypes share the block tables, the queries and the values (16-bit ones rounded from the float32 ones)
and run interleaved, one pass of all layers each per repeat, so a busy neighbour slows them alike; the
figure is the median over the repeats of a pass's time divided by its layer count. Beside the wall
time it gives the process's CPU time per call: on a machine shared with other work, a descheduled
thread stalls a parallel kernel's wall time while its CPU time stays put (with --threads 1 the CPU
time is the kernel's own, stalls on memory included).

    .venv/bin/python benchmarks/kv_dtype_attention.py [--batch 16 64] [--context 400] [--repeats 9] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pagedserve.kernels import cpu_ops

LAYERS, KV_HEADS, GROUP, HEAD_DIM, BLOCK = 30, 3, 3, 64, 16  # SmolLM2-135M
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _caches(ops, num_blocks: int, layers: int, dtype: torch.dtype, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """Per layer (k_cache, v_cache) in the fused backend's layout, huge pages advised before the first
    touch as the engine does; the values are the same random float32 ones for every dtype, rounded."""
    out = []
    for layer in range(layers):
        pair = []
        for shape in ((KV_HEADS, num_blocks, HEAD_DIM, BLOCK), (KV_HEADS, num_blocks, BLOCK, HEAD_DIM)):
            t = torch.empty(shape, dtype=dtype)
            ops.advise_huge_pages(t)
            gen = torch.Generator().manual_seed(seed + 2 * layer + len(pair))
            t.copy_(torch.randn(shape, generator=gen))
            pair.append(t)
        out.append(tuple(pair))
    return out


def bench(batch: int, context: int, repeats: int, layers: int) -> dict[str, float]:
    ops = cpu_ops()
    assert ops is not None, "the CPU kernels did not build"
    per_request = -(-context // BLOCK)
    num_blocks = batch * per_request * 5 // 4
    gen = torch.Generator().manual_seed(0)
    tables = torch.randperm(num_blocks, generator=gen)[: batch * per_request].view(batch, per_request).contiguous()
    lens = torch.full((batch,), context, dtype=torch.long)
    q = torch.randn(batch, KV_HEADS * GROUP, HEAD_DIM, generator=gen)
    scale = HEAD_DIM ** -0.5
    caches = {name: _caches(ops, num_blocks, layers, dtype, seed=1) for name, dtype in DTYPES.items()}
    outs = {name: torch.empty_like(q) for name in DTYPES}

    def one_pass(name: str) -> tuple[float, float]:
        out = outs[name]
        start, cpu = time.perf_counter(), time.process_time()
        for k, v in caches[name]:
            ops.paged_decode_attention(out, q, k, v, tables, lens, scale)
        return (time.perf_counter() - start) / layers, (time.process_time() - cpu) / layers

    for name in DTYPES:  # warm-up: page faults, the huge pages' first touch, the code
        one_pass(name)
    times: dict[str, list[float]] = {name: [] for name in DTYPES}
    cpu_times: dict[str, list[float]] = {name: [] for name in DTYPES}
    for _ in range(repeats):
        for name in DTYPES:
            wall, cpu = one_pass(name)
            times[name].append(wall)
            cpu_times[name].append(cpu)
    for name in ("float16", "bfloat16"):  # the same attention, to the 16-bit rounding of K/V
        err = (outs[name] - outs["float32"]).abs().max().item()
        assert err < 0.05, f"{name} output is off by {err}"
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    cpu_medians = {name: statistics.median(ts) for name, ts in cpu_times.items()}
    for name, dtype in DTYPES.items():
        kv_bytes = batch * context * KV_HEADS * HEAD_DIM * 2 * torch.empty((), dtype=dtype).element_size()
        t, c = medians[name], cpu_medians[name]
        print(f"batch {batch:3d}, context {context}, {name:8s} KV: {t * 1e3:6.3f} ms per layer call "
              f"(min {min(times[name]) * 1e3:6.3f}), {kv_bytes / t / 1e9:5.1f} GB/s of K/V, "
              f"{medians['float32'] / t:4.2f}x float32; CPU {c * 1e3:6.3f} ms, {cpu_medians['float32'] / c:4.2f}x")
    return medians


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    p.add_argument("--context", type=int, default=400)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--layers", type=int, default=LAYERS, help="caches cycled through, one per layer")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    for batch in args.batch:
        bench(batch, args.context, args.repeats, args.layers)


if __name__ == "__main__":
    main()
