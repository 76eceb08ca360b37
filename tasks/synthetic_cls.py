"""`synthetic-cls`: FEVER-shaped true/false claims about the generated fact world, for fast tests.

Claims are the synthetic world's prompts completed by a value ("Brakou lives in Paris."): with
the fact's true value the gold label is SUPPORTS, with its counterfactual value REFUTES. Each
edit request states one fact (true or counterfactual value, chosen by a fixed per-fact coin),
asks for the opposite label (as `fever` does), rephrases it with the world's other templates and
carries a claim about a never-edited locality entity with its gold label. The `tiny-bert` model
(`bench.zoo.classifier`) is trained on the claims of `classifier_split()`, which covers every fact of
the world (like the paper's classifier, which saw the edit claims during fine-tuning).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

from tasks.base import EditRequest, Task, register_task
from tasks.fever import LABELS, ClassifierSplit, flip
from tasks.synthetic import SyntheticConfig, World, build_world


@dataclass
class SyntheticClsConfig(SyntheticConfig):
    """A smaller world than `synthetic`'s, so that a tiny BERT memorises it in seconds."""

    n_entities: int = 24  # 96 edit facts: 48 meta-training and 48 evaluation requests
    n_locality_entities: int = 12
    n_values: int = 16  # the listed values only: the classifier's world predates n_values and keeps its size
    n_countries: int = 0  # its locality claims are about the locality people (below), so no countries
    locality: str = "neighbours"


def claim(world: World, i: int, template: int, value: str) -> str:
    """Fact `i` in template `template`, completed by `value`, as a sentence."""
    prompt, _ = world.render(world.facts[i], template)
    return f"{prompt} {value}."


@register_task("synthetic-cls")
class SyntheticClsTask(Task):
    """Flip SUPPORTS/REFUTES on claims about generated facts (see the module docstring)."""

    kind = "cls"
    labels = LABELS
    config_cls = SyntheticClsConfig

    def __init__(self, config: SyntheticClsConfig | None = None):
        super().__init__(config)
        if self.config.data or self.config.train_data:
            raise ValueError("task 'synthetic-cls' generates its own data; --data/--train-data do not apply")
        self.data_info = {"source": "generated", **self.config.world_key(),
                          "gs_source": "other templates of the synthetic world",
                          "ls_source": "claims about never-edited locality entities, gold labels"}

    @cached_property
    def world(self) -> World:
        return build_world(self.config)

    def _stated(self, i: int) -> tuple[str, str]:
        """(value stated by the edit/locality claim of fact `i`, its gold label), by a fixed coin."""
        w = self.world
        if random.Random(f"{w.seed}:cls:{i}").random() < 0.5:
            return w.facts[i].value, LABELS[0]
        return w.counterfactual(i), LABELS[1]

    def _request(self, i: int, loc: int) -> EditRequest:
        w = self.world
        value, gold = self._stated(i)
        lvalue, lgold = self._stated(loc)
        n_t = len(w.templates[w.facts[i].relation])
        return EditRequest(prompt=claim(w, i, 0, value), target=flip(gold),
                           rephrases=tuple(claim(w, i, k, value) for k in range(1, n_t)),
                           locality_prompt=claim(w, loc, 0, lvalue), locality_answer=lgold,
                           subject=w.facts[i].entity)

    def _requests(self, split: str) -> list[EditRequest]:
        w = self.world
        idx = w.train_idx if split == "train" else w.eval_idx
        half = len(w.locality_idx) // 2
        pool = w.locality_idx[:half] if split == "train" else w.locality_idx[half:]
        return [self._request(i, pool[j % len(pool)]) for j, i in enumerate(idx)]

    def train_split(self) -> list[EditRequest]:
        return self._requests("train")

    def eval_split(self) -> list[EditRequest]:
        return self._requests("eval")

    def classifier_split(self) -> ClassifierSplit:
        """Every fact in every template, with its true and its counterfactual value (train); the
        template-0 claims again (val: the claims edits start from, so this measures memorisation)."""
        w = self.world
        train: list[tuple[str, str]] = []
        val: list[tuple[str, str]] = []
        for i, f in enumerate(w.facts):
            for k in range(len(w.templates[f.relation])):
                train += [(claim(w, i, k, f.value), LABELS[0]), (claim(w, i, k, w.counterfactual(i)), LABELS[1])]
            val += [(claim(w, i, 0, f.value), LABELS[0]), (claim(w, i, 0, w.counterfactual(i)), LABELS[1])]
        return ClassifierSplit(train=train, val=val)
