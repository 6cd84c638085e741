"""Where one engine step's time goes, in steady-state decode at a given batch size.

Wall time per step is split into: scheduling (Scheduler.schedule), input preparation
(ModelRunner.prepare_inputs), the model forward, the LM head, sampling, the scheduler's update
(Scheduler.update_from_output: token append, stop checks on ids, freeing blocks), the front end's
output processing (detokenization, stop strings, RequestOutputs) and what is left. Inside the forward, torch.profiler's per-op
self time is grouped into matmuls, attention + KV gather/write, and other kernels. The fused CPU
kernels (pagedserve/kernels) are not ATen ops, so the profiler does not see them: each call is timed
by a thin wrapper instead and added to its group. What is left is Python overhead between kernels.
With the C++ decoder stack (the default on CPU) the layers are one call, timed as a whole; run with
PAGEDSERVE_DECODER_STACK=0 for the per-kernel split of the Python layer loop, or
PAGEDSERVE_CPU_KERNELS=0 for the plain-PyTorch path.

    .venv/bin/python benchmarks/profile_step.py --batch 16 --context 200 --steps 30 [--model M --quantization w8a8]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from corpus import corpus_token_ids  # benchmarks/corpus.py (this folder is on sys.path)
from torch.profiler import ProfilerActivity, profile

import pagedserve.kernels
from pagedserve import LLM, SamplingParams
from pagedserve.model.layers.linear import Linear

MATMUL = {"aten::mm", "aten::addmm", "mkl::_mkl_linear"}
FUSED_ATTENTION = {"write_kv", "paged_decode_attention", "paged_prefill_attention"}
FUSED_SAMPLING = {"argmax_rows"}  # called by the sampler: inside "sampling", not the forward
FUSED_MATMUL = {"quant_linear", "FusedLinear"}  # FusedLinear: each linear layer's call into C++
ATTENTION = {"aten::index_select", "aten::index_copy_", "aten::bmm", "aten::_softmax", "aten::masked_fill_",
             "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::index", "aten::repeat_interleave"}


def _timed_call(fn, seconds: dict[str, float], name: str):
    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - t

    return timed


def _timed(obj, name: str, bucket: dict[str, float], key: str) -> None:
    setattr(obj, name, _timed_call(getattr(obj, name), bucket, key))


class _TimedKernels:
    """Stands in for the compiled kernel module; adds each call's wall time to `seconds[name]`."""

    def __init__(self, module, seconds: dict[str, float]) -> None:
        self._module, self._seconds = module, seconds

    def __getattr__(self, name: str):
        return _timed_call(getattr(self._module, name), self._seconds, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=200, help="prompt tokens per request")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quantization", default=None, help="e.g. int8, w8a8 (a float checkpoint)")
    args = ap.parse_args()

    fused_seconds: dict[str, float] = defaultdict(float)
    if (kernels := pagedserve.kernels.cpu_ops()) is not None:
        pagedserve.kernels._state["ops"] = _TimedKernels(kernels, fused_seconds)
    llm = LLM(args.model, max_num_seqs=args.batch, quantization=args.quantization)
    engine = llm.engine
    for module in engine.model.modules():  # the layers' C++ calls, as the Python loop makes them
        if isinstance(module, Linear) and module.fused_linear is not None:
            module.quant_method.fused = _timed_call(module.fused_linear, fused_seconds, "FusedLinear")
    ids = corpus_token_ids(llm.get_tokenizer())
    params = SamplingParams(temperature=0, max_tokens=args.steps + 20, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(None, {"prompt_token_ids": ids[i * 7:i * 7 + args.context]}, params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or \
            engine.scheduler.waiting:
        engine.step()
    for _ in range(3):
        engine.step()

    parts: dict[str, float] = defaultdict(float)
    _timed(engine.scheduler, "schedule", parts, "schedule")
    _timed(engine.runner, "prepare_inputs", parts, "prepare_inputs")
    _timed(engine.model, "forward", parts, "forward")
    _timed(engine.model, "compute_logits", parts, "lm_head")
    _timed(engine.runner.sampler, "sample", parts, "sampling")
    _timed(engine.scheduler, "update_from_output", parts, "update")
    _timed(engine.output_processor, "process_outputs", parts, "output")
    fused_seconds.clear()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        wall = time.perf_counter() - start
    parts = dict(parts)  # freeze: the unprofiled pass below must not add to it
    fused = dict(fused_seconds)
    # The profiler's own overhead inflates the wall time; a second, unprofiled pass gives the real figure.
    plain = time.perf_counter()
    for _ in range(10):
        engine.step()
    plain_step = (time.perf_counter() - plain) / 10

    ops: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        group = "matmul" if evt.key in MATMUL else "attention+kv" if evt.key in ATTENTION else "other kernels"
        ops[group] += evt.self_cpu_time_total / 1e6
    for name, seconds in fused.items():
        if name in FUSED_SAMPLING:
            continue
        group = "attention+kv" if name in FUSED_ATTENTION else "matmul" if name in FUSED_MATMUL else "other kernels"
        ops[group] += seconds
    n = args.steps
    forward = parts["forward"] + parts["lm_head"]
    kernels = sum(ops.values())
    if engine.model.stack is not None:  # one C++ call runs every layer: the wrappers see no kernel inside it
        forward_rows = [("embedding + decoder layers (C++ stack; PAGEDSERVE_DECODER_STACK=0 splits it by kernel)",
                         parts["forward"]), ("LM head", parts["lm_head"])]
    else:
        forward_rows = [
            ("matmuls (linear layers + LM head)", ops["matmul"]),
            ("attention + KV write/gather", ops["attention+kv"]),
            ("other kernels (norms, rotary, activations)", ops["other kernels"]),
            ("Python overhead inside the forward", max(0.0, forward - kernels)),
        ]
    rows = [
        *forward_rows,
        ("input preparation (slots, block tables)", parts["prepare_inputs"]),
        ("scheduling", parts["schedule"]),
        ("sampling", parts["sampling"]),
        ("scheduler update (append, stop checks, free blocks)", parts["update"]),
        ("output processing (detokenize, stop strings, outputs)", parts["output"]),
        ("the rest", wall - forward - sum(parts[k] for k in ("prepare_inputs", "schedule", "sampling", "update",
                                                              "output"))),
    ]
    print(f"batch={args.batch} context~{args.context}: {plain_step * 1000:.1f} ms/step unprofiled = "
          f"{args.batch / plain_step:.0f} tok/s; profiled {wall / n * 1000:.1f} ms/step")
    print("| part | ms/step (profiled) | share |\n| --- | ---: | ---: |")
    for name, seconds in rows:
        print(f"| {name} | {seconds / n * 1000:.1f} | {seconds / wall * 100:.0f}% |")
    if fused:
        print("fused kernels, ms/step: " + ", ".join(
            f"{name} {seconds / n * 1000:.1f}" for name, seconds in sorted(fused.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
