"""The project's one JSON reader and one atomic JSON writer.

Every JSON file the project writes (dataset manifests, COCO-style exports, training state,
pipeline markers, evaluation results, benchmark reports) goes through :func:`write_json_atomic`, so
a crash or a full disk never leaves a half-written file where a reader expects a whole one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def load_json(path: str | os.PathLike) -> Any:
    """``json.load`` of a UTF-8 file, with an error that names the file when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{os.fspath(path)} is not valid JSON: {err}") from err


def write_json_atomic(path: str | os.PathLike, data: Any, *, fsync: bool = True, **dumps_kwargs: Any) -> Path:
    """Write ``json.dumps(data, **dumps_kwargs)`` plus a newline to ``path`` atomically; returns the path.

    The text goes to a hidden temporary file next to ``path`` (named with the process id, so two
    processes never share one), is flushed and, with ``fsync=True`` (default), synced to disk, then
    moved over ``path`` with ``os.replace``: readers see the old file or the new one, never a part.
    The parent folder is created. ``dumps_kwargs`` (``indent``, ``sort_keys``, ``allow_nan``,
    ``ensure_ascii``, ``separators``, ``default``...) are passed to :func:`json.dumps` unchanged, so
    each caller keeps its own layout. A value ``json`` cannot encode raises before anything is written.
    """
    path = Path(path)
    text = json.dumps(data, **dumps_kwargs) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
