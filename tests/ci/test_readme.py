"""The README's "Adding an editor" snippet, run as written: it registers an editor that `run_one` runs."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def adding_an_editor_snippet() -> str:
    """The first Python block of the README's section "Adding an editor or a task"."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Adding an editor", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's 'Adding an editor' section has no ```python block"
    return blocks[0]


def test_the_readme_editor_snippet_registers_and_runs_an_editor(tmp_path):
    import bench
    from editors.base import EDITORS, Editor

    before = dict(EDITORS)
    module = types.ModuleType("readme_editor")  # a module of its own, as a user's editor would be
    sys.modules[module.__name__] = module
    try:
        # dont_inherit: the snippet runs without this file's `from __future__` flags, as a user's file would
        code = compile(adding_an_editor_snippet(), "README.md#adding-an-editor", "exec", dont_inherit=True)
        exec(code, module.__dict__)
        added = sorted(set(EDITORS) - set(before))
        assert len(added) == 1, f"the snippet registers one new editor, not {added}"
        name = added[0]
        assert issubclass(EDITORS[name], Editor) and hasattr(EDITORS[name].hparams_cls, "RANGES")
        row = bench.run_one(editor=name, model="tiny-gpt2", task="synthetic", n_edits=4, results=tmp_path,
                            cache_dir=REPO / "results", log=lambda *_: None)
        assert row["status"] == "ok" and row["editor"] == name and row["n_edits"] == 4
        stored = [line for line in (tmp_path / "runs.jsonl").read_text().splitlines() if line.strip()]
        assert len(stored) == 1 and f'"config_hash": "{row["config_hash"]}"' in stored[0]
        assert '"status": "ok"' in stored[0]
        assert 0.0 <= row["metrics"]["es"] <= 1.0
    finally:
        for name in set(EDITORS) - set(before):
            del EDITORS[name]
        sys.modules.pop(module.__name__, None)
    assert EDITORS == before
