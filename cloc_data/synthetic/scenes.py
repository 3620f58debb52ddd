"""One synthetic scene: layout, drawing, alt-text caption, referring expressions, region labels.

Every image draws from its own random streams, derived from ``(config.seed, split, index)``:

* the *scene* stream decides everything visible and the caption, so the same config and seed give
  byte-identical images, and the splits (different stream families) never share an image;
* the *noise* stream decides the pseudo-label noise, so turning the noise knobs on changes the
  region labels and nothing else.

:func:`generate_scene` builds image ``index`` of a split on its own (random access); :func:`generate_split`
streams the first ``n``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from cloc_data.format import Region, RegionSample
from cloc_data.synthetic.config import SPLITS, SyntheticSceneConfig, check_split, class_index, num_classes
from cloc_data.synthetic.shapes import BACKGROUND_WORDS, draw_background, plural, shape_mask
from cloc_hf.box_ops import box_iou

DATASET_NAME = "synthetic"
# Rejection-sampling budgets: positions tried per object, whole layouts tried per image.
PLACEMENT_TRIES = 40
LAYOUT_TRIES = 20
_SCENE_STREAM, _NOISE_STREAM = 0, 1
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
# Relation words for (object is the minimum, object is the maximum) along each axis; the second pair
# is for groups of three or more look-alikes.
_RELATION_WORDS = {
    "horizontal": (("left", "right"), ("leftmost", "rightmost")),
    "vertical": (("upper", "lower"), ("topmost", "bottommost")),
    "size": (("smaller", "larger"), ("smallest", "largest")),
}


@dataclass
class SceneObject:
    """One drawn object. ``box`` is its tight pixel box (xyxy, pixel edges: ``x2``/``y2`` exclusive)."""

    instance_id: int
    shape: str
    colour: str
    size: str  # size class name
    side: int  # side of the square canvas the shape is drawn on, px
    origin: tuple[int, int]  # canvas top-left (x, y)
    box: tuple[int, int, int, int]
    rgb: tuple[int, int, int]
    area: int  # pixels of the shape
    class_id: int
    mention: str | None = None  # how the caption names it ("a circle"), None when not mentioned
    ref: dict[str, Any] | None = None  # {"sent", "needs_context", "relation"}, None when ambiguous

    def phrase(self, with_size: bool, with_colour: bool = True) -> str:
        words = (
            ["a"] + ([self.size] if with_size else []) + ([self.colour] if with_colour else []) + [self.shape]
        )
        return " ".join(words)

    @property
    def centre(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2

    def to_json(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "side": self.side,
            "origin": list(self.origin),
            "box": list(self.box),
            "rgb": list(self.rgb),
            "area": self.area,
            "class_id": self.class_id,
            "mention": self.mention,
            "ref": self.ref,
        }


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:08d}"


def _rng(config: SyntheticSceneConfig, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, SPLITS.index(split), index, stream])


# --- layout -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _dilated(shape: str, side: int) -> np.ndarray:
    """The mask grown by one pixel in all 8 directions, on a canvas one pixel larger on each side:
    marking it as occupied keeps a 1 px gap, so two same-colour objects never merge into one blob."""
    mask = shape_mask(shape, side).mask
    out = np.zeros((side + 2, side + 2), dtype=bool)
    for dy in range(3):
        for dx in range(3):
            out[dy : dy + side, dx : dx + side] |= mask
    out.setflags(write=False)
    return out


def _place(
    rng: np.random.Generator,
    config: SyntheticSceneConfig,
    shape: str,
    occupied: np.ndarray,
    boxes: list[tuple[int, int, int, int]],
) -> tuple[str, int, int, int] | None:
    """Find ``(size_class, side, x0, y0)`` where ``shape`` touches no object and overlaps none's box
    beyond ``max_box_iou``; ``None`` after :data:`PLACEMENT_TRIES` rejected draws."""
    size_names = list(config.size_classes)
    for _ in range(PLACEMENT_TRIES):
        size = size_names[int(rng.integers(len(size_names)))]
        lo, hi = config.size_range_px(size)
        side = int(rng.integers(lo, hi + 1))
        x0 = int(rng.integers(0, config.image_size - side + 1))
        y0 = int(rng.integers(0, config.image_size - side + 1))
        drawn = shape_mask(shape, side)
        # occupied is padded by one pixel, hence the +1 offsets
        if (occupied[y0 + 1 : y0 + 1 + side, x0 + 1 : x0 + 1 + side] & drawn.mask).any():
            continue
        if boxes:
            bx1, by1, bx2, by2 = drawn.box
            new = torch.tensor([[x0 + bx1, y0 + by1, x0 + bx2, y0 + by2]], dtype=torch.float32)
            if float(box_iou(new, torch.tensor(boxes, dtype=torch.float32)).max()) > config.max_box_iou:
                continue
        return size, side, x0, y0
    return None


def _pick_kind(
    rng: np.random.Generator, config: SyntheticSceneConfig, objects: list[SceneObject]
) -> tuple[str, str]:
    if objects and rng.random() < config.duplicate_prob:
        twin = objects[int(rng.integers(len(objects)))]
        return twin.shape, twin.colour
    colours = list(config.colours)
    return config.shapes[int(rng.integers(len(config.shapes)))], colours[int(rng.integers(len(colours)))]


def layout_scene(rng: np.random.Generator, config: SyntheticSceneConfig) -> list[SceneObject]:
    """Objects of one image: non-touching, inside the image, box IoU at most ``max_box_iou``.

    The object count is drawn first; a layout that cannot hold that many is redrawn up to
    :data:`LAYOUT_TRIES` times, after which the fullest one found is used (at least ``min_objects``).
    """
    target = int(rng.integers(config.min_objects, config.max_objects + 1))
    size = config.image_size
    best: list[SceneObject] = []
    for _ in range(LAYOUT_TRIES):
        objects: list[SceneObject] = []
        occupied = np.zeros((size + 2, size + 2), dtype=bool)
        for _ in range(target):
            shape, colour = _pick_kind(rng, config, objects)
            placed = _place(rng, config, shape, occupied, [o.box for o in objects])
            if placed is None:
                break  # crowded: start a new layout
            size_class, side, x0, y0 = placed
            drawn = shape_mask(shape, side)
            occupied[y0 : y0 + side + 2, x0 : x0 + side + 2] |= _dilated(shape, side)
            base = np.asarray(config.colours[colour])
            rgb = np.clip(
                base + rng.integers(-config.colour_jitter, config.colour_jitter + 1, size=3), 0, 255
            )
            bx1, by1, bx2, by2 = drawn.box
            objects.append(
                SceneObject(
                    instance_id=len(objects),
                    shape=shape,
                    colour=colour,
                    size=size_class,
                    side=side,
                    origin=(x0, y0),
                    box=(x0 + bx1, y0 + by1, x0 + bx2, y0 + by2),
                    rgb=tuple(int(c) for c in rgb),
                    area=drawn.area,
                    class_id=class_index(config, shape, colour),
                )
            )
        if len(objects) == target:
            return objects
        if len(objects) > len(best):
            best = objects
    # crowded: accept the fullest layout found, as long as it holds min_objects
    if len(best) >= config.min_objects:
        return best
    raise RuntimeError(
        f"could not place {config.min_objects} objects in a {size}x{size} image after {LAYOUT_TRIES} "
        "layouts: lower SyntheticSceneConfig.min_objects or size_classes, or raise image_size / max_box_iou"
    )


def render_scene(
    rng: np.random.Generator, config: SyntheticSceneConfig, objects: list[SceneObject], background: str
) -> np.ndarray:
    """``(image_size, image_size, 3)`` uint8 image: the background, then each object's flat colour."""
    image = draw_background(
        rng,
        background,
        config.image_size,
        config.background_range,
        config.background_tint,
        config.background_noise_std,
    ).copy()
    for obj in objects:
        x0, y0 = obj.origin
        canvas = image[y0 : y0 + obj.side, x0 : x0 + obj.side]
        canvas[shape_mask(obj.shape, obj.side).mask] = obj.rgb
    return image


