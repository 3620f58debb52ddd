"""Reading and writing region-text tar shards (webdataset / img2dataset layout).

A shard is a plain, uncompressed POSIX tar file named ``{prefix}-{index:06d}.tar``. Each sample is
stored as consecutive members sharing a key::

    KEY.png | KEY.jpg | KEY.webp   the image (absent for annotation-only shards)
    KEY.txt                        the image-level caption, UTF-8
    KEY.json                       RegionSample.to_json(): key, caption, width, height, regions, meta

Boxes in ``KEY.json`` are xyxy in original-image pixels (see :mod:`cloc_data.format`).

Writing (:class:`ShardWriter`) is atomic per shard: a shard is written to ``NAME.tar.tmp``, fsynced and
renamed to ``NAME.tar``, so a crashed writer never leaves a partial file that :func:`list_shards`
reports. Reading has two paths over the same files:

* :func:`iter_shard_samples`: a dependency-free streaming reader (``tarfile``) that validates every
  sample and *skips and counts* malformed ones in a :class:`SkipCounter`, never crashing on them.
* :func:`load_hf_dataset` + :func:`hf_record_to_sample`: the same shards through Hugging Face
  ``datasets`` (``"webdataset"`` builder), for ``.map``/streaming/multi-worker pipelines.

Example::

    with ShardWriter("out/", max_samples_per_shard=1000) as writer:
        for sample in samples:
            writer.write(sample)
    skipped = SkipCounter()
    for sample in iter_shard_samples(list_shards("out/"), skipped=skipped):
        ...
    print(skipped.report())
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from cloc_data.format import MalformedSample, RegionSample

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "png", "webp")
# Extensions other writers (img2dataset, webdataset) use for the same formats.
_IMAGE_EXTENSION_ALIASES = {"jpeg": "jpg", "jpg": "jpg", "png": "png", "webp": "webp"}
_PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_SHARD_SUFFIX = ".tar"
_TMP_SUFFIX = ".tmp"
# Fixed member metadata so the same samples always produce byte-identical shards.
_MEMBER_MTIME = 0
_MEMBER_MODE = 0o644


class SkipCounter:
    """Counts skipped (malformed) records by reason, so that nothing is lost silently.

    Every :meth:`skip` logs a warning naming the key and the reason (after ``max_logged_per_reason``
    warnings for one reason, further ones are only counted; ``None`` logs them all) and keeps the first
    few keys per reason for the report.

    Reasons are short snake_case strings (``"bad_json"``, ``"missing_image"``, ``"invalid_sample"``...).
    """

    def __init__(
        self, name: str = "records", max_logged_per_reason: int | None = None, keep_examples: int = 3
    ):
        self.name = name
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.max_logged_per_reason = max_logged_per_reason
        self.keep_examples = keep_examples

    def skip(self, reason: str, key: str, detail: str = "") -> None:
        """Record one skipped record ``key`` for ``reason`` (``detail``: the error, for the log)."""
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.keep_examples:
            examples.append(str(key))
        n = self.counts[reason]
        limit = self.max_logged_per_reason
        if limit is None or n <= limit:
            logger.warning("skipping %s %r (%s)%s", self.name, key, reason, f": {detail}" if detail else "")
        elif n == limit + 1:
            logger.warning("further %s skipped for %r are counted but no longer logged", self.name, reason)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: SkipCounter) -> SkipCounter:
        """Add ``other``'s counts (and example keys) into this counter; returns ``self``."""
        self.counts.update(other.counts)
        for reason, keys in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(keys[: max(0, self.keep_examples - len(mine))])
        return self

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def report(self) -> str:
        """One line per reason: ``skipped N records: reason=count (e.g. key1, key2)``."""
        if not self.total:
            return f"skipped 0 {self.name}"
        lines = [f"skipped {self.total} {self.name}:"]
        for reason, count in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            examples = ", ".join(self.examples.get(reason, []))
            lines.append(f"  {reason}: {count}" + (f" (e.g. {examples})" if examples else ""))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SkipCounter({self.name!r}, {self.as_dict()})"


# --- images -------------------------------------------------------------------------------------


