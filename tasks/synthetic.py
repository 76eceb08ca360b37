"""A generated fact world: made-up entities, four relations, paraphrase templates, counterfactual edits.

The world is fixed by `world_seed` alone (never by the run seed), so the tiny GPT-2 trained on it
(`bench/zoo/tiny.py`) and every run agree on what is true. Each entity has one value per relation.
Entities are of two kinds:

- *edit entities*: their facts are split, by fact, into a train split (meta-training) and an
  eval split (the benchmark's edits);
- *locality entities*: people whose facts are never edited; with `locality=neighbours` they are the
  probes (other people asked the same four relations, with the same answer vocabularies as the edit
  targets: the neighbourhood probes of CounterFact, harder than MALMEN's);
- *countries*: made-up countries with a capital and a continent, never edited; by default
  (`locality=unrelated`) their facts are the unrelated probes, as Natural Questions are for zsRE in
  MALMEN and MEND: other subjects, other relations, other answers.

Why two kinds of probe: MALMEN's LS is defined on unrelated questions, and with four relations a
batch of 64 edits touches every relation, so every neighbour probe shares a relation and its answer
vocabulary with some edit. The neighbour score is kept as the harder, CounterFact-style measure.
Both modes probe facts that no batch ever edits.

Why 128 values per person relation (`n_values`; the 16 listed words plus 112 made-up ones): with
16 values, 40 people share each answer and a model needs to carry only "which of 16" to the last
prompt token, so the keys the editors write to name the answer, not the person: editing one
person's city moved every person who lived there (measured on tiny-gpt2, MEMIT m = 64: 127 of 129
broken neighbour facts flipped to an edit's target; both models trained the full schedule). zsRE's
answers are nearly all distinct; with 128 values about 5 people share an answer, and the same MEMIT
edit breaks 21 of 512 neighbour facts (README, "tiny-gpt2"). `n_values=16` gives the previous
world's facts (and its world key).

An edit request takes template 0 of a fact as the edit prompt, the other templates as
rephrases, a counterfactual value (deterministic, whose first word differs from the true
value's, so that the true value does not already score the first answer token) as the target,
and a probe fact (template 0) with its true value as the locality prompt.
Four listed values per relation are two words long and share their first word in pairs ("New York",
"New Delhi"), so multi-token answers are exercised and the second word is not implied by the first.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from tasks.base import EditRequest, Task, TaskConfig, register_task, split_indices

# relation -> templates with a `{s}` subject slot; template 0 is the edit prompt.
TEMPLATES: dict[str, list[str]] = {
    "lives_in": [
        "{s} lives in",
        "{s} is a resident of",
        "The home of {s} is in",
        "Where does {s} live? In",
    ],
    "works_as": [
        "{s} works as",
        "{s} earns a living as",
        "By profession, {s} is",
        "What is the job of {s}? The job is",
    ],
    "speaks": [
        "{s} speaks",
        "The native language of {s} is",
        "{s} is fluent in",
        "Which language does {s} speak? It is",
    ],
    "plays": [
        "{s} plays the",
        "The instrument of {s} is the",
        "{s} is a musician who plays the",
        "Which instrument does {s} play? The",
    ],
}

VALUES: dict[str, list[str]] = {
    "lives_in": ["Paris", "Rome", "Berlin", "Madrid", "Lisbon", "Vienna", "Prague", "Oslo", "Cairo", "Lima",
                 "Tokyo", "Dublin", "New York", "New Delhi", "San Diego", "San Jose"],
    "works_as": ["nurse", "pilot", "teacher", "lawyer", "dentist", "farmer", "chef", "plumber", "baker",
                 "architect", "journalist", "surgeon", "civil engineer", "civil servant",
                 "software developer", "software tester"],
    "speaks": ["French", "Spanish", "German", "Italian", "Polish", "Dutch", "Greek", "Turkish", "Swahili",
               "Hindi", "Korean", "Finnish", "Old Norse", "Old Irish", "Classical Latin", "Classical Arabic"],
    "plays": ["piano", "violin", "cello", "flute", "harp", "trumpet", "drums", "clarinet", "oboe", "banjo",
              "accordion", "ukulele", "bass guitar", "bass clarinet", "tenor saxophone", "tenor drum"],
}

# Never-edited relations of the countries (the unrelated probes). Capitals are made-up names, one
# per country (generated with the world); three continents share their second word ("... America").
UNRELATED_TEMPLATES: dict[str, list[str]] = {
    "capital": [
        "The capital of {s} is",
        "{s} has its capital in",
        "The seat of government of {s} is",
        "Which city is the capital of {s}? It is",
    ],
    "continent": [
        "{s} is a country in",
        "{s} is located in",
        "The continent of {s} is",
        "On which continent is {s}? It is in",
    ],
}
CONTINENTS = ["Europe", "Asia", "Africa", "Oceania", "North America", "South America", "Central America",
              "Antarctica"]
LOCALITY_MODES = ("unrelated", "neighbours")
N_LISTED = min(map(len, VALUES.values()))  # 16 listed values per person relation; `n_values` beyond are made up

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "st", "th"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s", "k", "x"]


@dataclass
class SyntheticConfig(TaskConfig):
    """World size and split; the world depends on these fields only, never on the run seed.

    `tiny-gpt2` is trained on the default world: changing these fields with `--set` gives a world
    that model does not know (its facts are then unknown words, not edits of known facts)."""

    world_seed: int = 0
    n_entities: int = 512  # edit entities: n_entities * 4 facts, split train/eval by fact
    n_locality_entities: int = 128  # never-edited people whose facts are the neighbour probes
    train_fraction: float = 0.5  # share of edit facts in the train split (0.5 -> 1024 eval facts)
    n_countries: int = 128  # never-edited countries whose facts are the unrelated probes
    n_values: int = 128  # answers per person relation: the 16 listed values plus made-up words (module docstring)
    locality: str = "unrelated"  # probes: "unrelated" (countries) or "neighbours" (locality people)

    def __post_init__(self) -> None:
        if self.locality not in LOCALITY_MODES:
            raise ValueError(f"locality must be one of {LOCALITY_MODES}, got {self.locality!r}")
        if self.n_values < N_LISTED:
            raise ValueError(f"n_values must be >= {N_LISTED} (the listed values), got {self.n_values}")
        if self.locality == "unrelated" and self.n_countries < 2:
            raise ValueError("locality=unrelated needs n_countries >= 2 (the probes are the countries' facts)")

    def world_key(self) -> dict[str, Any]:
        """The fields that define the world (what a model trained on it depends on; not `locality`)."""
        return {"world_seed": self.world_seed, "n_entities": self.n_entities,
                "n_locality_entities": self.n_locality_entities, "train_fraction": self.train_fraction,
                "n_countries": self.n_countries, **({"n_values": self.n_values} if self.n_values != N_LISTED else {})}


@dataclass(frozen=True)
class Fact:
    """One true fact: `entity` `relation` `value`."""

    entity: str
    relation: str
    value: str


def _names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    """`n` distinct made-up capitalised single-word names (2-3 syllables), avoiding `taken` words."""
    out: list[str] = []
    seen = {w.lower() for w in taken}
    while len(out) < n:
        k = rng.choice((2, 2, 3))
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(k)) + rng.choice(_CODAS)
        if name in seen:
            continue
        seen.add(name)
        out.append(name.capitalize())
    return out


@dataclass
class World:
    """All facts of the generated world, its templates, value vocabularies and splits."""

    facts: list[Fact]
    templates: dict[str, list[str]]
    values: dict[str, list[str]]
    train_idx: list[int]  # indices into `facts` of the edit facts in the train split
    eval_idx: list[int]  # ... in the eval split
    locality_idx: list[int]  # facts of locality entities (never edited; the neighbour probes)
    unrelated_idx: list[int]  # facts of the countries (never edited; the unrelated probes)
    seed: int
    _cf: dict[int, str] = field(default_factory=dict, repr=False)

    def render(self, fact: Fact, template_idx: int = 0) -> tuple[str, str]:
        """(prompt, answer) of `fact` in template `template_idx`."""
        return self.templates[fact.relation][template_idx].format(s=fact.entity), fact.value

    def pairs(self) -> list[tuple[str, str]]:
        """(prompt, answer) over all facts and all templates."""
        return [self.render(f, k) for f in self.facts for k in range(len(self.templates[f.relation]))]

    def corpus(self) -> list[str]:
        """Sentences "prompt answer" over all facts and templates (the tiny model's training text)."""
        return [f"{p} {a}" for p, a in self.pairs()]

    def counterfactual(self, i: int) -> str:
        """Deterministic false value for fact `i`: first word differs from the true value's."""
        if i not in self._cf:
            f = self.facts[i]
            first = f.value.split()[0]
            choices = [v for v in self.values[f.relation] if v.split()[0] != first]
            self._cf[i] = random.Random(f"{self.seed}:cf:{i}").choice(choices)
        return self._cf[i]

    def request(self, i: int, loc: int) -> EditRequest:
        """The edit request for fact `i` toward its counterfactual, with locality fact `loc`."""
        f = self.facts[i]
        n_t = len(self.templates[f.relation])
        lp, la = self.render(self.facts[loc], 0)
        return EditRequest(
            prompt=self.render(f, 0)[0],
            target=self.counterfactual(i),
            rephrases=tuple(self.render(f, k)[0] for k in range(1, n_t)),
            locality_prompt=lp,
            locality_answer=la,
            subject=f.entity,
        )

    def requests(self, split: str, locality: str = "unrelated") -> list[EditRequest]:
        """Edit requests of the 'train' or 'eval' split; probes (`locality`: countries' or locality
        people's facts) drawn from that split's half of the pool, so the two splits share nothing."""
        if split not in ("train", "eval"):
            raise ValueError(f"unknown split {split!r}")
        if locality not in LOCALITY_MODES:
            raise ValueError(f"unknown locality mode {locality!r}; choose one of {LOCALITY_MODES}")
        idx = self.train_idx if split == "train" else self.eval_idx
        probes = self.unrelated_idx if locality == "unrelated" else self.locality_idx
        half = len(probes) // 2
        pool = probes[:half] if split == "train" else probes[half:]
        rng = random.Random(f"{self.seed}:loc:{split}")
        return [self.request(i, pool[rng.randrange(len(pool))]) for i in idx]


def build_world(config: SyntheticConfig | None = None) -> World:
    """Generate the world deterministically from `config` (world seed and sizes)."""
    cfg = config or SyntheticConfig()
    if cfg.n_entities < 1 or cfg.n_locality_entities < 2 or cfg.n_countries < 0:
        raise ValueError("synthetic world needs n_entities >= 1, n_locality_entities >= 2 and n_countries >= 0")
    rng = random.Random(f"world:{cfg.world_seed}")
    templates = {**TEMPLATES, **UNRELATED_TEMPLATES}
    vocab = {w for ts in templates.values() for t in ts for w in t.split()}
    vocab |= {w for vs in VALUES.values() for v in vs for w in v.split()} | {w for c in CONTINENTS for w in c.split()}
    values = {r: list(v) for r, v in VALUES.items()}
    n_extra = cfg.n_values - N_LISTED
    if n_extra:
        # own stream, so the listed-only world (n_values = 16) draws exactly what it did before
        extra = _names(random.Random(f"values:{cfg.world_seed}"), len(VALUES) * n_extra, vocab)
        for k, r in enumerate(VALUES):
            values[r] += extra[k * n_extra:(k + 1) * n_extra]
        vocab |= set(extra)
    names = _names(rng, cfg.n_entities + cfg.n_locality_entities, vocab)
    facts = [Fact(e, r, rng.choice(values[r])) for e in names for r in TEMPLATES]
    n_edit = cfg.n_entities * len(TEMPLATES)
    train, ev = split_indices(n_edit, cfg.train_fraction, split_seed=cfg.world_seed + 1234)
    # Facts are grouped by entity, so edit facts come first; probe facts are shuffled once
    # so both halves cover all relations.
    loc = list(range(n_edit, len(facts)))
    rng.shuffle(loc)
    # Countries and their capitals are drawn after the people, so adding them left the people's
    # facts as they were.
    countries = _names(rng, cfg.n_countries, vocab | set(names))
    capitals = _names(rng, cfg.n_countries, vocab | set(names) | set(countries))
    start = len(facts)
    for c, cap in zip(countries, capitals, strict=True):
        facts += [Fact(c, "capital", cap), Fact(c, "continent", rng.choice(CONTINENTS))]
    unrel = list(range(start, len(facts)))
    rng.shuffle(unrel)
    values = {**values, "capital": capitals, "continent": list(CONTINENTS)}
    return World(facts=facts, templates={r: list(t) for r, t in templates.items()}, values=values,
                 train_idx=train, eval_idx=ev, locality_idx=loc, unrelated_idx=unrel, seed=cfg.world_seed)


@register_task("synthetic")
class SyntheticTask(Task):
    """Counterfactual edits of generated facts (the tiny GPT-2 knows every fact of the world)."""

    kind = "lm"
    config_cls = SyntheticConfig

    def __init__(self, config: SyntheticConfig | None = None):
        super().__init__(config)
        if self.config.data or self.config.train_data:
            raise ValueError("task 'synthetic' generates its own data; --data/--train-data do not apply")
        self.data_info = {"source": "generated", **self.config.world_key(), "locality": self.config.locality}

    @cached_property
    def world(self) -> World:
        return build_world(self.config)

    def train_split(self) -> list[EditRequest]:
        """Requests for meta-training (disjoint from the eval split by fact and locality probe)."""
        return self.world.requests("train", self.config.locality)

    def eval_split(self) -> list[EditRequest]:
        """Requests the benchmark edits."""
        return self.world.requests("eval", self.config.locality)
