"""Convert CLIP checkpoints into CLOC models: the CLIP towers are copied, the Prompter and box head
start freshly initialised (fine-tuning a CLIP checkpoint is the practical path for most users).

Sources
-------
* a Hugging Face ``CLIPModel`` (hub id or local directory), see :func:`convert_hf_clip`;
* an open_clip ViT CLIP state dict (``.safetensors``, or ``.bin``/``.pt`` read with
  ``torch.load(..., weights_only=True)``) plus its model config json, see :func:`convert_open_clip`
  (supported variants and the text-pooling rule: :mod:`cloc_hf.convert.open_clip_config`).

Every conversion is checked numerically: :func:`check_parity` runs the source and the CLOC model on
the same deterministic random images and token sequences, and :func:`save_converted` refuses to write
anything unless the image and text embeddings agree to ``atol``. For open_clip the source is
:class:`OpenCLIPReference`, a plain-torch forward written directly over open_clip's state-dict layout
(open_clip itself is not imported: it needs torchvision).

Command line (``pip install -e .`` provides ``cloc-convert``; ``python -m cloc_hf.convert`` also works)::

    cloc-convert --from-hf-clip openai/clip-vit-base-patch16 --out cloc-vit-b-16 [--atol 1e-5] [--pooling prompt|all]
    cloc-convert --from-open-clip ViT-B-16.safetensors --open-clip-config ViT-B-16.json --out cloc-vit-b-16

    other options: --resize-mode pad|center_crop (processor; default CLOC's pad), --tokenizer TOK (default:
    the source's tokenizer, the config's hf_tokenizer_name, else the offline OpenAI CLIP tokenizer),
    --no-processor, --overwrite (write into a non-empty --out)

The output holds ``config.json``, ``model.safetensors`` and a ``CLOCProcessor`` (image processor at the
ViT's size + tokenizer); ``import cloc_hf; AutoModel.from_pretrained("cloc-vit-b-16")`` loads it. The
converter reloads what it wrote and checks it is identical before reporting success. Converted
open_clip models are float32 (half-precision weights are upcast exactly); Hugging Face conversions
keep the dtype the source was loaded in.

Modules: :mod:`.common` (error type, tolerance, strict weight copy), :mod:`.parity`, :mod:`.hf_clip`,
:mod:`.open_clip_config` (which open_clip configs convert, read once), :mod:`.open_clip` (checkpoint
files, key mapping), :mod:`.open_clip_reference` (the independent forward), :mod:`.processor`,
:mod:`.save`, :mod:`.cli`. Nothing in the model's own modules imports this package, so the code
``save_pretrained`` copies for ``trust_remote_code`` users never pulls the converter in.
"""

from .cli import build_parser, main
from .common import DEFAULT_ATOL, ConversionError, load_clip_weights
from .hf_clip import (
    cloc_config_from_clip_config,
    cloc_from_clip_model,
    convert_hf_clip,
    hf_clip_model_and_reference,
    load_hf_clip,
)
from .open_clip import (
    convert_open_clip,
    load_state_dict_file,
    map_open_clip_state_dict,
    open_clip_model_and_reference,
)
from .open_clip_config import check_open_clip_config, cloc_config_from_open_clip, read_open_clip_config
from .open_clip_reference import OpenCLIPReference
from .parity import check_parity, make_parity_inputs
from .processor import build_processor
from .save import save_converted

__all__ = [
    "DEFAULT_ATOL",
    "ConversionError",
    "OpenCLIPReference",
    "build_parser",
    "build_processor",
    "check_open_clip_config",
    "check_parity",
    "cloc_config_from_clip_config",
    "cloc_config_from_open_clip",
    "cloc_from_clip_model",
    "convert_hf_clip",
    "convert_open_clip",
    "hf_clip_model_and_reference",
    "load_clip_weights",
    "load_hf_clip",
    "load_state_dict_file",
    "main",
    "make_parity_inputs",
    "map_open_clip_state_dict",
    "open_clip_model_and_reference",
    "read_open_clip_config",
    "save_converted",
]