# --- language -------------------------------------------------------------------------------------


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def write_caption(
    rng: np.random.Generator, config: SyntheticSceneConfig, objects: list[SceneObject], background: str
) -> str:
    """Alt-text naming 1-2 (configurable) of the objects; sets ``obj.mention`` on the ones named."""
    wanted = int(rng.integers(config.caption_min_mentions, config.caption_max_mentions + 1))
    chosen = rng.permutation(len(objects))[: min(wanted, len(objects))]
    mentions: list[str] = []
    for i in chosen:
        obj = objects[int(i)]
        shape_only = rng.random() < config.attribute_only_prob
        obj.mention = obj.phrase(config.size_in_phrase, with_colour=not shape_only)
        mentions.append(obj.mention)
    # identical mentions read as a count: "two red circles"
    counts: dict[str, int] = {}
    for mention in mentions:
        counts[mention] = counts.get(mention, 0) + 1
    parts = []
    for mention, count in counts.items():
        if count == 1:
            parts.append(mention)
        else:
            words = mention.split(" ")[1:]  # drop the article
            number = _NUMBER_WORDS.get(count, str(count))
            parts.append(" ".join([number, *words[:-1], plural(words[-1])]))
    template = config.caption_templates[int(rng.integers(len(config.caption_templates)))]
    return template.format(objects=_join(parts), background=BACKGROUND_WORDS[background])


