"""Load refer-style ``refs(unc).p`` / ``refs(umd).p`` pickles without executing code.

The RefCOCO family ships its referring expressions as pickles (the ``refer`` toolkit's format): a
list of dicts of plain values. Plain ``pickle.load`` on a downloaded file runs arbitrary code, so we
unpickle with :class:`RestrictedUnpickler`, which resolves no function or class from the pickle.

What loads: dict, list, tuple, str, int, float, bool, None, bytes, set, frozenset. Most of these
have dedicated opcodes and need no global lookup. Three need one in protocols 0-2 (and so in every
Python 2 pickle): ``set`` and ``frozenset`` (``__builtin__.set``) and ``bytes`` (``_codecs.encode``).
Exactly those names are answered, by stand-ins that can only build a set/frozenset or latin-1 bytes;
every other global (``os.system``, ``builtins.eval``, any class) raises
:class:`ForbiddenGlobalError` naming it.

Python 2 pickles (the original refer files, protocol 2, ``str`` as bytes) load with
``encoding="latin1"`` (the default here), which decodes py2 ``str`` to ``str``.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, BinaryIO


class ForbiddenGlobalError(pickle.UnpicklingError):
    """The pickle references a global (function/class), which this loader never resolves."""


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` as protocol <= 2 uses it to pickle ``bytes``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ForbiddenGlobalError(
            f"_codecs.encode called with {type(text).__name__}, {encoding!r}; only latin1 text"
        )
    return text.encode("latin1")


def _plain_set(items: Any = ()) -> set:
    return set(items)


def _plain_frozenset(items: Any = ()) -> frozenset:
    return frozenset(items)


# (module, name) -> stand-in; "__builtin__" is the Python 2 spelling of "builtins".
_ALLOWED_GLOBALS = {
    ("builtins", "set"): _plain_set,
    ("__builtin__", "set"): _plain_set,
    ("builtins", "frozenset"): _plain_frozenset,
    ("__builtin__", "frozenset"): _plain_frozenset,
    ("_codecs", "encode"): _latin1_bytes,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for plain-data pickles; any global but set/frozenset/bytes raises :class:`ForbiddenGlobalError`."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        raise ForbiddenGlobalError(
            f"forbidden global {module}.{name} in pickle: only plain builtin data "
            "(dict, list, tuple, str, int, float, bool, None, bytes, set) may be loaded"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"forbidden persistent id {pid!r} in pickle")


def safe_load(file: BinaryIO, encoding: str = "latin1") -> Any:
    """Unpickle plain data from an open binary file; raises :class:`ForbiddenGlobalError` on globals."""
    return RestrictedUnpickler(file, encoding=encoding).load()


def safe_loads(data: bytes, encoding: str = "latin1") -> Any:
    """Unpickle plain data from bytes (see :func:`safe_load`)."""
    return safe_load(io.BytesIO(data), encoding=encoding)


def load_pickle_file(path: str | os.PathLike, encoding: str = "latin1") -> Any:
    """Unpickle plain data from ``path``; errors name the file and say what to do.

    Raises :class:`ForbiddenGlobalError` for a pickle that references code (nothing from it is
    run) and ``pickle.UnpicklingError`` for anything else that is not a readable pickle (truncated,
    not a pickle at all: a damaged pickle can fail with many exception types, all reported so).
    """
    with open(path, "rb") as f:
        try:
            return safe_load(f, encoding=encoding)
        except ForbiddenGlobalError as err:
            raise ForbiddenGlobalError(
                f"{os.fspath(path)}: refused to unpickle ({err}); nothing from it was run. The refer "
                "toolkit's refs(unc).p / refs(umd).p hold only plain data, so this file is not one of them "
                "or has been altered: download it again from the refer release"
            ) from None
        except Exception as err:  # noqa: BLE001 - a damaged pickle fails with many types (EOF, Key, Index...)
            raise pickle.UnpicklingError(
                f"{os.fspath(path)}: not a readable pickle ({type(err).__name__}: {err}); the file is damaged "
                "or not a pickle: download it again"
            ) from err