def detect_image_extension(data: bytes) -> str | None:
    """``"jpg"``/``"png"``/``"webp"`` from an encoded image's magic bytes, ``None`` if unknown."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _encode_image(image: Any, image_format: str, key: str) -> tuple[bytes, str, tuple[int, int]]:
    """Return ``(encoded bytes, extension, (width, height))`` for a PIL image or encoded bytes."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        ext = detect_image_extension(data)
        if ext is None:
            raise MalformedSample(
                f"sample {key!r}: image bytes are not JPEG, PNG or WebP (magic {data[:12]!r})"
            )
        try:
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                size = img.size
        except Exception as err:  # PIL raises many types for corrupt data
            raise MalformedSample(f"sample {key!r}: image bytes cannot be opened: {err!r}") from err
        return data, ext, size
    if isinstance(image, Image.Image):
        img = image
        if image_format == "jpg" and img.mode not in ("RGB", "L"):
            img = img.convert("RGB")  # JPEG has no alpha
        buf = io.BytesIO()
        img.save(buf, format=_PIL_FORMATS[image_format], **({"quality": 95} if image_format != "png" else {}))
        return buf.getvalue(), image_format, image.size
    raise TypeError(
        f"sample {key!r}: image must be a PIL image, encoded bytes or None, got {type(image).__name__}"
    )


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


# --- writing ------------------------------------------------------------------------------------


def _check_key(key: str) -> None:
    if not key or "." in key or "/" in key or "\\" in key:
        raise ValueError(
            f"sample key {key!r} is not usable in a shard: keys must be non-empty and contain no '.', '/' or '\\' "
            "(the part of a member name before the first '.' is the key)"
        )


class ShardWriter:
    """Write :class:`RegionSample` objects into ``{prefix}-{index:06d}.tar`` shards in ``out_dir``.

    Args:
        out_dir: destination folder (created if missing).
        prefix: shard file name prefix.
        max_samples_per_shard: a new shard starts after this many samples.
        image_format: ``"png"`` (lossless, default), ``"jpg"`` or ``"webp"``; used to encode PIL images.
            Images given as encoded bytes are stored as they are, their extension taken from their
            magic bytes.

    ``sample.image`` may be a PIL image, encoded bytes or ``None`` (annotation-only sample: only
    ``KEY.txt`` and ``KEY.json`` are written). Samples are validated before writing
    (:class:`MalformedSample` is raised and nothing is written for that sample), including that an
    image's size equals the sample's ``width x height``. Keys must be unique within one writer.

    Use as a context manager; on an exception inside the ``with`` block the shard in progress is
    discarded (its ``.tar.tmp`` removed) and finished shards are kept.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "shard",
        max_samples_per_shard: int = 1000,
        image_format: str = "png",
    ):
        image_format = _IMAGE_EXTENSION_ALIASES.get(image_format.lower(), image_format)
        if image_format not in IMAGE_EXTENSIONS:
            raise ValueError(f"image_format {image_format!r} is not one of {IMAGE_EXTENSIONS}")
        if max_samples_per_shard < 1:
            raise ValueError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
        if not prefix or "/" in prefix or "." in prefix:
            raise ValueError(f"shard prefix {prefix!r} must be non-empty and contain no '/' or '.'")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples_per_shard = max_samples_per_shard
        self.image_format = image_format
        self.shard_paths: list[str] = []
        self.num_samples = 0
        self._keys: set[str] = set()
        self._index = 0
        self._file: Any = None
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0
        self._closed = False

    # context manager ------------------------------------------------------------------------
    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # public API -----------------------------------------------------------------------------
    def write(self, sample: RegionSample) -> None:
        """Append one sample; raises ``ValueError`` for a bad/duplicate key, :class:`MalformedSample`."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        key = str(sample.key)
        _check_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}: keys must be unique within a ShardWriter")
        sample.validate()
        record = json.dumps(sample.to_json(), ensure_ascii=False, allow_nan=False).encode("utf-8")
        members: list[tuple[str, bytes]] = []
        if sample.image is not None:
            data, ext, size = _encode_image(sample.image, self.image_format, key)
            if size != (sample.width, sample.height):
                raise MalformedSample(
                    f"sample {key!r}: image is {size[0]}x{size[1]} but the sample says "
                    f"{sample.width}x{sample.height}; boxes are in original-image pixels, so these must agree"
                )
            members.append((f"{key}.{ext}", data))
        members.append((f"{key}.txt", sample.caption.encode("utf-8")))
        members.append((f"{key}.json", record))

        if self._tar is None:
            self._open_shard()
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = _MEMBER_MTIME
            info.mode = _MEMBER_MODE
            self._tar.addfile(info, io.BytesIO(data))
        self._keys.add(key)
        self._in_shard += 1
        self.num_samples += 1
        if self._in_shard >= self.max_samples_per_shard:
            self._finish_shard()

    def close(self) -> list[str]:
        """Finish the shard in progress; returns all shard paths written, in order."""
        if not self._closed:
            if self._tar is not None:
                self._finish_shard()
            self._closed = True
        return list(self.shard_paths)

    def abort(self) -> None:
        """Discard the shard in progress (finished shards stay) and close the writer."""
        if self._tar is not None:
            tmp = self._file.name
            try:
                self._tar.close()
                self._file.close()
            finally:
                self._tar, self._file = None, None
                if os.path.exists(tmp):
                    os.remove(tmp)
        self._closed = True

    # internals ------------------------------------------------------------------------------
    def _shard_path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}-{index:06d}{_SHARD_SUFFIX}"

    def _open_shard(self) -> None:
        final = self._shard_path(self._index)
        self._file = open(f"{final}{_TMP_SUFFIX}", "wb")  # noqa: SIM115 - closed in _finish_shard/abort
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._in_shard = 0

    def _finish_shard(self) -> None:
        final = self._shard_path(self._index)
        tmp = self._file.name
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._tar, self._file = None, None
        os.replace(tmp, final)
        _fsync_dir(self.out_dir)
        self.shard_paths.append(str(final))
        self._index += 1


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX); silently unsupported on some platforms."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- listing ------------------------------------------------------------------------------------


