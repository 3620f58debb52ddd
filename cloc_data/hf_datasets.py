"""Reading region-text shards with Hugging Face ``datasets`` (the ``"webdataset"`` builder): for
corpora streamed from disk or a hub, as an alternative to the plain reader in :mod:`cloc_data.shards`."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from PIL import Image

from cloc_data.format import MalformedSample, RegionSample
from cloc_data.shards import IMAGE_EXTENSIONS, decode_image, list_shards


def hf_features():
    """The explicit ``datasets.Features`` of a shard row.

    Declared rather than inferred: the builder would otherwise infer a struct schema for ``json``
    from the first 5 samples and silently drop ``meta``/region keys that first appear later; with
    ``Json()`` every key survives. Caveat: ``datasets`` stores ``Json`` with pandas' ujson, which
    rounds floats to 10 decimal places (1e-10 px on a box: harmless, but not bit-identical to the
    plain reader). Image columns absent from a sample are ``None``.
    """
    import datasets

    features = {
        "__key__": datasets.Value("string"),
        "__url__": datasets.Value("string"),
        "json": datasets.Json(),
        "txt": datasets.Value("string"),
    }
    features.update({ext: datasets.Image() for ext in IMAGE_EXTENSIONS})
    return datasets.Features(features)


def load_hf_dataset(
    paths: str | os.PathLike | Sequence[str | os.PathLike], streaming: bool = True, **load_kwargs: Any
):
    """Load shards with Hugging Face ``datasets`` (``"webdataset"`` builder, split ``"train"``).

    Returns an ``IterableDataset`` (``streaming=True``) or a ``Dataset``; turn its rows into samples
    with :func:`hf_record_to_sample`. Works offline on local files. ``load_kwargs`` go to
    ``datasets.load_dataset`` (e.g. ``cache_dir`` for the non-streaming Arrow cache).
    """
    import datasets

    shard_paths = [os.path.abspath(p) for p in list_shards(paths)]
    if not shard_paths:
        raise FileNotFoundError(f"no shards found in {paths!r}")
    return datasets.load_dataset(
        "webdataset",
        data_files={"train": shard_paths},
        split="train",
        streaming=streaming,
        features=hf_features(),
        **load_kwargs,
    )


def hf_record_to_sample(record: dict[str, Any], require_image: bool = True) -> RegionSample:
    """Turn one ``datasets`` row (``json``, ``txt``, ``jpg``/``png``/``webp``, ``__key__``) into a sample.

    ``record["json"]`` may be a dict or a JSON string; the image a PIL image, ``{"bytes", "path"}`` or
    raw bytes; it is converted to RGB. Raises :class:`MalformedSample` naming the key for a row that
    is not a valid sample (missing/invalid json, missing image when ``require_image``, size mismatch).
    """
    key = record.get("__key__", "?")
    raw = record.get("json")
    if raw is None:
        raise MalformedSample(f"row {key!r} has no json record")
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except ValueError as err:
            raise MalformedSample(f"row {key!r}: bad json: {err}") from err
    if not isinstance(raw, dict):
        raise MalformedSample(f"row {key!r}: json is {type(raw).__name__}, not an object")
    sample = RegionSample.from_json(raw)
    image = next((record[k] for k in ("jpg", "jpeg", "png", "webp") if record.get(k) is not None), None)
    if image is None:
        if require_image:
            raise MalformedSample(f"row {key!r} has no image")
        return sample
    if isinstance(image, dict):
        image = image.get("bytes")
    try:
        if isinstance(image, (bytes, bytearray)):
            image = decode_image(bytes(image))
        elif isinstance(image, Image.Image):
            image = image.convert("RGB")
        else:
            raise TypeError(f"unsupported image value of type {type(image).__name__}")
    except Exception as err:
        raise MalformedSample(f"row {key!r}: image cannot be decoded: {err!r}") from err
    if image.size != (sample.width, sample.height):
        raise MalformedSample(
            f"row {key!r}: image is {image.size[0]}x{image.size[1]}, json says {sample.width}x{sample.height}"
        )
    sample.image = image
    return sample


__all__ = ["hf_features", "hf_record_to_sample", "load_hf_dataset"]
