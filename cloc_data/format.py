"""The one region-text sample format used by every dataset, converter and loader in the project.

A sample is an image, an image-level caption and a list of regions. On disk a dataset is a folder of
webdataset-style tar shards (the layout img2dataset writes): for each sample ``KEY.jpg`` (or
``.png``/``.webp``), ``KEY.txt`` (the caption) and ``KEY.json``:

.. code-block:: json

    {"key": "000000001", "caption": "a red circle next to a blue square",
     "width": 640, "height": 480,
     "regions": [{"box": [10.0, 20.0, 110.0, 140.0], "phrase": "a red circle",
                  "score": 0.83, "source": "owlv2"}],
     "meta": {"dataset": "synthetic"}}

* ``box`` is **xyxy in original-image pixels** (see :mod:`cloc_hf.box_ops`); the loader maps it into
  the model frame with the processor's :class:`~cloc_hf.box_ops.FrameTransform`.
* ``score`` is a detector confidence (``null`` for human labels); ``source`` says where the region
  comes from (``"human"``, ``"owlv2"``, ``"synthetic"``...).
* ``meta`` is free-form (class ids, attributes, split, referring-expression ids...).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


class MalformedSample(ValueError):
    """A record that cannot become a valid sample; pipelines skip and count these."""


@dataclass
class Region:
    box: tuple[float, float, float, float]  # xyxy, original-image pixels
    phrase: str
    score: float | None = None
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {"box": [float(v) for v in self.box], "phrase": self.phrase, "score": self.score, "source": self.source}
        if self.meta:
            out["meta"] = self.meta
        return out


@dataclass
class RegionSample:
    key: str
    caption: str
    width: int
    height: int
    regions: list[Region] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    image: Any = None  # PIL.Image, encoded bytes, or None when only annotations are carried

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "caption": self.caption,
            "width": self.width,
            "height": self.height,
            "regions": [r.to_json() for r in self.regions],
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, record: dict[str, Any], image: Any = None) -> RegionSample:
        """Build and validate a sample from its JSON record; raises :class:`MalformedSample`."""
        try:
            key = str(record["key"])
            width, height = int(record["width"]), int(record["height"])
            regions = [
                Region(
                    box=tuple(float(v) for v in r["box"]),
                    phrase=str(r["phrase"]),
                    score=None if r.get("score") is None else float(r["score"]),
                    source=r.get("source"),
                    meta=dict(r.get("meta") or {}),
                )
                for r in record.get("regions") or []
            ]
        except (KeyError, TypeError, ValueError) as err:
            raise MalformedSample(f"sample {record.get('key', '?')!r}: {err!r}") from err
        sample = cls(
            key=key,
            caption=str(record.get("caption") or ""),
            width=width,
            height=height,
            regions=regions,
            meta=dict(record.get("meta") or {}),
            image=image,
        )
        sample.validate()
        return sample

    def validate(self) -> RegionSample:
        """Raise :class:`MalformedSample` naming the bad item; returns ``self`` when valid."""
        if self.width < 1 or self.height < 1:
            raise MalformedSample(f"sample {self.key!r}: image size {self.width}x{self.height} is not positive")
        for i, region in enumerate(self.regions):
            box = region.box
            if len(box) != 4 or not all(math.isfinite(v) for v in box):
                raise MalformedSample(f"sample {self.key!r} region {i}: box {box} is not 4 finite numbers")
            x1, y1, x2, y2 = box
            if x2 <= x1 or y2 <= y1:
                raise MalformedSample(f"sample {self.key!r} region {i}: box {box} is empty or flipped (xyxy)")
            if not region.phrase.strip():
                raise MalformedSample(f"sample {self.key!r} region {i}: empty phrase")
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