def list_shards(path_or_dir_or_glob: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Sorted shard paths from a ``.tar`` file, a folder (its ``*.tar``), a glob, or a list of these.

    Temporary ``*.tar.tmp`` files of unfinished writers never match. A path that is neither an
    existing file/folder nor a glob pattern raises ``FileNotFoundError``; a folder or glob without
    shards gives ``[]``.
    """
    if isinstance(path_or_dir_or_glob, (list, tuple)):
        return sorted({p for item in path_or_dir_or_glob for p in list_shards(item)})
    spec = os.fspath(path_or_dir_or_glob)
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(glob.escape(spec), f"*{_SHARD_SUFFIX}")))
    if os.path.isfile(spec):
        return [spec]
    if glob.has_magic(spec):
        return sorted(p for p in glob.glob(spec) if p.endswith(_SHARD_SUFFIX) and os.path.isfile(p))
    raise FileNotFoundError(f"no shard file, folder or glob matches {spec!r}")


# --- plain reader -------------------------------------------------------------------------------


def is_tar_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a tar archive: a ``.tar`` name or the POSIX ``ustar`` magic at byte 257."""
    if os.fspath(path).endswith(_SHARD_SUFFIX):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(265)
    except OSError:
        return False
    return head[257:262] == b"ustar"


def split_member_name(name: str) -> tuple[str, str] | None:
    """``"dir/KEY.ext.more"`` -> ``("dir/KEY", "ext.more")`` (webdataset convention); ``None`` if no ext."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{head}/{stem}" if head else stem), ext.lower()


def iter_tar_groups(path: str | os.PathLike, skipped: SkipCounter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream ``(key, {ext: bytes})`` groups of consecutive members sharing a key (webdataset layout).

    Works on any webdataset tar (this project's shards, img2dataset's output). Members without an
    extension are counted as ``stray_member``, a repeated extension as ``duplicate_member``; a
    damaged tar raises ``tarfile.TarError`` / ``EOFError`` / ``OSError`` after the groups before the
    damage have been yielded.
    """
    path = os.fspath(path)
    key: str | None = None
    group: dict[str, bytes] = {}
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            parts = split_member_name(member.name)
            if parts is None:
                skipped.skip("stray_member", f"{path}:{member.name}", "member name has no extension")
                continue
            member_key, ext = parts
            if member_key != key:
                if key is not None:
                    yield key, group
                key, group = member_key, {}
            fobj = tar.extractfile(member)
            data = fobj.read() if fobj is not None else b""
            if ext in group:
                skipped.skip("duplicate_member", member_key, f"{member.name} appears twice in {path}")
                continue
            group[ext] = data
    if key is not None:
        yield key, group


def image_member(group: dict[str, bytes]) -> tuple[str, bytes] | None:
    """The ``(extension, bytes)`` of a group's image member (``jpg``/``jpeg``/``png``/``webp``), else ``None``."""
    ext = next((e for e in group if _IMAGE_EXTENSION_ALIASES.get(e) is not None), None)
    return None if ext is None else (ext, group[ext])


def _group_to_sample(
    key: str, group: dict[str, bytes], decode_images: bool, require_image: bool, skipped: SkipCounter
) -> RegionSample | None:
    if "json" not in group:
        skipped.skip("missing_json", key, f"members {sorted(group)}")
        return None
    try:
        record = json.loads(group["json"].decode("utf-8"))
        if not isinstance(record, dict):
            raise ValueError(f"top level is {type(record).__name__}, not an object")
    except (UnicodeDecodeError, ValueError) as err:
        skipped.skip("bad_json", key, repr(err))
        return None
    try:
        sample = RegionSample.from_json(record)
    except MalformedSample as err:
        skipped.skip("invalid_sample", key, str(err))
        return None
    found = image_member(group)
    if found is None:
        if require_image:
            skipped.skip("missing_image", key, f"members {sorted(group)}")
            return None
        return sample
    data = found[1]
    if not decode_images:
        sample.image = data
        return sample
    try:
        image = decode_image(data)
    except Exception as err:  # PIL raises many exception types on corrupt files
        skipped.skip("bad_image", key, repr(err))
        return None
    if image.size != (sample.width, sample.height):
        skipped.skip(
            "size_mismatch",
            key,
            f"image is {image.size[0]}x{image.size[1]}, json says {sample.width}x{sample.height}",
        )
        return None
    sample.image = image
    return sample


def iter_shard_samples(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    decode_images: bool = True,
    skipped: SkipCounter | None = None,
    *,
    require_image: bool = True,
) -> Iterator[RegionSample]:
    """Stream valid samples from shards, skipping and counting malformed ones.

    Args:
        paths: shard paths, or anything :func:`list_shards` accepts.
        decode_images: ``True`` gives ``sample.image`` as an RGB PIL image (checked against the json
            ``width x height``); ``False`` gives the encoded bytes, undecoded and unchecked.
        skipped: where skips are counted (reasons: ``missing_json``, ``bad_json``, ``invalid_sample``,
            ``missing_image``, ``bad_image``, ``size_mismatch``, ``duplicate_member``, ``duplicate_key``,
            ``stray_member``, ``bad_shard``); a fresh private counter when ``None``.
        require_image: when ``False``, samples without an image member are yielded with
            ``image=None`` (annotation-only shards) instead of being skipped.
    """
    if skipped is None:
        skipped = SkipCounter("samples")
    if isinstance(paths, (str, os.PathLike)):
        paths = list_shards(paths)
    for path in paths:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard {path!r} does not exist")
        seen: set[str] = set()
        try:
            for key, group in iter_tar_groups(path, skipped):
                if key in seen:
                    skipped.skip("duplicate_key", key, f"key appears twice in {path}")
                    continue
                seen.add(key)
                sample = _group_to_sample(key, group, decode_images, require_image, skipped)
                if sample is not None:
                    yield sample
        except (tarfile.TarError, EOFError, OSError) as err:
            # a truncated/corrupt shard: everything read before the damage has been yielded
            skipped.skip("bad_shard", path, repr(err))
