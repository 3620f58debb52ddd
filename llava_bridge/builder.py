"""Route CLOC checkpoints to :class:`~llava_bridge.tower.CLOCVisionTower` inside a LLaVA fork's builder.

A LLaVA code base picks its tower in ``llava/model/multimodal_encoder/builder.py`` by the *name* of
``mm_vision_tower`` (``openai``/``laion`` prefixes, ``'clip' in name``, ``hf:`` ...). A CLOC
checkpoint is recognised here by what it is, the ``model_type`` in its ``config.json``, so a folder
called ``clip-finetuned`` holding CLOC weights gets the CLOC tower and a folder called ``cloc-old``
holding CLIP weights does not. Everything else goes to the fork's own builder unchanged. The
two-line change a fork needs is in ``docs/llava.md``::

    from llava_bridge import with_cloc
    build_vision_tower = with_cloc(build_vision_tower)
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

from .tower import CLOCVisionTower

# config.json `model_type` values of checkpoints the CLOC tower loads (full model, ViT alone)
CLOC_MODEL_TYPES = ("cloc", "cloc_vision_model")


def vision_tower_name(vision_tower_cfg) -> str | None:
    """The tower LLaVA's config names: ``mm_vision_tower``, else ``vision_tower`` (LLaVA's lookup order)."""
    return getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))


def is_cloc_checkpoint(name: str | os.PathLike | None) -> bool:
    """Whether ``name`` is a CLOC checkpoint, judged by the ``model_type`` of its ``config.json``.

    A local folder is read directly. Any other name is looked up with transformers' ``cached_file``
    (the local hub cache, or the hub when online); a name that does not resolve to a config, such as
    ``"hf:..."`` or ``"imagebind_huge"``, is not a CLOC checkpoint.
    """
    if name is None:
        return False
    name = os.fspath(name)
    if os.path.isdir(name):
        return _model_type(Path(name) / "config.json") in CLOC_MODEL_TYPES
    if name.startswith("hf:") or os.path.exists(name):
        return False
    try:
        from transformers.utils import cached_file

        path = cached_file(
            name,
            "config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except Exception:  # invalid repo ids, gated or missing repositories: not ours to judge
        return False
    return path is not None and _model_type(Path(path)) in CLOC_MODEL_TYPES


def _model_type(config_file: Path) -> str | None:
    try:
        return json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def build_vision_tower(vision_tower_cfg, fallback: Callable | None = None, **kwargs):
    """LLaVA's ``build_vision_tower`` for CLOC checkpoints; every other tower goes to ``fallback``.

    Args:
        vision_tower_cfg: LLaVA's model config or arguments (``mm_vision_tower`` or ``vision_tower``
            names the checkpoint; the rest is read by the tower).
        fallback: the fork's own ``build_vision_tower``, called as ``fallback(vision_tower_cfg, **kwargs)``
            for non-CLOC towers; default ``None`` raises for them.
        **kwargs: passed on (LLaVA passes ``delay_load``).
    """
    name = vision_tower_name(vision_tower_cfg)
    if name is None:
        raise ValueError("the config names no vision tower: set mm_vision_tower (or vision_tower)")
    if is_cloc_checkpoint(name):
        return CLOCVisionTower(name, args=vision_tower_cfg, **kwargs)
    if fallback is None:
        raise ValueError(f"Unknown vision tower: {name} (not a CLOC checkpoint, and no fallback builder given)")
    return fallback(vision_tower_cfg, **kwargs)


def with_cloc(fallback: Callable) -> Callable:
    """Wrap a fork's ``build_vision_tower`` so CLOC checkpoints get :class:`CLOCVisionTower` first."""
    return functools.wraps(fallback)(functools.partial(build_vision_tower, fallback=fallback))
