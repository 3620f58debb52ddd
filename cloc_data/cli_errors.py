"""How ``cloc-data`` checks its inputs before reading them, and how it reports what went wrong.

Every error a user can cause ends as one line on stderr,
``cloc-data: error: <file>: <what happened and what to do>``, and a non-zero exit status (never a
traceback):

* **2** (:data:`EXIT_USAGE`, argparse's convention): the command line is wrong. A bad, missing or
  contradictory flag (argparse prints its usage line first), a path that does not exist, a folder
  that holds nothing ``--format`` reads, a file of another kind than ``--format`` reads (a tar
  where JSON is expected, a pickle given to ``--format coco``...), a RefCOCO split that is missing
  or contradicts the file's name.
* **1** (:data:`EXIT_DATA`): the input's content cannot be used. Not UTF-8, invalid JSON, a
  damaged tar, Parquet file or pickle, a pickle refused by :mod:`cloc_data.safe_pickle`, records
  in another layout than the format's, and a run that yields no sample at all.

Checking the kind of each file (:func:`sniff`) before converting turns the usual mix-ups into
these messages instead of a decoding error deep in a converter.
"""

from __future__ import annotations

import argparse
import codecs
import pickle
import re
import tarfile
from pathlib import Path

from cloc_data.converters import SplitError, grit_input_files
from cloc_data.converters.common import expand_inputs
from cloc_data.shards import SkipCounter

EXIT_DATA = 1
EXIT_USAGE = 2

# what each format reads, in the words of the error messages
READS = {
    "grit": "img2dataset webdataset .tar shards or GRIT .parquet / .jsonl rows (a file or a folder of them)",
    "vg": "Visual Genome's region_descriptions.json",
    "coco": "a COCO instances JSON file (e.g. instances_val2017.json)",
    "lvis": "an LVIS JSON file (e.g. lvis_v1_val.json)",
    "refcoco": "a refer folder (refs(unc).p + instances.json), a refs(*).p file, or Hugging Face .parquet / "
    ".jsonl rows",
    "flickr30k": "the Flickr30k Entities folder (Sentences/, Annotations/, train.txt / val.txt / test.txt)",
}
# file kinds (see sniff) each format accepts; "text" is JSON or JSON lines, checked by the converter
_ACCEPTS = {
    "grit": {"tar", "parquet", "text"},
    "vg": {"text"},
    "coco": {"text"},
    "lvis": {"text"},
    "refcoco": {"pickle", "parquet", "text"},
    "flickr30k": set(),
}
_KIND_NAMES = {
    "tar": "a tar archive",
    "parquet": "a Parquet file",
    "gzip": "gzip-compressed",
    "zip": "a zip archive",
    "pickle": "a pickle",
    "binary": "a binary file",
}
_KIND_HINTS = {
    "tar": "; webdataset tars from img2dataset are GRIT's download layout (--format grit), and shards "
    "written by cloc-data are already converted (cloc-data stats reads them)",
    "parquet": "; Parquet rows are read by --format grit and --format refcoco",
    "pickle": "; refer pickles (refs(unc).p) are read by --format refcoco",
    "gzip": "; decompress it first",
    "zip": "; unzip it first",
}
_SNIFF_BYTES = 4096


class CLIError(Exception):
    """A user-caused failure: ``where`` (the file or flag), ``message`` (what happened, what to do), exit ``code``."""

    def __init__(self, where: str, message: str, code: int = EXIT_DATA):
        super().__init__(f"{where}: {message}")
        self.where, self.message, self.code = str(where), message, code

    @property
    def line(self) -> str:
        return f"cloc-data: error: {self.where}: {one_line(self.message)}"


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def sniff(path: Path) -> tuple[str, str]:
    """``(kind, detail)`` of a file from its first bytes.

    Kinds: ``empty``, ``tar``, ``parquet``, ``gzip``, ``zip``, ``pickle`` (protocol 2+), ``utf16``,
    ``not_utf8`` (text in another encoding; ``detail`` says where), ``binary`` and ``text``.
    """
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if not head:
        return "empty", ""
    if head[257:262] == b"ustar" or (path.suffix == ".tar" and tarfile.is_tarfile(path)):
        return "tar", ""
    for magic, kind in ((b"PAR1", "parquet"), (b"\x1f\x8b", "gzip"), (b"PK\x03\x04", "zip")):
        if head.startswith(magic):
            return kind, ""
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle", ""
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf16", ""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as err:
        if b"\x00" in head:
            return "binary", ""
        return "not_utf8", f"byte 0x{head[err.start]:02x} at position {err.start}"
    return "text", ""


def _check_file(path: Path, fmt: str) -> None:
    kind, detail = sniff(path)
    if kind == "empty":
        raise CLIError(path, "is empty (0 bytes): the download or copy is incomplete; fetch it again")
    if kind == "utf16":
        raise CLIError(
            path, "is UTF-16 text; cloc-data reads UTF-8: re-save it as UTF-8 (iconv -f UTF-16 -t UTF-8)"
        )
    if kind == "not_utf8":
        raise CLIError(
            path, f"is not UTF-8 text ({detail}); re-save it as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)"
        )
    if fmt == "flickr30k":
        raise CLIError(path, f"is a file; --format flickr30k reads {READS[fmt]}", EXIT_USAGE)
    if kind not in _ACCEPTS[fmt]:
        raise CLIError(
            path, f"is {_KIND_NAMES[kind]}, but --format {fmt} reads {READS[fmt]}{_KIND_HINTS.get(kind, '')}",
            EXIT_USAGE,
        )  # fmt: skip


