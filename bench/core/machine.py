"""Which machine and which numerical code paths a run used (recorded in every row's `env`).

Two CPUs of the same model name can run different kernels: torch dispatches its vectorised code by
the widest instruction set it finds (AVX2 or AVX512), and MKL picks its own kernels at run time. The
same training run then differs in its last bits, and hundreds of optimiser steps amplify that into a
different model. The variables in `NUMERIC_ENV` pin those choices; CI and the tests set them (see
docs/reproducibility.md) and every row records what was in force.
"""

from __future__ import annotations

import os
import platform
import re
from functools import cache
from typing import Any

# The code-path switches of torch (ATen), MKL and oneDNN, and the thread counts of OpenMP / MKL.
NUMERIC_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# What CI and the tests pin: the AVX2 kernels, which every x86-64 machine of the project's kind has
# (some have AVX512 on top), and MKL's conditional numerical reproducibility in strict mode. They must
# be in the environment before torch first dispatches a kernel, hence `pin_numeric_env` and the shell
# form `eval "$(python -m bench.core.machine)"`. torch is imported lazily so both work before it loads.
PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin_numeric_env() -> None:
    """Set `PINNED_ENV` in this process's environment where the user has not chosen otherwise."""
    for k, v in PINNED_ENV.items():
        os.environ.setdefault(k, v)


@cache
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@cache
def cpu_flags() -> tuple[str, ...]:
    """The vector instruction sets the CPU reports (avx2, avx512f, ...), for telling machines apart."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return tuple(sorted(f for f in line.split(":", 1)[1].split() if re.match(r"(avx|fma|amx)", f)))
    except OSError:
        pass
    return ()


@cache
def math_libraries() -> dict[str, str]:
    """BLAS/LAPACK and the MKL / oneDNN builds torch was compiled with (parsed from torch.__config__)."""
    import torch

    text = torch.__config__.show()
    out: dict[str, str] = {}
    for key in ("BLAS_INFO", "LAPACK_INFO"):
        if m := re.search(rf"{key}=([^,\s]+)", text):
            out[key.lower()] = m.group(1)
    if m := re.search(r"Math Kernel Library Version ([^\s]+)", text):
        out["mkl"] = m.group(1)
    if m := re.search(r"MKL-DNN v([^\s]+)", text):
        out["onednn"] = m.group(1)
    if m := re.search(r"OpenBLAS ([^\s]+)", text):
        out["openblas"] = m.group(1)
    return out


def cpu_env() -> dict[str, Any]:
    """CPU model, instruction sets, the kernels torch dispatches to, math libraries and pinning variables."""
    import torch

    return {
        "model": cpu_model(),
        "cores": os.cpu_count(),
        "flags": list(cpu_flags()),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "math": math_libraries(),
        "numeric_env": {k: os.environ[k] for k in NUMERIC_ENV if k in os.environ},
    }


if __name__ == "__main__":  # `eval "$(python -m bench.core.machine)"`: the pinned variables as shell exports
    print("export " + " ".join(f"{k}={v}" for k, v in PINNED_ENV.items()))
