"""CLOC inside LLaVA-style MLLMs.

* :mod:`llava_bridge.tower`: :class:`CLOCVisionTower`, a CLOC ViT behind the vision-tower interface
  of the original LLaVA and LLaVA-NeXT code bases, with Prompter region embeddings from the same
  ViT pass as the image tokens.
* :mod:`llava_bridge.builder`: :func:`build_vision_tower` / :func:`with_cloc`, which send CLOC
  checkpoints (recognised by their config) to that tower and every other tower to the fork's own
  builder.
* :mod:`llava_bridge.modeling_llava` / :mod:`llava_bridge.processing_llava`:
  :class:`CLOCLlavaForConditionalGeneration` and :class:`CLOCLlavaProcessor`, Hugging Face LLaVA with
  ``<region>`` tokens that take region features (registered with the Auto classes on import); their
  saved folders carry self-contained code for ``trust_remote_code`` users (:mod:`llava_bridge.remote_code`).
* :mod:`llava_bridge.box_text`: writing boxes into prompts and reading them out of answers, for every
  box convention, with the frame (original image or padded square) explicit.
* :mod:`llava_bridge.swap_tower`: :func:`swap_llava_tower` (``cloc-swap-tower``), an existing HF LLaVA
  checkpoint converted to a CLOC tower shard by shard, the language model copied byte for byte.

Hugging Face ``LlavaForConditionalGeneration`` needs nothing from here: ``import cloc_hf`` registers
``CLOCVisionConfig``, so it can be the ``vision_config`` of a ``LlavaConfig``. See ``docs/llava.md``.
"""

from .box_text import CONVENTIONS, box_to_text, format_box, parse_box, parse_boxes, resolve_frame, text_to_box
from .builder import CLOC_MODEL_TYPES, build_vision_tower, is_cloc_checkpoint, with_cloc
from .configuration_llava import CLOCLlavaConfig
from .modeling_llava import CLOCLlavaForConditionalGeneration, CLOCLlavaModel
from .processing_llava import CLOCLlavaProcessor
from .swap_tower import SwapTowerError, swap_llava_tower
from .tower import CLOCVisionTower

__all__ = [
    "CLOCLlavaConfig",
    "CLOCLlavaForConditionalGeneration",
    "CLOCLlavaModel",
    "CLOCLlavaProcessor",
    "CLOC_MODEL_TYPES",
    "CLOCVisionTower",
    "CONVENTIONS",
    "SwapTowerError",
    "box_to_text",
    "build_vision_tower",
    "format_box",
    "is_cloc_checkpoint",
    "parse_box",
    "parse_boxes",
    "resolve_frame",
    "swap_llava_tower",
    "text_to_box",
    "with_cloc",
]
