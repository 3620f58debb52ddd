"""Converters from public region-text datasets to :class:`~cloc_data.format.RegionSample`.

Each converter streams samples with ``image=None`` and the image location in
``meta["image_path"]``, counting every malformed record or region in a
:class:`~cloc_data.shards.SkipCounter`; see :mod:`cloc_data.converters.common` for the shared
conventions and ``docs/data_format.md`` for each dataset's field mapping. ``cloc-data convert``
(:mod:`cloc_data.cli`) attaches the images and writes shards.
"""

from cloc_data.converters.coco import iter_coco_instances, lvis_name
from cloc_data.converters.common import (
    SIZE_UNKNOWN,
    ImageResolver,
    clean_sample,
    iter_rows,
    make_key,
    resolve_size,
    xywh_to_xyxy,
)
from cloc_data.converters.flickr30k import iter_flickr30k, parse_sentence, read_annotation
from cloc_data.converters.grit import grit_input_files, grit_row_to_sample, iter_grit
from cloc_data.converters.refcoco import (
    SPLITS as REFCOCO_SPLITS,
)
from cloc_data.converters.refcoco import (
    SplitError,
    iter_refcoco,
    iter_refcoco_rows,
    iter_refer,
    split_from_file_name,
)
from cloc_data.converters.visual_genome import iter_visual_genome

FORMATS = ("grit", "vg", "refcoco", "flickr30k", "coco", "lvis")

__all__ = [
    "FORMATS",
    "REFCOCO_SPLITS",
    "SIZE_UNKNOWN",
    "ImageResolver",
    "SplitError",
    "clean_sample",
    "grit_input_files",
    "grit_row_to_sample",
    "iter_coco_instances",
    "iter_flickr30k",
    "iter_grit",
    "iter_refcoco",
    "iter_refcoco_rows",
    "iter_refer",
    "iter_rows",
    "iter_visual_genome",
    "lvis_name",
    "make_key",
    "parse_sentence",
    "read_annotation",
    "resolve_size",
    "split_from_file_name",
    "xywh_to_xyxy",
]
