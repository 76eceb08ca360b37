"""How many transformer blocks a model has, found without loading it (for checks of `last_n` and block indices).

Built-in aliases: from the configs their loaders use (the tiny models) or the shipped checkpoint's
known shape. A local folder or a Hugging Face id already in the local cache: from its config.json.
Anything else (an id not downloaded yet): None, and the value is not checked before the load.
Encoder-decoder models count the blocks of both stacks, as `EditableModel.module_names`' `last_n` does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _tiny_gpt2() -> int:
    from bench.zoo.tiny import TinyModelConfig

    return TinyModelConfig().n_layer


def _tiny_bert() -> int:
    from bench.zoo.classifier import TinyBertConfig

    return TinyBertConfig().layers


def _tiny_t5() -> int:
    from bench.zoo.tiny_t5 import TinyT5ModelConfig

    c = TinyT5ModelConfig()
    return c.num_layers + c.num_decoder_layers


ALIAS_DEPTHS: dict[str, Callable[[], int]] = {
    "tiny-gpt2": _tiny_gpt2,
    "tiny-bert": _tiny_bert,
    "tiny-t5": _tiny_t5,
    "smollm2-135m": lambda: 30,  # SmolLM2-135M: 30 Llama blocks
    "minilm-fever": lambda: 6,  # all-MiniLM-L6-v2: 6 BERT layers
}


def config_depth(config: dict[str, Any]) -> int | None:
    """Blocks of a transformers config.json (both stacks of an encoder-decoder), or None if it does not say."""
    n = next((config[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(config.get(k), int)), None)
    if n is None:
        return None
    if config.get("is_encoder_decoder"):
        dec = config.get("num_decoder_layers")
        return n + (dec if isinstance(dec, int) else n)
    return n


def model_depth(name: str) -> int | None:
    """The number of blocks of model `name` (alias, folder or cached hub id), or None when unknown before loading."""
    if name in ALIAS_DEPTHS:
        return ALIAS_DEPTHS[name]()
    from bench.models import MODEL_ALIASES, hf_snapshot

    if name in MODEL_ALIASES:  # an alias added without a depth here: not checked before the load
        return None
    path = Path(name)
    folder = path if path.is_dir() else hf_snapshot(name)
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        return config_depth(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError):
        return None


def loaded_depth(em: Any) -> int:
    """The number of blocks of a loaded EditableModel (both stacks of an encoder-decoder)."""
    return em.n_layers + (em.n_decoder_layers if em.is_seq2seq else 0)
