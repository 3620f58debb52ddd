"""VESL inputs: a folder of images or region-text shards, split into deterministic chunks.

A chunk is the unit of resumable work: the pipeline turns chunk ``i`` into one output shard
``{prefix}-{i:06d}.tar``. Chunks depend only on the input listing (sorted), so every process and
every re-run agrees on them.

* Folder input: image files (``.jpg .jpeg .png .webp``, any case, recursive), sorted by relative path,
  cut into chunks of ``chunk_size``. Keys come from the relative path (``a/b/cat.jpg`` ->
  ``a_b_cat``); the path is kept in ``meta["source_path"]``. An existing caption is read from the
  ``.txt`` file beside the image (``a/b/cat.txt``), if any.
* Shard input (a shard, a folder of ``*.tar``, a glob or a list): one chunk per input shard. Samples
  keep their key, caption, meta and (optionally) their regions.

Each item is yielded as ``(sample, rgb_image)``: ``sample.image`` holds the original encoded bytes
(written to the output unchanged, so boxes stay in the pixel frame of the stored file; no EXIF
rotation is applied anywhere) and ``rgb_image`` is the decoded RGB PIL image the models see.
Unreadable images are skipped and counted, never fatal.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from cloc_data.format import RegionSample
from cloc_data.shards import SkipCounter, detect_image_extension, iter_shard_samples, list_shards

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
INPUT_FORMATS = ("auto", "images", "shards")


@dataclass(frozen=True)
class Chunk:
    """``index``: position in the input's chunk list; ``items``: image paths, or one shard path."""

    index: int
    items: tuple[str, ...]


def assign_chunks(num_chunks: int, process_index: int, num_processes: int) -> list[int]:
    """Chunk indices for one process: round-robin, so ranks get equal shares and never overlap."""
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} is outside [0, {num_processes})")
    return list(range(process_index, num_chunks, num_processes))


def decode_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def _fingerprint(names: list[str]) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode("utf-8") + b"\n")
    return digest.hexdigest()[:16]


def _keys_for(rel_paths: list[str]) -> list[str]:
    """Shard keys (no '.', '/') from relative paths; same-stem files get their suffix, then a counter."""

    def clean(text: str) -> str:
        return re.sub(r"[^0-9A-Za-z_-]+", "_", text).strip("_") or "image"

    keys = [clean(os.path.splitext(p)[0]) for p in rel_paths]
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    keys = [clean(p) if counts[k] > 1 else k for k, p in zip(keys, rel_paths)]
    seen: dict[str, int] = {}
    unique = []
    for k in keys:
        n = seen.get(k, 0)
        seen[k] = n + 1
        unique.append(k if n == 0 else f"{k}_{n}")
    return unique


class ImageFolderSource:
    """Image files under ``root`` (recursive, sorted), in chunks of ``chunk_size``."""

    kind = "images"

    def __init__(self, root: str | os.PathLike, chunk_size: int = 1000):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist")
        rel_paths = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for name in filenames:
                if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                    rel_paths.append(Path(dirpath, name).relative_to(self.root).as_posix())
        if not rel_paths:
            raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images found under {str(self.root)!r}")
        self.rel_paths = sorted(rel_paths)
        self.keys = dict(zip(self.rel_paths, _keys_for(self.rel_paths)))
        self.chunk_size = chunk_size

    @property
    def num_items(self) -> int:
        return len(self.rel_paths)

    def fingerprint(self) -> str:
        return _fingerprint(self.rel_paths)

    def chunks(self) -> list[Chunk]:
        n = self.chunk_size
        return [Chunk(i // n, tuple(self.rel_paths[i : i + n])) for i in range(0, len(self.rel_paths), n)]

    def iter_chunk(self, chunk: Chunk, skipped: SkipCounter) -> Iterator[tuple[RegionSample, Image.Image]]:
        for rel in chunk.items:
            path = self.root / rel
            try:
                data = path.read_bytes()
                image = decode_rgb(data)
            except Exception as err:  # PIL raises many types for corrupt or truncated files
                skipped.skip("unreadable_image", rel, repr(err))
                continue
            caption_file = path.with_suffix(".txt")
            caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
            # the bytes are stored unchanged when the shard format knows them, else the decoded image
            stored: Any = data if detect_image_extension(data) is not None else image
            sample = RegionSample(
                key=self.keys[rel],
                caption=caption,
                width=image.width,
                height=image.height,
                meta={"source_path": rel},
                image=stored,
            )
            yield sample, image


class ShardInputSource:
    """Region-text shards (anything :func:`cloc_data.shards.list_shards` accepts); a chunk per shard."""

    kind = "shards"

    def __init__(self, spec: str | os.PathLike | list):
        self.shards = list_shards(spec)
        if not self.shards:
            raise FileNotFoundError(f"no .tar shards found in {spec!r}")

    @property
    def num_items(self) -> int:
        return len(self.shards)

    def fingerprint(self) -> str:
        return _fingerprint([os.path.basename(p) for p in self.shards])

    def chunks(self) -> list[Chunk]:
        return [Chunk(i, (path,)) for i, path in enumerate(self.shards)]

    def iter_chunk(self, chunk: Chunk, skipped: SkipCounter) -> Iterator[tuple[RegionSample, Image.Image]]:
        for sample in iter_shard_samples(list(chunk.items), decode_images=False, skipped=skipped):
            try:
                image = decode_rgb(sample.image)
            except Exception as err:
                skipped.skip("unreadable_image", sample.key, repr(err))
                continue
            if image.size != (sample.width, sample.height):
                skipped.skip(
                    "size_mismatch",
                    sample.key,
                    f"image is {image.width}x{image.height}, json says {sample.width}x{sample.height}",
                )
                continue
            yield sample, image


def open_source(spec: str | os.PathLike, input_format: str = "auto", chunk_size: int = 1000):
    """An :class:`ImageFolderSource` or :class:`ShardInputSource` for ``spec``.

    ``"auto"``: shards when ``spec`` is a ``.tar`` file, a glob, or a folder with ``*.tar`` files at
    its top level; otherwise a folder of images.
    """
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input format {input_format!r} is not one of {INPUT_FORMATS}")
    if input_format == "auto":
        text = os.fspath(spec)
        is_dir = os.path.isdir(text)
        if is_dir:
            input_format = "shards" if any(n.endswith(".tar") for n in os.listdir(text)) else "images"
        elif os.path.isfile(text) or any(c in text for c in "*?["):
            input_format = "shards"
        else:
            raise FileNotFoundError(f"input {text!r} is neither a folder, a shard file nor a glob")
    if input_format == "images":
        return ImageFolderSource(spec, chunk_size=chunk_size)
    return ShardInputSource(spec)