def _relations(
    obj: SceneObject, others: list[SceneObject], config: SyntheticSceneConfig
) -> list[tuple[str, str]]:
    """``(relation, word)`` pairs that single ``obj`` out among its look-alikes ``others``."""
    margin = config.referring_margin * config.image_size
    ratio = config.referring_size_ratio
    many = len(others) >= 2
    found = []
    for relation in config.referring_relations:
        (smaller, larger), (smallest, largest) = _RELATION_WORDS[relation]
        low_word, high_word = (smallest, largest) if many else (smaller, larger)
        if relation == "size":
            if all(obj.side >= ratio * o.side for o in others):
                found.append((relation, high_word))
            elif all(o.side >= ratio * obj.side for o in others):
                found.append((relation, low_word))
            continue
        axis = 0 if relation == "horizontal" else 1
        mine = obj.centre[axis]
        theirs = [o.centre[axis] for o in others]
        if mine + margin <= min(theirs):
            found.append((relation, low_word))
        elif mine - margin >= max(theirs):
            found.append((relation, high_word))
    return found


def assign_referring_expressions(
    rng: np.random.Generator, config: SyntheticSceneConfig, objects: list[SceneObject]
) -> None:
    """Set ``obj.ref``: "the red circle" when its kind is unique in the image (``needs_context``
    False), else a spatial or size disambiguation ("the left red circle", "the larger blue square")
    drawn among those that hold; ``None`` when none holds."""
    for obj in objects:
        twins = [o for o in objects if o is not obj and o.class_id == obj.class_id]
        if not twins:
            obj.ref = {"sent": f"the {obj.colour} {obj.shape}", "needs_context": False, "relation": None}
            continue
        options = _relations(obj, twins, config)
        if not options:
            obj.ref = None
            continue
        relation, word = options[int(rng.integers(len(options)))]
        obj.ref = {"sent": f"the {word} {obj.colour} {obj.shape}", "needs_context": True, "relation": word}


# --- region labels ------------------------------------------------------------------------------------


