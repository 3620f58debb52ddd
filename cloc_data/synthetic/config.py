"""The one configuration object of the synthetic scenes generator, and its class/attribute vocabulary.

Defaults give the demo's regime: 32x32 images, 5 very
distinct shapes x 6 colours = 30 classes, 1-3 objects, small 9-12 px / large 13-17 px, captions that
name 1-2 objects with 30% of the mentions shape-only. In that regime a ~1M-parameter model learns
every attribute within minutes on a CPU, which is what the project's demo needs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from cloc_data.synthetic.shapes import SHAPES

# Very distinct, saturated colours: backgrounds are low-saturation greys, so none of these can be
# mistaken for background. White/black/grey are deliberately absent for the same reason.
DEFAULT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 210, 30),
    "purple": (150, 50, 200),
    "cyan": (30, 200, 220),
}
# More named colours a harder regime can add (``colours={**DEFAULT_COLOURS, **EXTRA_COLOURS}``).
EXTRA_COLOURS: dict[str, tuple[int, int, int]] = {
    "orange": (245, 130, 20),
    "pink": (245, 120, 190),
    "brown": (130, 80, 30),
    "lime": (160, 230, 40),
}

DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")

# Side lengths as fractions of the image side, so a size class keeps its meaning at any image size:
# at 32 px these are exactly 9-12 px (small) and 13-17 px (large).
DEFAULT_SIZE_CLASSES: dict[str, tuple[float, float]] = {
    "small": (9 / 32, 12 / 32),
    "large": (13 / 32, 17 / 32),
}

BACKGROUND_STYLES: tuple[str, ...] = ("plain", "gradient", "noise")

DEFAULT_CAPTION_TEMPLATES: tuple[str, ...] = (
    "{objects}",
    "a picture with {objects}",
    "an image of {objects}",
    "a photo of {objects}",
    "{objects} on a {background} background",
)

REGIONS_FOR = ("all", "mentioned")
REGION_PHRASES = ("full", "mention")
SPLITS: tuple[str, ...] = ("train", "val", "test")
REFERRING_RELATIONS = ("horizontal", "vertical", "size")


@dataclass
class SyntheticSceneConfig:
    """Every knob of the synthetic scenes generator.

    Scene
        image_size (int, 32): side of the square RGB images, in pixels.
        shapes (tuple[str, ...], circle/square/triangle/cross/ring): shape names, each one of
            :data:`cloc_data.synthetic.shapes.SHAPES` (which also has diamond, hexagon, star).
        colours (dict[str, (r, g, b)], 6 colours): colour name -> RGB 0-255 (:data:`DEFAULT_COLOURS`).
        size_classes (dict[str, (lo, hi)], small 9-12 px / large 13-17 px at 32): object side range per
            size class, as fractions of ``image_size``; the side in pixels is drawn uniformly from the
            inclusive range :meth:`size_range_px`. Classes are picked with equal probability.
        min_objects / max_objects (int, 1 / 3): objects per image, uniform in the inclusive range.
            When a crowded config (big objects, many of them) cannot fit the drawn count after 20
            layouts, the fullest layout is used; fewer than ``min_objects`` raises ``RuntimeError``.
        duplicate_prob (float, 0.1): probability that an object copies the shape and colour of an
            earlier object of its image, so that some referring expressions need context.
        max_box_iou (float, 0.2): rejection-sampling cap on the IoU of two objects' boxes. Object
            masks never touch at all (1 px gap), so every object is fully visible.
        colour_jitter (int, 8): per-object uniform offset in ``[-j, j]`` added to each RGB channel.
        backgrounds (tuple[str, ...], plain/gradient/noise): background styles, picked uniformly.
        background_range ((int, int), (50, 200)): range of the grey levels of backgrounds.
        background_tint (int, 12): per-channel offset in ``[-t, t]`` that tints a background.
        background_noise_std (float, 10.0): std of the per-pixel noise of the ``noise`` style (which
            also has a coarse blotchy component of the same strength).

    Captions (web alt-text: they name only some objects)
        caption_min_mentions / caption_max_mentions (int, 1 / 2): objects a caption names, uniform in
            the inclusive range and capped by the objects present.
        attribute_only_prob (float, 0.3): probability that a mention names only the shape
            ("a circle" instead of "a red circle").
        caption_templates (tuple[str, ...], :data:`DEFAULT_CAPTION_TEMPLATES`): each holds ``{objects}`` and may hold ``{background}``
            ("plain", "gradient" or "textured").
        size_in_phrase (bool, False): region phrases and caption mentions include the size class
            ("a large red circle").

    Region labels and pseudo-label noise
        regions_for ("all" | "mentioned", "all"): region labels for every object, or only for the
            objects the caption mentions (the calibration's "regions only for mentioned objects").
        region_phrase ("full" | "mention", "full"): a region's phrase is always the full description
            ("a red circle"), or, for objects the caption mentions, the caption's own wording ("a circle"
            when the mention is shape-only), as VESL's noun phrases would be; unmentioned objects keep
            the full description.
        box_jitter (float, 0.0): each box coordinate moves by a uniform offset in ``[-j, j]`` times the
            box width (x) or height (y), then is clipped to the image.
        missed_region_prob (float, 0.0): probability that an object's region label is dropped.
        wrong_phrase_prob (float, 0.0): probability that a region's phrase names another
            shape/colour class (its meta keeps the true attributes).
        noise_splits (tuple[str, ...], ("train",)): splits the three noise knobs apply to; evaluation
            splits stay clean by default.

    Referring expressions (``"the left red circle"``)
        referring_margin (float, 0.1): two same-kind objects are told apart by position only when
            their box centres differ by at least this fraction of ``image_size`` on that axis.
        referring_size_ratio (float, 1.2): ... and by size only when one side is at least this
            many times the other.
        referring_relations (tuple[str, ...], horizontal/vertical/size): the disambiguations allowed;
            one is drawn at random among those that single the object out.

    Splits
        seed (int, 0): base seed; each split and each image draws from its own stream derived from
            it, so splits never share an image and ``generate_split(..., n)`` is a prefix of any
            longer run.
        n_train / n_val / n_test (int, 30000 / 1000 / 1000): default split sizes of
            :func:`~cloc_data.synthetic.export.write_synthetic_dataset`.
    """

    image_size: int = 32
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    colours: dict[str, tuple[int, int, int]] = field(default_factory=lambda: dict(DEFAULT_COLOURS))
    size_classes: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_SIZE_CLASSES))
    min_objects: int = 1
    max_objects: int = 3
    duplicate_prob: float = 0.1
    max_box_iou: float = 0.2
    colour_jitter: int = 8
    backgrounds: tuple[str, ...] = BACKGROUND_STYLES
    background_range: tuple[int, int] = (50, 200)
    background_tint: int = 12
    background_noise_std: float = 10.0

    caption_min_mentions: int = 1
    caption_max_mentions: int = 2
    attribute_only_prob: float = 0.3
    caption_templates: tuple[str, ...] = DEFAULT_CAPTION_TEMPLATES
    size_in_phrase: bool = False

    regions_for: str = "all"
    region_phrase: str = "full"
    box_jitter: float = 0.0
    missed_region_prob: float = 0.0
    wrong_phrase_prob: float = 0.0
    noise_splits: tuple[str, ...] = ("train",)

    referring_margin: float = 0.1
    referring_size_ratio: float = 1.2
    referring_relations: tuple[str, ...] = REFERRING_RELATIONS

    seed: int = 0
    n_train: int = 30000
    n_val: int = 1000
    n_test: int = 1000

    def __post_init__(self):
        # JSON round trips turn tuples into lists; normalise so equal configs compare equal.
        for name in ("shapes", "backgrounds", "caption_templates", "noise_splits", "referring_relations"):
            setattr(self, name, tuple(getattr(self, name)))
        self.colours = {str(k): tuple(int(c) for c in v) for k, v in dict(self.colours).items()}
        self.size_classes = {str(k): tuple(float(f) for f in v) for k, v in dict(self.size_classes).items()}
        self.background_range = tuple(self.background_range)
        self.validate()

    # --- validation -----------------------------------------------------------------------------
    def validate(self) -> SyntheticSceneConfig:
        """Raise ``ValueError`` naming the bad field; returns ``self`` when the config is usable."""

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SyntheticSceneConfig.{name}: {why} (got {getattr(self, name)!r})")

        self._check_vocabulary(bad)
        self._check_scenes(bad)
        self._check_texts_and_splits(bad)
        return self

    def _check_vocabulary(self, bad) -> None:
        """Shapes, colours and size classes."""
        if not isinstance(self.image_size, int) or self.image_size < 8:
            raise bad("image_size", "must be an integer >= 8")
        if not self.shapes:
            raise bad("shapes", "needs at least one shape")
        for shape in self.shapes:
            if shape not in SHAPES:
                raise bad("shapes", f"unknown shape {shape!r}; known shapes: {sorted(SHAPES)}")
        if len(set(self.shapes)) != len(self.shapes):
            raise bad("shapes", "contains a shape twice")
        if not self.colours:
            raise bad("colours", "needs at least one colour")
        for name, rgb in self.colours.items():
            if not name.strip() or " " in name:
                raise bad("colours", f"colour name {name!r} must be one non-empty word")
            if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
                raise bad("colours", f"colour {name!r} must be 3 integers in 0..255")
        if len(set(self.colours.values())) != len(self.colours):
            raise bad("colours", "two colour names share one RGB value")
        if not self.size_classes:
            raise bad("size_classes", "needs at least one size class")
        for name, frac in self.size_classes.items():
            if len(frac) != 2 or not 0 < frac[0] <= frac[1] <= 1:
                raise bad("size_classes", f"size class {name!r} must be (lo, hi) with 0 < lo <= hi <= 1")
            lo, hi = self.size_range_px(name)
            if lo < 3:
                raise bad(
                    "size_classes",
                    f"size class {name!r} gives objects under 3 px at image_size {self.image_size}",
                )

    def _check_scenes(self, bad) -> None:
        """Object counts, probabilities and backgrounds."""
        if not 1 <= self.min_objects:
            raise bad("min_objects", "must be >= 1")
        if self.max_objects < self.min_objects:
            raise bad("max_objects", f"must be >= min_objects ({self.min_objects})")
        if self.max_objects > 99:
            raise bad("max_objects", "must be <= 99 (annotation ids reserve 2 digits per image)")
        for name in ("duplicate_prob", "attribute_only_prob", "missed_region_prob", "wrong_phrase_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise bad(name, "must be a probability in [0, 1]")
        if not 0 <= self.max_box_iou <= 1:
            raise bad("max_box_iou", "must be in [0, 1]")
        if not 0 <= self.colour_jitter <= 64:
            raise bad("colour_jitter", "must be in [0, 64] so colour names stay true")
        if not self.backgrounds or any(b not in BACKGROUND_STYLES for b in self.backgrounds):
            raise bad("backgrounds", f"must be a non-empty subset of {BACKGROUND_STYLES}")
        lo, hi = self.background_range
        if not 0 <= lo <= hi <= 255:
            raise bad("background_range", "must be (lo, hi) grey levels with 0 <= lo <= hi <= 255")
        if not 0 <= self.background_tint <= 64:
            raise bad("background_tint", "must be in [0, 64]")
        if not 0 <= self.background_noise_std <= 64:
            raise bad("background_noise_std", "must be in [0, 64]")

    def _check_texts_and_splits(self, bad) -> None:
        """Captions, region phrases, referring expressions, seed and split sizes."""
        if not 1 <= self.caption_min_mentions:
            raise bad("caption_min_mentions", "must be >= 1")
        if self.caption_max_mentions < self.caption_min_mentions:
            raise bad(
                "caption_max_mentions", f"must be >= caption_min_mentions ({self.caption_min_mentions})"
            )
        if not self.caption_templates:
            raise bad("caption_templates", "needs at least one template")
        for template in self.caption_templates:
            if "{objects}" not in template:
                raise bad("caption_templates", f"template {template!r} has no '{{objects}}'")
            try:
                template.format(objects="x", background="y")
            except (KeyError, IndexError, ValueError) as err:
                raise bad("caption_templates", f"template {template!r} is not formattable: {err!r}") from err
        if self.regions_for not in REGIONS_FOR:
            raise bad("regions_for", f"must be one of {REGIONS_FOR}")
        if self.region_phrase not in REGION_PHRASES:
            raise bad("region_phrase", f"must be one of {REGION_PHRASES}")
        if not 0 <= self.box_jitter <= 1:
            raise bad("box_jitter", "must be a fraction of the box size in [0, 1]")
        for split in self.noise_splits:
            if split not in SPLITS:
                raise bad("noise_splits", f"unknown split {split!r}; splits are {SPLITS}")
        if not 0 <= self.referring_margin <= 1:
            raise bad("referring_margin", "must be a fraction of the image size in [0, 1]")
        if not self.referring_size_ratio >= 1:
            raise bad("referring_size_ratio", "must be >= 1")
        for relation in self.referring_relations:
            if relation not in REFERRING_RELATIONS:
                raise bad(
                    "referring_relations", f"unknown relation {relation!r}; known: {REFERRING_RELATIONS}"
                )
        if not isinstance(self.seed, int) or self.seed < 0:
            raise bad("seed", "must be a non-negative integer")
        for name in ("n_train", "n_val", "n_test"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")

    # --- derived values -------------------------------------------------------------------------
    def size_range_px(self, size_class: str) -> tuple[int, int]:
        """Inclusive ``(lo, hi)`` object side in pixels of ``size_class`` at ``image_size``."""
        lo, hi = self.size_classes[size_class]
        return max(1, round(lo * self.image_size)), max(1, min(self.image_size, round(hi * self.image_size)))

    def split_size(self, split: str) -> int:
        check_split(split)
        return getattr(self, f"n_{split}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; :meth:`from_dict` rebuilds an equal config."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
            elif isinstance(value, dict):
                out[key] = {k: list(v) for k, v in value.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SyntheticSceneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SyntheticSceneConfig has no field(s) {unknown}")
        return cls(**data)


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split


# --- class vocabulary: shape x colour ---------------------------------------------------------------


def num_classes(config: SyntheticSceneConfig) -> int:
    return len(config.shapes) * len(config.colours)


def class_index(config: SyntheticSceneConfig, shape: str, colour: str) -> int:
    """``class_id = shape_index * num_colours + colour_index`` (0-based; COCO ids are this + 1)."""
    try:
        return config.shapes.index(shape) * len(config.colours) + list(config.colours).index(colour)
    except ValueError as err:
        raise ValueError(f"({shape!r}, {colour!r}) is not a class of this config") from err


def class_attributes(config: SyntheticSceneConfig) -> list[dict[str, Any]]:
    """One dict per class, in ``class_id`` order: ``class_id``, ``name``, ``shape``, ``colour``."""
    colours = list(config.colours)
    return [
        {"class_id": s * len(colours) + c, "name": f"{colour} {shape}", "shape": shape, "colour": colour}
        for s, shape in enumerate(config.shapes)
        for c, colour in enumerate(colours)
    ]


def class_names(config: SyntheticSceneConfig) -> list[str]:
    """Plain class names in ``class_id`` order ("red circle", ...): the region-recognition prompts."""
    return [c["name"] for c in class_attributes(config)]


def attribute_values(config: SyntheticSceneConfig) -> dict[str, list[str]]:
    """The values each attribute takes: ``{"shape": [...], "colour": [...], "size": [...]}``."""
    return {"shape": list(config.shapes), "colour": list(config.colours), "size": list(config.size_classes)}


def per_attribute_accuracy(
    config: SyntheticSceneConfig,
    true_class_ids,
    predicted_class_ids,
    sizes=None,
) -> dict[str, Any]:
    """Accuracy of class predictions, overall and per attribute, for region-recognition reports.

    Args:
        true_class_ids / predicted_class_ids: sequences of ``class_id`` (same length).
        sizes: optional size class of each object; adds ``"by_size"``: class accuracy per size class.
    Returns:
        ``{"accuracy", "mean_class_accuracy", "shape", "colour"[, "by_size"]}``: ``shape``/``colour``
        count a prediction right when that attribute of the predicted class is the true one.
    """
    attrs = class_attributes(config)
    true_ids, pred_ids = [int(t) for t in true_class_ids], [int(p) for p in predicted_class_ids]
    if len(true_ids) != len(pred_ids):
        raise ValueError(f"{len(true_ids)} true class ids but {len(pred_ids)} predictions")
    if not true_ids:
        raise ValueError("no predictions to score")

    def mean(flags) -> float:
        flags = list(flags)
        return sum(flags) / len(flags) if flags else math.nan

    pairs = list(zip(true_ids, pred_ids))
    per_class: dict[int, list[bool]] = {}
    for t, p in pairs:
        per_class.setdefault(t, []).append(t == p)
    out: dict[str, Any] = {
        "accuracy": mean(t == p for t, p in pairs),
        "mean_class_accuracy": mean(mean(v) for v in per_class.values()),
        "shape": mean(attrs[t]["shape"] == attrs[p]["shape"] for t, p in pairs),
        "colour": mean(attrs[t]["colour"] == attrs[p]["colour"] for t, p in pairs),
    }
    if sizes is not None:
        sizes = list(sizes)
        if len(sizes) != len(pairs):
            raise ValueError(f"{len(sizes)} sizes for {len(pairs)} predictions")
        out["by_size"] = {
            size: mean(t == p for (t, p), s in zip(pairs, sizes) if s == size) for size in config.size_classes
        }
    return out
