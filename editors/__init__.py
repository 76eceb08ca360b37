"""Editors behind one interface; importing this package fills the registry."""

import importlib

from editors.base import EDITORS, Edit, Editor, EditorContext, register_editor

# One line per editor module; each registers itself with @register_editor.
_MODULES = [
    "editors.finetune",
    "editors.memit",
    "editors.malmen",
    "editors.mend",
    "editors.alphaedit",
]
for _m in _MODULES:
    importlib.import_module(_m)

__all__ = ["EDITORS", "Edit", "Editor", "EditorContext", "register_editor"]
