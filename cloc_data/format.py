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

Training and evaluation read the same samples: evaluation derives small per-task views from them
(:mod:`eval.region`, :mod:`eval.retrieval`, :mod:`eval.rec`) instead of a data model of its own.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from cloc_hf.box_ops import validate_boxes


class MalformedSample(ValueError):
    """A record that cannot become a valid sample; pipelines skip and count these."""


@dataclass
class Region:
    """One box and the text that names it.

    Attributes:
        box: xyxy in original-image pixels.
        phrase: the text naming the box (a class name, a noun phrase, a referring expression).
        score: detector confidence; ``None`` (default) for human labels.
        source: where the region comes from (``"human"``, ``"owlv2"``, ``"synthetic"``); ``None``
            (default) when unknown.
        meta: free-form per-region fields (``category_id``, ``ann_id``, ``sent_id``...); empty by default.
    """

    box: tuple[float, float, float, float]
    phrase: str
    score: float | None = None
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The region's JSON record (``meta`` only when not empty, to keep shards small)."""
        out = {"box": [float(v) for v in self.box], "phrase": self.phrase, "score": self.score, "source": self.source}
        if self.meta:
            out["meta"] = self.meta
        return out


@dataclass
class RegionSample:
    """One image, its caption and its regions (see the module docstring for the JSON layout).

    Attributes:
        key: unique within a dataset; the shard member name (``[A-Za-z0-9_-]``).
        caption: image-level text; ``""`` when the source has none (COCO instances, RefCOCO).
        width, height: the original image size in pixels, the frame of every region box.
        regions: the boxes and their phrases; empty by default.
        meta: free-form per-sample fields (``dataset``, ``split``, ``image_id``, ``image_path``...).
        image: a ``PIL.Image``, encoded bytes, or a file path; ``None`` (default) when only the
            annotations are carried (converters leave it ``None`` and put the path in ``meta["image_path"]``).
    """

    key: str
    caption: str
    width: int
    height: int
    regions: list[Region] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    image: Any = None

    def to_json(self) -> dict[str, Any]:
        """The sample's JSON record as written to ``KEY.json`` (the image is written beside it)."""
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
        """Raise :class:`MalformedSample` naming the bad item; returns ``self`` (unchanged) when valid.

        Boxes are checked by :func:`cloc_hf.box_ops.validate_boxes`, the project's one box check: 4
        finite numbers with ``x2 > x1`` and ``y2 > y1``. Where a box lies relative to the image is not
        checked here (``tolerance=inf``), so shards from any writer read as they always have; the
        converters clip or drop boxes outside the image (:func:`cloc_data.converters.common.clean_sample`)
        and the processor refuses boxes far outside its frame. Phrases must not be blank.
        """
        if self.width < 1 or self.height < 1:
            raise MalformedSample(
                f"sample {self.key!r}: image size {self.width}x{self.height} is not positive"
            )
        for i, region in enumerate(self.regions):
            if len(region.box) != 4:
                raise MalformedSample(f"sample {self.key!r} region {i}: box {region.box} is not 4 numbers")
            if not region.phrase.strip():
                raise MalformedSample(f"sample {self.key!r} region {i}: empty phrase")
        if self.regions:
            try:
                boxes = torch.tensor([list(r.box) for r in self.regions], dtype=torch.float64)
                validate_boxes(boxes, width=self.width, height=self.height, tolerance=math.inf)
            except (TypeError, ValueError):
                self._raise_for_bad_box()
        return self

    def _raise_for_bad_box(self) -> None:
        """Raise :class:`MalformedSample` naming the first region whose box fails the check."""
        for i, region in enumerate(self.regions):
            try:
                box = torch.tensor([list(region.box)], dtype=torch.float64)
            except (TypeError, ValueError) as err:
                bad = f"sample {self.key!r} region {i}: box {region.box} is not 4 numbers"
                raise MalformedSample(bad) from err
            try:
                validate_boxes(box, name="box", width=self.width, height=self.height, tolerance=math.inf)
            except ValueError as err:
                detail = str(err).replace("box[0]", "box", 1)
                raise MalformedSample(f"sample {self.key!r} region {i}: {detail}") from err

    def box_tensor(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The regions' boxes as one ``(n, 4)`` xyxy pixel tensor (``(0, 4)`` without regions).

        ``dtype`` defaults to float32, what the processor and the model take.
        """
        return torch.tensor([list(r.box) for r in self.regions], dtype=dtype).reshape(-1, 4)

    def as_dict(self) -> dict[str, Any]:
        """Every field as plain dicts and lists (``dataclasses.asdict``), image included."""
        return asdict(self)
