"""Built-in models are the same bits on every x86-64 machine (bench/models/pinned.py, docs/reproducibility.md).

Each is trained on first use in a child process under the pinned kernels and one thread, whatever the
run's own setting, and its weights' sha256 must equal the one recorded in
`bench/models/reference_sha256.json`. tiny-bert is retrained here from scratch, in a fresh cache, by a
process that runs the machine's default kernels (AVX512 where the CPU has it: the case that used to
give other weights). The others are checked through the shared cache of the test session, which a
fresh clone (CI) fills from scratch; the sidecar says the weights were trained under the pinned numerics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.core.machine import PINNED_ENV
from bench.models import MODEL_ALIASES, LoadContext, load_model
from bench.models.pinned import NUMERICS, REFERENCE_FILE, reference_sha256, state_sha256

REPO = Path(__file__).resolve().parents[2]


def test_the_reference_names_every_built_in_model():
    recorded = json.loads(REFERENCE_FILE.read_text())["sha256"]
    assert set(recorded) == set(MODEL_ALIASES)
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in recorded.values())


def test_state_digest_sees_every_bit():
    import torch

    m = torch.nn.Linear(3, 2)
    before = state_sha256(m)
    with torch.no_grad():
        m.weight.view(-1)[0] = torch.nextafter(m.weight.view(-1)[0], torch.tensor(1.0))  # one ulp
    assert state_sha256(m) != before


def test_tiny_bert_retrained_in_a_fresh_cache_by_an_unpinned_process_matches_the_reference(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in PINNED_ENV and k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    code = ("import json, torch; from bench.models import LoadContext, load_model; "
            f"em = load_model(LoadContext('tiny-bert', results_dir={str(tmp_path)!r}, task_kind='cls')); "
            "print(json.dumps([torch.backends.cpu.get_cpu_capability(), em.info['weights_sha256'], "
            "em.info['classifier_cached']]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    capability, digest, cached = json.loads(out.stdout.strip().splitlines()[-1])
    assert cached is False  # trained here, from scratch
    assert digest == reference_sha256("tiny-bert"), f"trained under {capability} kernels in the parent"
    sidecar = json.loads(next(tmp_path.glob("models/tiny-bert-*/classifier.json")).read_text())
    assert sidecar["weights_sha256"] == digest and sidecar["numerics"] == NUMERICS


@pytest.mark.slow
@pytest.mark.prebuilt("tiny-t5", "minilm-fever", "smollm2-135m")
@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-t5", "minilm-fever", "smollm2-135m"])
def test_built_in_model_matches_its_reference(alias, results_cache):
    """Loaded (trained from scratch in a fresh clone) through the shared cache, as every run loads it."""
    if not MODEL_ALIASES[alias].installed():
        pytest.fail(f"{alias}: its package is not installed; the README's install command installs it")
    em = load_model(LoadContext(alias, results_dir=results_cache, task_kind=MODEL_ALIASES[alias].kind))
    assert em.info["weights_sha256"] == reference_sha256(alias) and em.info["weights_reference"] is True
    sidecars = [p for p in MODEL_ALIASES[alias].folder(results_cache).glob("*.json")
                if p.name in ("tiny.json", "classifier.json")]
    for sidecar in sidecars:  # trained models: trained under the pinned numerics, digest recorded then
        record = json.loads(sidecar.read_text())
        assert record["weights_sha256"] == em.info["weights_sha256"] and record["numerics"] == NUMERICS
    assert sidecars or alias == "smollm2-135m"  # converted, not trained
