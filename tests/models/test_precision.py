"""bfloat16 models and device maps: every editor edits a bf16 tiny-gpt2 and restores it bit-exactly,
`--dtype` / `--device-map` reach `from_pretrained` and the config (only when set), peaks per CUDA device,
and the CUDA smoke check's CPU-side behaviour.

bfloat16 on CPU is about 10x slower than float32, so the edits are small (m = 8) and the hyper-networks
are meta-trained for 20 steps (enough to lift ES well above the pre-edit value on tiny-gpt2).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.core.config import RunConfig
from bench.core.measure import measure, per_device_fields
from bench.evaluation.metrics import evaluate
from bench.models import DTYPES, LoadContext, load_model
from bench.runner.run import UserError, resolve, run_one
from editors import EDITORS
from editors.base import Edit, EditorContext, add_delta_, model_defaults
from tasks.synthetic import SyntheticTask

# Short preparations: 20 meta-steps of 8 edits (selected on 16 held-out requests), MEMIT statistics
# over 1,024 of the world's sentences and 40 z steps; the rest is editors/hparams/<editor>/tiny-gpt2.json.
META = dict(rank=128, meta_lr=1e-3, train_edits=8, schedule="select", steps=20, val_every=20, n_val=16)
SHORT = {"malmen": {**META, "block": "official"}, "mend": META,
         "memit": dict(mom2_n_samples=1024, v_num_grad_steps=40),
         "alphaedit": dict(mom2_n_samples=1024, v_num_grad_steps=40), "ft": {}}


@pytest.fixture(scope="module")
def tiny_bf16(tiny_gpt2, results_cache):
    """tiny-gpt2 loaded in bfloat16 through the alias path (its float32 cache entry, then cast)."""
    return load_model(LoadContext("tiny-gpt2", results_dir=results_cache, dtype="bfloat16"))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _same(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(t, snap[n]) for n, t in model.state_dict().items())


def test_alias_loads_in_bfloat16_with_its_own_cache_key(tiny_bf16, tiny_gpt2):
    """Weights cast to bf16 (same values, rounded), key suffixed so checkpoints/statistics are not shared with fp32."""
    assert {p.dtype for p in tiny_bf16.model.parameters()} == {torch.bfloat16}
    assert tiny_bf16.key == f"{tiny_gpt2.key}@bfloat16" and tiny_bf16.info["model_key"] == tiny_bf16.key
    w32 = tiny_gpt2.model.transformer.h[0].mlp.c_proj.weight
    assert torch.equal(tiny_bf16.model.transformer.h[0].mlp.c_proj.weight, w32.to(torch.bfloat16))
    # tied embeddings stay tied after the cast
    assert tiny_bf16.model.lm_head.weight is tiny_bf16.model.transformer.wte.weight


@pytest.mark.parametrize("name", ["ft", "memit", "alphaedit", "malmen", "mend"])
def test_each_editor_edits_a_bfloat16_model_and_restores_it_bit_exactly(name, tiny_bf16, tmp_path):
    """ES clearly above pre-ES; float32 deltas; the bf16 weights bit-identical after prepare, edit and apply."""
    em = tiny_bf16
    task = SyntheticTask()
    requests = task.sample(8, 0)
    cls = EDITORS[name]
    hp = cls.hparams_cls(**{**model_defaults(name, "tiny-gpt2"), **SHORT[name]})
    ctx = EditorContext(results_dir=tmp_path, seed=0, model_key=em.key, task_key="synthetic", n_edits=8,
                        log=lambda s: None)
    before = _snapshot(em.model)
    editor = cls(em, hp, ctx)
    editor.prepare(task.train_split())
    edit = editor.edit(requests)
    edit.check_finite()
    assert _same(em.model, before), "prepare/edit left the weights changed"
    assert edit.deltas and all(d.dtype == torch.float32 for d in edit.deltas.values())
    pre = evaluate(em, requests).metrics
    with edit.applied(em.model):
        post = evaluate(em, requests).metrics
        assert not _same(em.model, before)
    assert _same(em.model, before), "Edit.applied did not restore the bf16 weights bit-exactly"
    assert post["es"] >= pre["es"] + 0.4, (name, pre["es"], post["es"])


def test_applied_rounds_once_and_restores_bf16_bit_exactly():
    """w + d is formed in float32 and rounded once; restoring copies the saved tensors (w + d - d != w in bf16)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64).to(torch.bfloat16)
    w = lin.weight.detach().clone()
    d = torch.randn(64, 64) * 3e-3  # float32, about the size of the bf16 spacing of the weights
    with Edit({"weight": d}).applied(lin):
        assert torch.equal(lin.weight, (w.float() + d).to(torch.bfloat16))
        twice = w + d.to(torch.bfloat16)  # rounding the delta first, then the sum, loses more
        assert not torch.equal(lin.weight, twice)
        assert not torch.equal((lin.weight - d.to(torch.bfloat16)), w)  # why the originals are kept
    assert torch.equal(lin.weight, w)
    p32 = torch.nn.Parameter(torch.ones(3))  # float32: exactly the in-place add
    add_delta_(p32, torch.full((3,), 0.5, dtype=torch.float64))
    assert p32.dtype == torch.float32 and torch.equal(p32.data, torch.full((3,), 1.5))


