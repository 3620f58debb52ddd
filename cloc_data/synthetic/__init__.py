"""Synthetic scenes: coloured shapes on textured backgrounds, with alt-text captions, region labels,
pseudo-label noise and referring expressions. The embedded default data of the project's CPU demo.

Quick start::

    from cloc_data.synthetic import SyntheticSceneConfig, generate_split, write_synthetic_dataset

    config = SyntheticSceneConfig(seed=0)              # the demo's regime
    for sample in generate_split(config, "train", 4):  # RegionSample, image a 32x32 PIL image
        print(sample.caption, [(r.phrase, r.box) for r in sample.regions])
    write_synthetic_dataset(config, "data/synthetic", n_train=30000, n_val=1000, n_test=1000)

Command line (prints the generation speed)::

    python -m cloc_data.synthetic data/synthetic --n-train 30000 --n-val 1000 --n-test 1000
"""

from cloc_data.synthetic.config import (
    DEFAULT_COLOURS,
    DEFAULT_SHAPES,
    DEFAULT_SIZE_CLASSES,
    EXTRA_COLOURS,
    SPLITS,
    SyntheticSceneConfig,
    attribute_values,
    class_attributes,
    class_index,
    class_names,
    num_classes,
    per_attribute_accuracy,
)
from cloc_data.synthetic.export import coco_instances, referring_expressions, write_synthetic_dataset
from cloc_data.synthetic.scenes import SceneObject, generate_scene, generate_split, sample_key
from cloc_data.synthetic.shapes import SHAPES, shape_mask

__all__ = [
    "DEFAULT_COLOURS",
    "DEFAULT_SHAPES",
    "DEFAULT_SIZE_CLASSES",
    "EXTRA_COLOURS",
    "SHAPES",
    "SPLITS",
    "SceneObject",
    "SyntheticSceneConfig",
    "attribute_values",
    "class_attributes",
    "class_index",
    "class_names",
    "coco_instances",
    "generate_scene",
    "generate_split",
    "num_classes",
    "per_attribute_accuracy",
    "referring_expressions",
    "sample_key",
    "shape_mask",
    "write_synthetic_dataset",
]
