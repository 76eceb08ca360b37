"""Rows say which machine and which numerical code paths ran them; the tests run CI's pinned kernels."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from bench.core.machine import PINNED_ENV, cpu_env, cpu_flags, math_libraries
from bench.runner.provenance import environment


def test_rows_record_cpu_model_instruction_sets_and_math_libraries():
    env = environment(torch.device("cpu"))
    cpu = env["cpu"]
    assert cpu["model"] and env["device"] == f"cpu: {cpu['model']}" and env["device"] != "cpu: cpu"
    assert cpu["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert cpu["math"].get("blas_info"), cpu["math"]  # e.g. mkl, openblas
    if cpu["math"]["blas_info"] == "mkl":
        assert cpu["math"].get("mkl"), cpu["math"]
    assert cpu["numeric_env"] == {k: os.environ[k] for k in cpu["numeric_env"]}


def test_the_tests_run_the_pinned_kernels():
    """tests/conftest.py pins the code paths before torch loads, as .ci/run does for the smoke sweep."""
    for k, v in PINNED_ENV.items():
        assert os.environ.get(k) == v, k
    if "avx2" in cpu_flags():
        assert torch.backends.cpu.get_cpu_capability() == "AVX2"
    assert cpu_env()["numeric_env"]["MKL_CBWR"] == PINNED_ENV["MKL_CBWR"]


def test_shell_exports_match_the_python_constants():
    out = subprocess.run([sys.executable, "-m", "bench.core.machine"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "export " + " ".join(f"{k}={v}" for k, v in PINNED_ENV.items())
    assert isinstance(math_libraries(), dict)
