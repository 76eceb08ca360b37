"""The built-in models (tiny-gpt2, tiny-t5, tiny-bert, minilm-fever, the embedded SmolLM2): trained or
converted on first use and cached. `bench.models.MODEL_ALIASES` names their loaders as lazy
"module:function" strings; they sit above `bench.evaluation`, which scores the trained tiny models."""
