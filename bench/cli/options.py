"""Command-line options that `bench run` and `bench sweep` share, declared once (options whose help differs
between the two commands stay with their command)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

BatchesOpt = Annotated[str, typer.Option(help="disjoint batches of --edits, each edited from the unedited model; "
                                              "'all': every full batch of the pool (the official MALMEN protocol)")]
GenerationOpt = Annotated[bool, typer.Option("--generation/--no-generation",
                                             help="es_gen/gs_gen/ls_gen: greedy decoding from the prompt")]
CfScoresOpt = Annotated[bool, typer.Option("--cf-scores/--no-cf-scores",
                                           help="CounterFact's probability scores (records with target_true)")]
FluencyOpt = Annotated[bool, typer.Option("--fluency/--no-fluency",
                                          help="ROME's Generation Entropy (records with generation prompts; "
                                               "100 sampled tokens each, so off by default)")]
LogSamplesOpt = Annotated[bool, typer.Option(help="per-probe records in <results>/samples/<run_id>.jsonl")]
SequentialOpt = Annotated[int, typer.Option(help="lifelong editing: T batches of --edits applied one after another "
                                                 "without restoring; the row stores ES/GS/LS after each (0: off)")]
ModelOpt = Annotated[str, typer.Option(help="embedded alias, Hugging Face id or local folder")]
TaskOpt = Annotated[str, typer.Option(help="task name")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda")]
DtypeOpt = Annotated[str, typer.Option(help="the model's weights: float32, bfloat16 or float16")]
CacheDirOpt = Annotated[Path | None, typer.Option(help="cache for models/checkpoints/stats (default: --results)")]
DataOpt = Annotated[Path | None, typer.Option(help="your own evaluation data file (JSON or JSONL)")]
TrainDataOpt = Annotated[Path | None, typer.Option(help="your own meta-training data file")]
SkipBadOpt = Annotated[bool, typer.Option(help="skip malformed records (counted in the row)")]