def _jitter_box(
    rng: np.random.Generator, box, fraction: float, size: int
) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    offsets = rng.uniform(-fraction, fraction, size=4) * np.array([w, h, w, h])
    nx1, ny1, nx2, ny2 = np.clip(np.array([x1, y1, x2, y2]) + offsets, 0, size)
    # a large jitter can flip or empty a box: keep at least 1 px around the jittered centre
    if nx2 - nx1 < 1:
        cx = min(max((nx1 + nx2) / 2, 0.5), size - 0.5)
        nx1, nx2 = cx - 0.5, cx + 0.5
    if ny2 - ny1 < 1:
        cy = min(max((ny1 + ny2) / 2, 0.5), size - 0.5)
        ny1, ny2 = cy - 0.5, cy + 0.5
    return tuple(round(float(v), 3) for v in (nx1, ny1, nx2, ny2))


def region_labels(
    rng: np.random.Generator, config: SyntheticSceneConfig, objects: list[SceneObject], noisy: bool
) -> list[Region]:
    """Region labels for ``regions_for`` objects, with pseudo-label noise when ``noisy``.

    Three numbers are drawn per object whatever the knobs, so each noise kind hits the same objects
    whether or not the others are on.
    """
    total = num_classes(config)
    regions = []
    for obj in objects:
        if config.regions_for == "mentioned" and obj.mention is None:
            continue
        draws = rng.random(3)
        box: tuple[float, ...] = tuple(float(v) for v in obj.box)
        phrase = obj.phrase(config.size_in_phrase)
        if config.region_phrase == "mention" and obj.mention is not None:
            phrase = obj.mention
        if noisy:
            if draws[0] < config.missed_region_prob:
                continue
            if draws[1] < config.wrong_phrase_prob and total > 1:
                wrong = int(rng.integers(total - 1))
                wrong += wrong >= obj.class_id
                shape = config.shapes[wrong // len(config.colours)]
                colour = list(config.colours)[wrong % len(config.colours)]
                phrase = " ".join(["a"] + ([obj.size] if config.size_in_phrase else []) + [colour, shape])
            if config.box_jitter > 0:
                box = _jitter_box(rng, obj.box, config.box_jitter, config.image_size)
        regions.append(
            Region(
                box=box,
                phrase=phrase,
                score=None,
                source=DATASET_NAME,
                meta={
                    "shape": obj.shape,
                    "colour": obj.colour,
                    "size": obj.size,
                    "class_id": obj.class_id,
                    "instance_id": obj.instance_id,
                },
            )
        )
    return regions


# --- public entry points ----------------------------------------------------------------------------


def generate_scene(config: SyntheticSceneConfig, split: str, index: int) -> RegionSample:
    """Image ``index`` of ``split`` as a :class:`RegionSample` (``image`` an RGB PIL image).

    ``sample.meta["objects"]`` lists every object (also the unlabelled and unmentioned ones) with its
    clean box, attributes, drawing parameters, caption mention and referring expression; region
    ``meta`` holds the true attributes even when the phrase was corrupted by ``wrong_phrase_prob``.
    """
    check_split(split)
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    rng = _rng(config, split, index, _SCENE_STREAM)
    background = config.backgrounds[int(rng.integers(len(config.backgrounds)))]
    objects = layout_scene(rng, config)
    pixels = render_scene(rng, config, objects, background)
    caption = write_caption(rng, config, objects, background)
    assign_referring_expressions(rng, config, objects)
    noisy = split in config.noise_splits
    regions = region_labels(_rng(config, split, index, _NOISE_STREAM), config, objects, noisy)
    return RegionSample(
        key=sample_key(split, index),
        caption=caption,
        width=config.image_size,
        height=config.image_size,
        regions=regions,
        meta={
            "dataset": DATASET_NAME,
            "split": split,
            "index": index,
            "seed": config.seed,
            "background": background,
            "objects": [o.to_json() for o in objects],
        },
        image=Image.fromarray(pixels),
    )


def generate_split(
    config: SyntheticSceneConfig, split: str, n: int | None = None, start: int = 0
) -> Iterator[RegionSample]:
    """Stream images ``start .. start + n - 1`` of ``split`` (``n`` defaults to ``config.n_{split}``)."""
    config.validate()
    check_split(split)
    if n is None:
        n = config.split_size(split)
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    for index in range(start, start + n):
        yield generate_scene(config, split, index)
