"""Flickr30k Entities -> region samples.

Input: the dataset root with ``Sentences/{image_id}.txt``, ``Annotations/{image_id}.xml`` and the
split lists ``train.txt`` / ``val.txt`` / ``test.txt`` (image ids, one per line).

* A sentence line marks phrases as ``[/EN#18/people A man]``: entity id 18, types ``people`` (several
  types are ``/``-separated), phrase text ``A man``. The caption is the line with the markup removed;
  ``region.meta["span"]`` is the phrase's character span in that caption.
* An annotation file is Pascal-VOC-like: ``<size><width/><height/></size>`` and ``<object>``\\ s with
  one or more ``<name>`` (entity ids sharing the object) and either a ``<bndbox>`` (``xmin ymin xmax
  ymax``, 1-based inclusive pixel indices -> pixel xyxy ``(xmin - 1, ymin - 1, xmax, ymax)``) or
  ``<nobndbox>1</nobndbox>`` / ``<scene>1</scene>``. It is parsed with ``xml.etree.ElementTree``:
  acceptable for these local, trusted annotation files (``defusedxml`` is not a dependency).

Choices:

* An entity with several boxes ("two dogs") becomes, with ``boxes="union"`` (default), **one** region
  whose box is the union of its boxes -- the phrase names the group, so its region is the group's
  extent (MDETR's "merged boxes" protocol); with ``boxes="each"`` one region per box, all with the
  same phrase (``region.meta["box_index"]``).
* Phrases of non-visual entities (id 0 / type ``notvisual``), of entities without a box (``nobndbox``,
  scene-only) and of entities missing from the annotation are skipped and counted
  (``region_notvisual``, ``region_nobox``, ``region_scene``, ``region_unknown_entity``).
* ``per="image"`` (default): one sample per image; caption = first sentence, regions from all five
  sentences (a (entity, phrase) pair repeated across sentences is kept once), every sentence in
  ``meta["sentences"]``. ``per="sentence"``: one sample per sentence (key ``{image_id}_{i}``),
  caption = that sentence, its phrases only -- the phrase-grounding evaluation unit.

Region ``source`` is ``"human"``; ``meta`` holds ``entity_id``, ``phrase_type``, ``sentence``
(index) and ``span``. Every sample's ``meta["split"]`` is its split: the one asked for, or (all
annotated images) the split list that names the image, ``"unknown"`` for an image in none of
``train.txt`` / ``val.txt`` / ``test.txt`` -- so shards of every image can still be filtered by split.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cloc_data.converters.common import clean_sample, make_key
from cloc_data.format import Region, RegionSample
from cloc_data.shards import SkipCounter

_PHRASE = re.compile(r"\[/EN#(\d+)((?:/[^\s\]/]+)+)\s+([^\]]*)\]")
BOX_CHOICES = ("union", "each")
PER_CHOICES = ("image", "sentence")
SPLITS = ("train", "val", "test")  # the dataset's split lists, {root}/{split}.txt
UNKNOWN_SPLIT = "unknown"  # meta["split"] of an image that no split list names


@dataclass
class Phrase:
    text: str
    entity_id: str
    types: list[str]
    span: tuple[int, int]  # character span in the cleaned sentence


@dataclass
class Sentence:
    text: str
    phrases: list[Phrase] = field(default_factory=list)


def parse_sentence(line: str) -> Sentence:
    """``"[/EN#18/people A man] sits ."`` -> ``Sentence("A man sits .", [Phrase("A man", "18", ...)])``."""
    out, phrases, pos = [], [], 0
    length = 0
    for match in _PHRASE.finditer(line):
        before = line[pos : match.start()]
        out.append(before)
        length += len(before)
        text = match.group(3).strip()
        phrases.append(
            Phrase(text, match.group(1), match.group(2).strip("/").split("/"), (length, length + len(text)))
        )
        out.append(text)
        length += len(text)
        pos = match.end()
    out.append(line[pos:])
    return Sentence("".join(out), phrases)


def read_sentences(path: str | os.PathLike) -> list[Sentence]:
    with open(path, encoding="utf-8") as f:
        return [parse_sentence(line.strip()) for line in f if line.strip()]


@dataclass
class EntityAnnotation:
    width: int
    height: int
    boxes: dict[str, list[tuple[float, float, float, float]]]  # entity id -> pixel xyxy boxes
    nobox: set[str]
    scene: set[str]


def _int_text(parent: ET.Element, tag: str) -> int:
    node = parent.find(tag)
    if node is None or node.text is None:
        raise ValueError(f"<{parent.tag}> has no <{tag}>")
    return int(float(node.text))


def read_annotation(path: str | os.PathLike) -> EntityAnnotation:
    """Parse one ``Annotations/{id}.xml``; raises ``ValueError`` naming the file if it is malformed."""
    try:
        root = ET.parse(path).getroot()
        size = root.find("size")
        if size is None:
            raise ValueError("no <size>")
        ann = EntityAnnotation(_int_text(size, "width"), _int_text(size, "height"), {}, set(), set())
        for obj in root.iter("object"):
            names = [n.text.strip() for n in obj.findall("name") if n.text and n.text.strip()]
            bndbox = obj.find("bndbox")
            if bndbox is not None:
                xmin, ymin, xmax, ymax = (_int_text(bndbox, t) for t in ("xmin", "ymin", "xmax", "ymax"))
                box = (float(xmin - 1), float(ymin - 1), float(xmax), float(ymax))
                for name in names:
                    ann.boxes.setdefault(name, []).append(box)
                continue
            for name in names:
                if (obj.findtext("nobndbox") or "0").strip() not in ("", "0"):
                    ann.nobox.add(name)
                if (obj.findtext("scene") or "0").strip() not in ("", "0"):
                    ann.scene.add(name)
    except ET.ParseError as err:
        raise ValueError(f"{os.fspath(path)}: not well-formed XML: {err}") from err
    except ValueError as err:
        raise ValueError(f"{os.fspath(path)}: {err}") from err
    return ann


def _union(boxes: list[tuple[float, float, float, float]]) -> tuple[float, float, float, float]:
    """Smallest xyxy box containing all ``boxes``."""
    t = torch.tensor(boxes, dtype=torch.float64)
    return (*t[:, :2].min(0).values.tolist(), *t[:, 2:].max(0).values.tolist())


def _phrase_regions(
    phrase: Phrase, sentence_index: int, ann: EntityAnnotation, boxes: str, where: str, skipped: SkipCounter
) -> list[Region]:
    entity = phrase.entity_id
    if entity == "0" or "notvisual" in phrase.types:
        skipped.skip("region_notvisual", where, phrase.text)
        return []
    entity_boxes = ann.boxes.get(entity)
    if not entity_boxes:
        reason = "region_scene" if entity in ann.scene else "region_nobox" if entity in ann.nobox else None
        skipped.skip(reason or "region_unknown_entity", where, f"entity {entity}: {phrase.text!r}")
        return []
    meta = {
        "entity_id": entity,
        "phrase_type": phrase.types,
        "sentence": sentence_index,
        "span": list(phrase.span),
    }
    if boxes == "union":
        return [Region(_union(entity_boxes), phrase.text, source="human", meta=meta)]
    return [
        Region(box, phrase.text, source="human", meta={**meta, "box_index": i})
        for i, box in enumerate(entity_boxes)
    ]


def read_split_ids(root: str | os.PathLike, split: str) -> list[str]:
    path = Path(root) / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"split list {path} not found (expected train.txt / val.txt / test.txt)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def split_of_images(root: str | os.PathLike) -> dict[str, str]:
    """Image id -> split, from the split lists present in ``root`` (the first list naming an image wins)."""
    found: dict[str, str] = {}
    for split in SPLITS:
        if (Path(root) / f"{split}.txt").is_file():
            for image_id in read_split_ids(root, split):
                found.setdefault(image_id, split)
    return found


def iter_flickr30k(
    root: str | os.PathLike,
    skipped: SkipCounter,
    split: str | None = None,
    boxes: str = "union",
    per: str = "image",
) -> Iterator[RegionSample]:
    """Stream samples for the images of ``split`` (``{root}/{split}.txt``), or all annotated images
    (``split=None``; each sample's ``meta["split"]`` then comes from the split lists, see the module)."""
    if boxes not in BOX_CHOICES:
        raise ValueError(f"boxes must be one of {BOX_CHOICES}, got {boxes!r}")
    if per not in PER_CHOICES:
        raise ValueError(f"per must be one of {PER_CHOICES}, got {per!r}")
    root = Path(root)
    sentences_dir, annotations_dir = root / "Sentences", root / "Annotations"
    if not sentences_dir.is_dir() or not annotations_dir.is_dir():
        raise FileNotFoundError(f"{root} must contain Sentences/ and Annotations/")
    if split is not None:
        image_ids = read_split_ids(root, split)
        split_of = dict.fromkeys(image_ids, split)
    else:
        image_ids = sorted(p.stem for p in annotations_dir.glob("*.xml"))
        split_of = split_of_images(root)
    for image_id in image_ids:
        try:
            ann = read_annotation(annotations_dir / f"{image_id}.xml")
            sentences = read_sentences(sentences_dir / f"{image_id}.txt")
        except (OSError, ValueError, UnicodeDecodeError) as err:
            skipped.skip("bad_record", image_id, str(err))
            continue
        if not sentences:
            skipped.skip("bad_record", image_id, "no sentences")
            continue
        meta: dict[str, Any] = {
            "dataset": "flickr30k_entities",
            "image_id": image_id,
            "image_path": f"{image_id}.jpg",
            "split": split_of.get(image_id, UNKNOWN_SPLIT),
        }
        if per == "sentence":
            for i, sentence in enumerate(sentences):
                regions = [
                    r
                    for j, p in enumerate(sentence.phrases)
                    for r in _phrase_regions(p, i, ann, boxes, f"{image_id}:{i}:{j}", skipped)
                ]
                sample = RegionSample(
                    make_key(image_id, i),
                    sentence.text,
                    ann.width,
                    ann.height,
                    regions,
                    {**meta, "sentence": i},
                )
                sample = clean_sample(sample, skipped)
                if sample is not None:
                    yield sample
            continue
        regions, seen = [], set()
        for i, sentence in enumerate(sentences):
            for j, phrase in enumerate(sentence.phrases):
                ident = (phrase.entity_id, phrase.text.lower())
                if ident in seen:
                    continue
                seen.add(ident)
                regions.extend(_phrase_regions(phrase, i, ann, boxes, f"{image_id}:{i}:{j}", skipped))
        meta["sentences"] = [s.text for s in sentences]
        sample = RegionSample(make_key(image_id), sentences[0].text, ann.width, ann.height, regions, meta)
        sample = clean_sample(sample, skipped)
        if sample is not None:
            yield sample
