"""The offline comparison: one workload through this engine under each policy (and each prefix-caching
and speculative-decoding setting asked for; a fresh engine each, same other options) and optionally
through HF transformers, then one report for all of them.
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from pathlib import Path

from pagedserve.bench.metrics import SLO
from pagedserve.bench.records import RunResult
from pagedserve.bench.report import write_report
from pagedserve.bench.workloads import Workload, save_jsonl
from pagedserve.config import POLICIES
from pagedserve.spec_decode.config import SpeculativeConfig

BASELINES = ("hf",)


# One engine run per entry of `speculative`: KEEP runs as the engine options say; None runs without.
KEEP = "keep"


def spec_label(config: SpeculativeConfig | None) -> str:
    """spec-off, spec-ngram-k4, spec-layer_skip-m24-k4, spec-draft_model-k4."""
    if config is None:
        return "spec-off"
    extra = f"-m{config.num_draft_layers}" if config.method == "layer_skip" else ""
    return f"spec-{config.method}{extra}-k{config.num_speculative_tokens}"


def engine_system(policy: str, prefix_caching: bool | None = None,
                  speculative: SpeculativeConfig | None | str = KEEP) -> str:
    """The system's name: pagedserve-<policy>, with -prefix-on/-off and -spec-... when the run compares settings."""
    suffix = "" if prefix_caching is None else f"-prefix-{'on' if prefix_caching else 'off'}"
    if speculative != KEEP:
        suffix += "-" + spec_label(speculative)
    return f"pagedserve-{policy}{suffix}"


def parse_speculative_list(value: str | list | None) -> list[SpeculativeConfig | None]:
    """A JSON list of speculative configs, `null` (or "off") for plain decoding: one engine run each."""
    import json

    items = json.loads(value) if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError("speculative configs must be a non-empty JSON list, e.g. "
                         "'[null, {\"method\": \"ngram\", \"num_speculative_tokens\": 4}]'")
    configs = [None if item in (None, "off") else SpeculativeConfig.parse(item) for item in items]
    labels = [spec_label(c) for c in configs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"speculative configs must differ in method, num_speculative_tokens or "
                         f"num_draft_layers (their systems would share a name): {labels}")
    return configs


def run_offline(workload: Workload, model: str, engine_options: dict, policies: Sequence[str] = ("continuous", "static"),
                baselines: Sequence[str] = (), hf_batch_size: int = 16, out_dir: str | Path = "bench-results/latest",
                slo: SLO | None = None, progress: bool = True, command: str | None = None,
                prefix_caching: Sequence[bool | None] = (None,),
                speculative: Sequence[SpeculativeConfig | None | str] = (KEEP,)) -> dict:
    """Run every system on `workload` and write the report; returns the results dict (as in results.json).

    Each policy runs once per `prefix_caching` setting (None: as `engine_options` say, unnamed) and per
    `speculative` config (KEEP: as `engine_options` say, unnamed; None: plain decoding).

    A system that fails is reported and skipped, so one broken baseline doesn't discard the others' runs.
    """
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise ValueError(f"policy must be among {POLICIES}, got {bad}")
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise ValueError(f"baseline must be among {BASELINES}, got {bad}")
    if not policies and not baselines:
        raise ValueError("nothing to run: give at least one policy or baseline")
    options = {k: v for k, v in engine_options.items() if k != "policy"}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_jsonl(workload, out / "workload.jsonl")  # so any other system can be given the identical work

    runs: list[RunResult] = []
    failures: list[str] = []

    def attempt(name: str, fn) -> None:
        try:
            runs.append(fn())
        except Exception as e:  # noqa: BLE001 - keep the other systems' measurements
            traceback.print_exc()
            failures.append(f"{name}: {type(e).__name__}: {e}")

    if not prefix_caching:
        raise ValueError("prefix_caching: give at least one setting (None: the engine options' own)")
    if not speculative:
        raise ValueError("speculative: give at least one setting (KEEP: the engine options' own)")
    for policy in policies:
        from pagedserve.bench.runners.engine import run_engine

        for caching in prefix_caching:
            for spec in speculative:
                opts = options if caching is None else {**options, "enable_prefix_caching": caching}
                if spec != KEEP:
                    opts = {**opts, "speculative_config": spec}
                name = engine_system(policy, caching, spec)
                attempt(name, lambda p=policy, o=opts, n=name: run_engine(workload, model, p, o, progress, system=n))
    if "hf" in baselines:
        from pagedserve.bench.runners.hf import run_hf

        attempt("hf", lambda: run_hf(workload, model, hf_batch_size, int(options.get("block_size") or 16), progress))
    if not runs:
        raise RuntimeError("every system failed: " + "; ".join(failures))
    return write_report(out, workload, runs, slo, command=command, notes=[f"not measured — {f}" for f in failures])
