"""Tools beside the benchmark: key geometry (`bench keys`), hyper-parameter tuning on training splits
(`python -m bench.diagnostics.tune`, `tune_heldout`, `tune_memit`) and the CUDA smoke check."""
