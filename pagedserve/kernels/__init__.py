"""Fused CPU kernels, compiled on first use with the machine's own compiler into one extension:
cpu_ops.cpp (attention, norms, rotary, SiLU, argmax), quant_linear.cpp (matmuls on packed weights:
GGUF blocks, int8, int8 x int8; its SIMD level, simd.h, follows the build target) and decoder_stack.cpp
(a whole step's layers in one call, and the linear layers' path choice).

The build takes ~25 s once per machine and is cached by torch under
~/.cache/torch_extensions (or $TORCH_EXTENSIONS_DIR). `-march=native` is safe because the build
happens on the machine that runs it, and it is how the kernels' paths are chosen for the CPU at hand
(AVX-512, VNNI, AVX2, or plain C++ elsewhere); the CPU's feature flags are part of the build's identity so a
shared cache never hands one CPU another's binary. Without a compiler, or with
EngineConfig.cpu_kernels off (PAGEDSERVE_CPU_KERNELS=0), the engine keeps the plain-PyTorch path
(same results, slower).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(name) for name in ("cpu_ops.cpp", "quant_linear.cpp", "decoder_stack.cpp")]
_state: dict[str, ModuleType | None] = {}


def _cpu_signature() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = "unknown"
    return hashlib.sha1(flags.encode()).hexdigest()[:12]


def build_target() -> str:
    """The -march the kernels are built for: the machine's own, or $PAGEDSERVE_CPU_ARCH (e.g. haswell,
    an AVX2-only x86-64, which the tests use to prove the AVX2 code on an AVX-512 machine)."""
    return os.environ.get("PAGEDSERVE_CPU_ARCH", "native")


def cpu_ops() -> ModuleType | None:
    """The compiled module, or None when the build failed (logged once)."""
    if "ops" in _state:
        return _state["ops"]
    ops = None
    arch = build_target()
    name = "pagedserve_cpu_ops" if arch == "native" else f"pagedserve_cpu_ops_{arch.replace('-', '_')}"
    # torch's builder calls `ninja`; the venv's copy is on PATH only when the venv is activated.
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    try:
        from torch.utils.cpp_extension import load

        ops = load(name=name, sources=[str(p) for p in _SOURCES],
                   extra_cflags=["-O3", f"-march={arch}", "-fno-math-errno", "-ffp-contract=off", "-fopenmp",
                                 f"-DPAGEDSERVE_CPU_SIGNATURE={_cpu_signature()}"],
                   extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no headers, ...: fall back, but say why
        logger.warning("pagedserve CPU kernels unavailable, using the PyTorch path: %s", exc)
    _state["ops"] = ops
    return ops