def test_dtype_and_device_map_enter_the_config_hash_only_when_set(tiny_gpt2):
    """Defaults add nothing (every stored row keeps its hash); bf16 and a device map make new configs."""
    base = dict(editor="ft", model="tiny-gpt2", task="synthetic", n_edits=8, device="cpu")
    default = resolve(RunConfig(**base))
    assert "dtype" not in default.config and "device_map" not in default.config
    assert resolve(RunConfig(**base, dtype="float32")).config_hash == default.config_hash
    bf16 = resolve(RunConfig(**base, dtype="bfloat16"))
    assert bf16.config["dtype"] == "bfloat16" and bf16.config_hash != default.config_hash
    assert set(DTYPES) == {"float32", "bfloat16", "float16"}


@pytest.mark.parametrize("fields, match", [
    (dict(dtype="float8"), "unknown --dtype 'float8'; choices: float32, bfloat16, float16"),
    (dict(device_map="gpus"), "unknown --device-map 'gpus'"),
    (dict(device_map="auto"), "built-in model 'tiny-gpt2' fits on one device"),
])
def test_bad_dtype_or_device_map_is_refused_before_loading(fields, match):
    with pytest.raises(UserError, match=match):
        resolve(RunConfig(editor="ft", model="tiny-gpt2", task="synthetic", n_edits=8, device="cpu", **fields))


def test_bf16_run_through_the_harness_records_dtype(tiny_gpt2, results_cache, tmp_path):
    """`bench run --dtype bfloat16` path: the row's config names the dtype, the edit works, model key is bf16's."""
    row = run_one(editor="ft", model="tiny-gpt2", task="synthetic", n_edits=8, device="cpu", dtype="bfloat16",
                  results=tmp_path, cache_dir=results_cache, log=lambda s: None)
    assert row["status"] == "ok" and row["config"]["dtype"] == "bfloat16"
    assert row["info"]["model"]["dtype"] == "bfloat16" and row["info"]["model"]["model_key"].endswith("@bfloat16")
    assert row["metrics"]["es"] >= row["metrics"]["pre_es"] + 0.5
    assert "peak_mem_per_device" not in row  # CPU rows keep their fields