def _check_folder(path: Path, fmt: str) -> None:
    if fmt == "grit":
        try:
            grit_input_files([path])
        except FileNotFoundError:
            raise CLIError(
                path, f"holds no GRIT data; --format grit reads {READS[fmt]}", EXIT_USAGE
            ) from None
    elif fmt == "refcoco":
        if not (list(path.glob("refs(*).p")) or list(path.glob("refs(*).json")) or expand_inputs(path)):
            raise CLIError(path, f"holds no RefCOCO data; --format refcoco reads {READS[fmt]}", EXIT_USAGE)
    elif fmt == "flickr30k":
        if not ((path / "Sentences").is_dir() and (path / "Annotations").is_dir()):
            raise CLIError(
                path, f"is not a Flickr30k Entities folder; --format flickr30k reads {READS[fmt]}", EXIT_USAGE
            )
    else:
        raise CLIError(path, f"is a folder; --format {fmt} reads {READS[fmt]}", EXIT_USAGE)


def check_convert_inputs(args: argparse.Namespace) -> None:
    """Raise :class:`CLIError` for the first input, flag path or output that cannot work."""
    for item in args.input:
        path = Path(item)
        if not path.exists():
            raise CLIError(item, f"does not exist; --input takes {READS[args.format]}", EXIT_USAGE)
        if path.is_dir():
            _check_folder(path, args.format)
        else:
            _check_file(path, args.format)
    for flag, value, folder in (
        ("--images", args.images, True),
        ("--image-data", args.image_data, False),
        ("--instances", args.instances, False),
    ):
        if value is not None and not (Path(value).is_dir() if folder else Path(value).is_file()):
            kind = "folder" if folder else "file"
            raise CLIError(value, f"{flag} must name an existing {kind}; this one does not exist", EXIT_USAGE)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CLIError(args.out, "--out is a file; give a folder for the shards", EXIT_USAGE)


def known_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input (anything else is a bug and keeps its traceback)."""
    errors: list[type[BaseException]] = [
        OSError,
        ValueError,
        EOFError,
        pickle.UnpicklingError,
        tarfile.TarError,
    ]
    try:
        import pyarrow

        errors.append(pyarrow.ArrowException)  # damaged Parquet files raise these
    except ImportError:  # pragma: no cover - pyarrow comes with datasets
        pass
    return tuple(errors)


def _where(message: str, paths: list[str]) -> tuple[str | None, str]:
    """Split a message that starts with a path (``"x.json is not valid JSON"``, ``"x.p: refused"``)."""
    match = re.match(r"(?:input )?'?([^\s']+?)'?:?\s+(.*)", message)
    if match:
        token = match.group(1)
        if Path(token).exists() or any(token.startswith(p) for p in paths):
            return token, match.group(2)
    return None, message


def find_non_utf8(paths: list[str]) -> tuple[Path, int] | None:
    """``(file, byte offset)`` of the first text input that is not UTF-8 (only run after a decode error)."""
    files = []
    for item in paths:
        path = Path(item)
        files.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    for path in files:
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        if sniff(path)[0] not in ("text", "not_utf8"):
            continue
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as err:
                    return path, offset + err.start
                offset += len(chunk)
    return None


def error_from_exception(err: BaseException, paths: list[str], fmt: str | None = None) -> CLIError:
    """One :class:`CLIError` for an exception raised while reading ``paths``."""
    if isinstance(err, CLIError):
        return err
    code = EXIT_USAGE if isinstance(err, (FileNotFoundError, SplitError)) else EXIT_DATA
    message = one_line(err)
    if isinstance(err, UnicodeDecodeError):  # raised by a text reader that does not know the file name
        found = find_non_utf8(paths)
        where = str(found[0]) if found else ", ".join(paths)
        at = f" at byte {found[1]}" if found else ""
        return CLIError(
            where, f"is not UTF-8 text ({message}{at}); re-save it as UTF-8 (e.g. iconv -t UTF-8)"
        )
    where, message = _where(message, paths)
    if fmt is not None and code == EXIT_DATA and not isinstance(err, pickle.UnpicklingError):
        message += f"; check that --format {fmt} is this input's format (docs/data_format.md describes each)"
    return CLIError(where or ", ".join(paths), message, code)


_NO_SAMPLE_HINTS = {
    "missing_image": "pass --images DIR (the image root) or --annotations-only",
    "unknown_size": "the image sizes are unknown without the images: pass --images DIR",
    "failed_download": "every image download failed (img2dataset's status and error_message in each .json)",
    "bad_shard": "the tar shards cannot be read: download them again",
}


def no_samples_error(fmt: str, paths: list[str], skipped: SkipCounter, split: str | None) -> CLIError:
    """The error for a conversion that wrote nothing: what was skipped and the likely fix."""
    if not skipped.total:
        split_hint = f" and that split {split!r} exists in it" if split not in (None, "all") else ""
        return CLIError(
            ", ".join(paths),
            f"no samples written: nothing was read; check that --format {fmt} is this input's format{split_hint}",
        )
    reasons = sorted(skipped.counts.items(), key=lambda kv: (-kv[1], kv[0]))
    counts = ", ".join(f"{reason} {count}" for reason, count in reasons[:4])
    hint = _NO_SAMPLE_HINTS.get(
        reasons[0][0],
        f"check that --format {fmt} is this input's format (docs/data_format.md describes each)",
    )
    return CLIError(", ".join(paths), f"no samples written (skipped: {counts}); {hint}")
