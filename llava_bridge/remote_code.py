"""Saved ``cloc_llava`` folders that load with ``trust_remote_code=True`` where this project is not installed.

``save_pretrained`` of a class registered for an auto class copies its module and the modules that
module imports *relatively* next to the weights (transformers' ``custom_object_save``). The
``llava_bridge`` modules import ``cloc_hf`` absolutely (two packages, one layer on top of the other),
so those copies alone would need ``cloc_hf`` installed. :func:`make_code_self_contained` finishes the
copy: in the copied project modules it turns ``from cloc_hf.<module> import ...`` into
``from .<module> import ...`` and copies every module that is then imported relatively, until
nothing is missing. The package's own files are never changed, only the copies.

:class:`SelfContainedCodeMixin` runs it after ``save_pretrained`` (and before a hub upload) of the
config, the model and the processor. This module imports only the standard library, so it works
inside the saved folder too (a model loaded with remote code saves a folder that loads again).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

_FROM_CLOC_HF = re.compile(r"^(\s*)from\s+cloc_hf\.(\w+)\s+import\b", re.MULTILINE)
_RELATIVE = re.compile(r"^\s*from\s+\.(\w+)\s+import\b", re.MULTILINE)
_ANY_CLOC_HF = re.compile(r"^\s*(?:from\s+cloc_hf\b|import\s+cloc_hf\b)", re.MULTILINE)


def _module_dirs() -> list[Path]:
    """Folders holding the modules a saved folder may need: this one (``llava_bridge`` or, in a folder
    loaded with remote code, that folder's copy) and ``cloc_hf``'s when it is installed."""
    dirs = [Path(__file__).resolve().parent]
    spec = importlib.util.find_spec("cloc_hf") if __package__ == "llava_bridge" else None
    if spec is not None and spec.origin:
        dirs.append(Path(spec.origin).resolve().parent)
    return dirs


def _project_modules(dirs: list[Path]) -> dict[str, Path]:
    """Module name -> source file over ``dirs``; two packages with one module name could not share a folder."""
    found: dict[str, Path] = {}
    for folder in dirs:
        for path in sorted(folder.glob("*.py")):
            if path.stem == "__init__":
                continue
            if path.stem in found and found[path.stem].resolve() != path.resolve():
                raise RuntimeError(f"{path} and {found[path.stem]}: one module name in two packages")
            found.setdefault(path.stem, path)
    return found


def make_code_self_contained(folder) -> list[str]:
    """Make the project modules copied into ``folder`` import each other relatively; returns the names
    of the modules copied in. Idempotent; files of other origin in ``folder`` are left alone.

    Raises:
        FileNotFoundError: a module imported relatively is neither in ``folder`` nor in the project.
        RuntimeError: a copied module still imports ``cloc_hf`` in a form that cannot be rewritten.
    """
    folder = Path(folder)
    sources = _project_modules(_module_dirs())
    pending = [path for path in sorted(folder.glob("*.py")) if path.stem in sources]
    seen: set[str] = set()
    added: list[str] = []
    while pending:
        path = pending.pop()
        if path.stem in seen:
            continue
        seen.add(path.stem)
        text = path.read_text(encoding="utf-8")
        rewritten = _FROM_CLOC_HF.sub(r"\1from .\2 import", text)
        if _ANY_CLOC_HF.search(rewritten):
            raise RuntimeError(f"{path}: imports cloc_hf in a form a saved folder cannot carry (use `from cloc_hf.<module> import`)")
        if rewritten != text:
            path.write_text(rewritten, encoding="utf-8")
        for name in _RELATIVE.findall(rewritten):
            target = folder / f"{name}.py"
            if not target.is_file():
                if name not in sources:
                    raise FileNotFoundError(f"{path} imports .{name}, which is neither in {folder} nor in the project")
                shutil.copyfile(sources[name], target)
                added.append(name)
            pending.append(target)
    return added


class SelfContainedCodeMixin:
    """Runs :func:`make_code_self_contained` on what ``save_pretrained`` (and a hub upload) writes, for a
    class registered for an auto class (the only case in which transformers copies code)."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if getattr(self, "_auto_class", None) is not None and kwargs.get("is_main_process", True):
            make_code_self_contained(save_directory)
        return out

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        # save_pretrained(push_to_hub=True) uploads before it returns: finish the code first
        if getattr(self, "_auto_class", None) is not None:
            make_code_self_contained(working_dir)
        return super()._upload_modified_files(working_dir, *args, **kwargs)
