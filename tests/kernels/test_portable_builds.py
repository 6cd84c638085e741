"""The kernels built for CPUs other than this one: an AVX2-only x86-64 (haswell), AVX2 with AVX-VNNI
(alderlake, where this CPU can run it) and the baseline x86-64 (plain C++ paths). Each build runs in a
subprocess and must give the native build's results bit for bit (every SIMD level does the same per-lane operations in the same order) and the PyTorch
results within float tolerance (checked inside the subprocess), so CI on an AVX-512 machine still
proves the AVX2 and fallback code. Each build compiles the extension once (about a minute)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pagedserve.kernels import cpu_ops
from tests.kernels import kernel_outputs

ops = cpu_ops()
ROOT = Path(__file__).resolve().parents[2]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64" or ops is None, reason="x86-64 targets, built with the native compiler")
@pytest.mark.parametrize(("arch", "levels"), [("haswell", {"avx2/avx2"}), ("alderlake", {"avx2/avx_vnni"}),
                                              ("x86-64", {"generic/generic"})])
def test_build_for_another_cpu_gives_the_native_results(arch, levels, tmp_path, tiny_llama_dir):
    if arch == "alderlake" and "avx_vnni" not in _cpu_flags():
        pytest.skip("this CPU has no AVX-VNNI to run an alderlake build on")
    out = tmp_path / "outputs.pt"
    env = {**os.environ, "PAGEDSERVE_CPU_ARCH": arch, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.kernel_outputs", str(out), str(tiny_llama_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    theirs = torch.load(out)
    assert theirs.pop("levels") in levels
    ours = kernel_outputs.compute(ops)
    ours["tokens"] = kernel_outputs.greedy_tokens(str(tiny_llama_dir))
    assert set(theirs) == set(ours)
    for key, value in ours.items():
        assert torch.equal(theirs[key], value), key


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="no aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu)")
@pytest.mark.parametrize("source", ["cpu_ops.cpp", "quant_linear.cpp", "decoder_stack.cpp"])
def test_kernels_compile_for_arm(source, tmp_path):
    """The plain C++ paths are what an ARM machine builds: each source compiles to an aarch64 object
    with torch's flags (no x86 intrinsic or assembly is reached)."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    cmd = ["aarch64-linux-gnu-g++", "-std=c++20", "-O1", "-march=armv8.2-a", "-fopenmp", "-fno-math-errno",
           "-ffp-contract=off", "-DTORCH_EXTENSION_NAME=pagedserve_cpu_ops", *includes, "-c",
           str(ROOT / "pagedserve" / "kernels" / source), "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