@pytest.fixture
def gpt2_folder(tiny_gpt2, tmp_path):
    """A small random GPT-2 saved as a model folder, with tiny-gpt2's tokenizer (reads the synthetic world)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = tiny_gpt2.tokenizer
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id))
    folder = tmp_path / "gpt2-random"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _spy_from_pretrained(monkeypatch) -> tuple[list[dict], list[object]]:
    """Record the kwargs of AutoModelForCausalLM.from_pretrained and every `.to` on a GPT-2, calling through."""
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    calls: list[dict] = []
    moves: list[object] = []
    real = AutoModelForCausalLM.from_pretrained.__func__
    real_to = GPT2LMHeadModel.to

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return real(cls, *args, **kwargs)

    def to(self, *args, **kwargs):
        moves.append(args or kwargs)
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    monkeypatch.setattr(GPT2LMHeadModel, "to", to)
    return calls, moves


def test_cli_device_map_and_dtype_reach_from_pretrained(gpt2_folder, tmp_path, monkeypatch):
    """`bench run --dtype bfloat16 --device-map cpu` on a folder: from_pretrained gets both, no `.to` moves it after."""
    from typer.testing import CliRunner

    from bench.cli import app

    calls, moves = _spy_from_pretrained(monkeypatch)
    res = CliRunner().invoke(app, ["run", "--editor", "ft", "--model", str(gpt2_folder), "--task", "synthetic",
                                   "--edits", "8", "--device", "cpu", "--dtype", "bfloat16", "--device-map", "cpu",
                                   "--results", str(tmp_path / "res"), "--json"])
    assert res.exit_code == 0, res.output
    assert len(calls) == 1 and calls[0]["device_map"] == "cpu" and calls[0]["dtype"] is torch.bfloat16
    assert moves == []  # the device map placed the weights; load_model did not move them again
    row = json.loads(res.stdout.strip().splitlines()[-1])
    assert row["config"]["device_map"] == "cpu" and row["config"]["dtype"] == "bfloat16"


def test_without_device_map_the_folder_model_is_moved_and_float32_by_default(gpt2_folder, tmp_path, monkeypatch):
    """The control: no device map -> no device_map kwarg, float32, and load_model moves the model to --device."""
    calls, moves = _spy_from_pretrained(monkeypatch)
    em = load_model(LoadContext(str(gpt2_folder), tmp_path, device="cpu"))
    assert "device_map" not in calls[0] and calls[0]["dtype"] is torch.float32
    assert moves == [("cpu",)] and next(em.model.parameters()).dtype == torch.float32


def test_peaks_are_recorded_per_cuda_device(monkeypatch):
    """On CUDA, each device of the model gets its peak above its own baseline; the total is their sum."""
    allocated = {0: 100, 1: 1000}
    peak = {0: 0, 1: 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: allocated[d.index])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: peak.update({d.index: allocated[d.index]}))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: peak[d.index])
    devices = [torch.device("cuda", 1), torch.device("cuda", 0), torch.device("cuda", 1)]
    with measure(devices) as st:
        peak[0], peak[1] = 150, 1300  # what the phase allocated at most on each
    assert st.mem_kind == "cuda_max_allocated"
    assert st.per_device == {"cuda:0": 50, "cuda:1": 300} and st.peak_bytes == 350
    assert per_device_fields(st, st) == {"peak_mem_per_device": {"prepare": st.per_device, "edit": st.per_device}}
    with measure(torch.device("cpu")) as cpu:
        pass
    assert cpu.per_device == {} and per_device_fields(cpu, cpu) == {}


def test_cuda_smoke_without_cuda_says_so_and_runs_nothing(tmp_path, capsys):
    from bench.diagnostics.cuda_smoke import NO_CUDA_EXIT, main

    if torch.cuda.is_available():
        pytest.skip("this checks the CPU-only behaviour; on a CUDA machine run `nox -s cuda_smoke`")
    assert main(["--out", str(tmp_path / "out")]) == NO_CUDA_EXIT
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cuda_smoke_builds_gpt2_small_by_its_default_config():
    """`GPT2Config()` defaults: 12 blocks, 768 wide, 50,257 words, 124M parameters (built on the meta device: free)."""
    from bench.diagnostics.cuda_smoke import build_gpt2_small

    model = build_gpt2_small(device="meta")
    c = model.config
    assert (c.n_layer, c.n_embd, c.n_head, c.vocab_size, c.n_positions) == (12, 768, 12, 50257, 1024)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808


def test_cuda_smoke_cells_run_through_the_harness(tiny_gpt2, results_cache, tmp_path):
    """The smoke check's loop on CPU (one bf16 cell): a stored row, a table line and the JSON it writes."""
    from bench.diagnostics.cuda_smoke import cells, run

    assert len(cells(["tiny-gpt2", "gpt2-small-random"], ["float32", "bfloat16"],
                     ["malmen", "mend", "memit", "ft"], [16, 256])) == 32
    out = tmp_path / "out"
    out.mkdir()
    assert run(out, Path(results_cache), 600, ["tiny-gpt2"], ["bfloat16"], ["ft"], [8], device="cpu") == 0
    got = json.loads((out / "cuda_smoke.json").read_text())
    assert [(r["model_label"], r["dtype"], r["editor"], r["m"], r["status"]) for r in got] == [
        ("tiny-gpt2", "bfloat16", "ft", 8, "ok")]
    table = (out / "cuda_smoke.md").read_text()
    assert "not a CUDA measurement" in table and "| tiny-gpt2 | bfloat16 | ft | 8 |" in table
