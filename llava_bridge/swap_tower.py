"""``cloc-swap-tower``: put a CLOC ViT into an existing Hugging Face LLaVA checkpoint, shard by shard.

``cloc-swap-tower --llava SRC --cloc CLOC --out DST`` reads a ``LlavaForConditionalGeneration``
checkpoint folder (``config.json`` with ``vision_config`` / ``text_config``, sharded safetensors with
``model.safetensors.index.json`` or one ``model.safetensors``, tokenizer files), replaces its vision
tower weights and ``vision_config`` by the ViT of a CLOC checkpoint (a full ``CLOCModel``, whose
``vision_model.*`` weights are taken, or a ``CLOCVisionModel``), keeps the language model and, when
its input width fits the CLOC tower, the projector, and writes a ``LlavaProcessor`` with the CLOC
image processor. ``vision_feature_layer`` and ``vision_feature_select_strategy`` stay the source's.
Both weight layouts transformers reads are accepted and kept: the one it saves
(``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*``, 4.x and 5.x) and the
in-memory one (``model.vision_tower.*``, ``model.language_model.*``, ``lm_head.*``).

Memory: the language model is never loaded. Every source shard becomes one output shard whose
kept tensors are copied as byte ranges from the source file (``os.copy_file_range`` where the OS
has it, else through an 8 MiB buffer), so they stay byte-identical; only the CLOC tower (and a
re-initialised projector) is held in memory. The writer is written out here because safetensors has
no streaming writer: ``save_file`` needs every tensor of a shard in memory at once.

Pickled weights (``pytorch_model*.bin``) are refused unless ``allow_pickle``, and then read with
``torch.load(weights_only=True)`` one shard at a time and written as safetensors.

(Over 500 lines: the streaming shard writer, the checks that give one-line errors and the CLI serve
this one command and nothing else, so they stay together.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from .builder import CLOC_MODEL_TYPES

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
PICKLE_INDEX, PICKLE_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
PROJECTOR_CHOICES = ("keep", "reinit")
TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.")
"""Where a LLaVA checkpoint keeps its tower: transformers' in-memory layout, then the saved one."""
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_NOT_COPIED = {"config.json", "preprocessor_config.json", "processor_config.json", "README.md", SAFE_INDEX, PICKLE_INDEX}
_COPY_BUFFER = 8 << 20  # bytes per read when copy_file_range is unavailable
_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # torch dtype -> safetensors header name
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


class SwapTowerError(ValueError):
    """A source, CLOC or output folder that cannot be used; the message names the bad item."""


# ---------------------------------------------------------------------------------------------------
# safetensors shards, read as byte ranges and written tensor by tensor


@dataclass
class _Copied:
    """A tensor copied byte for byte from a source file (``start``/``end``: absolute offsets)."""

    name: str
    dtype: str
    shape: list[int]
    path: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def write_to(self, out) -> None:
        out.flush()
        with open(self.path, "rb", buffering=0) as src:
            pos, remaining = self.start, self.nbytes
            if hasattr(os, "copy_file_range"):
                try:
                    while remaining:
                        n = os.copy_file_range(src.fileno(), out.fileno(), remaining, pos)
                        if n == 0:
                            break
                        pos, remaining = pos + n, remaining - n
                except OSError:  # e.g. between file systems on older kernels: plain reads below
                    pass
            src.seek(pos)
            while remaining:
                chunk = src.read(min(_COPY_BUFFER, remaining))
                if not chunk:
                    raise SwapTowerError(f"{self.path}: the file ends inside tensor {self.name!r} (truncated shard)")
                out.write(chunk)
                remaining -= len(chunk)


@dataclass
class _New:
    """A tensor held in memory (the CLOC tower, a new projector, or a tensor read from a pickle)."""

    name: str
    tensor: torch.Tensor

    @property
    def dtype(self) -> str:
        return _DTYPE_NAMES[self.tensor.dtype]

    @property
    def shape(self) -> list[int]:
        return list(self.tensor.shape)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def write_to(self, out) -> None:
        out.write(self.tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def write_safetensors(path: Path, entries: list, metadata: dict[str, str]) -> None:
    """Write ``entries`` (objects with ``name``, ``dtype``, ``shape``, ``nbytes``, ``write_to(out)``) as one
    safetensors file, in order, each tensor streamed after a header computed from their sizes."""
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": entry.dtype, "shape": entry.shape, "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for entry in entries:
            entry.write_to(out)


class _SafetensorsShard:
    """One source safetensors file: each tensor's dtype, shape and byte range, read from its header."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < length <= size - 8:
                raise SwapTowerError(f"{path}: not a safetensors file (bad header length)")
            try:
                header = json.loads(fh.read(length))
            except ValueError as err:
                raise SwapTowerError(f"{path}: not a safetensors file (unreadable header: {err})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        base = 8 + length
        self.tensors = {
            name: _Copied(name, info["dtype"], list(info["shape"]), path, base + info["data_offsets"][0],
                          base + info["data_offsets"][1])
            for name, info in header.items()
        }

    def layout(self) -> dict[str, tuple[str, list[int], int]]:
        """name -> (safetensors dtype name, shape, bytes)."""
        return {n: (t.dtype, t.shape, t.nbytes) for n, t in self.tensors.items()}

    def entries(self, names: set[str]) -> list[_Copied]:
        """The writer entries of ``names``, in the order their bytes lie in the file."""
        return sorted((self.tensors[n] for n in names), key=lambda t: t.start)


class _PickleShard:
    """One pickled source file, read with ``torch.load(weights_only=True)`` when needed (twice: once to
    plan, once to write), so only one shard's tensors are ever loaded."""

    def __init__(self, path: Path):
        self.path = path
        self.metadata = {"format": "pt"}
        self._layout = {n: (_DTYPE_NAMES[t.dtype], list(t.shape), t.numel() * t.element_size()) for n, t in self._load().items()}

    def _load(self) -> dict[str, torch.Tensor]:
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in torch's legacy (non-zip) format cannot be memory-mapped
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise SwapTowerError(f"{self.path}: not a state dict (a {type(state).__name__})")
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor) or v.dtype not in _DTYPE_NAMES]
        if bad:
            raise SwapTowerError(f"{self.path}: not a state dict of tensors (bad entries: {bad[:3]})")
        return state

    def layout(self) -> dict[str, tuple[str, list[int], int]]:
        return dict(self._layout)

    def entries(self, names: set[str]) -> list[_New]:
        state = self._load()
        return [_New(n, state[n]) for n in state if n in names]


def _weight_files(folder: Path, allow_pickle: bool, what: str) -> tuple[list[Path], bool]:
    """The weight files of a checkpoint folder (index order) and whether they are pickles."""
    for index_name, single, pickled in ((SAFE_INDEX, SAFE_SINGLE, False), (PICKLE_INDEX, PICKLE_SINGLE, True)):
        index = folder / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise SwapTowerError(f"{index}: not a weight index ({type(err).__name__}: {err})") from None
            files = [folder / n for n in names]
            missing = [f.name for f in files if not f.is_file()]
            if missing or not files:
                raise SwapTowerError(f"{index} lists shard files that are missing: {', '.join(missing) or 'none listed'}")
        elif (folder / single).is_file():
            files = [folder / single]
        else:
            continue
        if pickled and not allow_pickle:
            raise SwapTowerError(
                f"{folder}: the {what} weights are pickled ({files[0].name}); unpickling can run code, so they are "
                "refused: pass --allow-pickle to read them with torch.load(weights_only=True), or convert them to safetensors"
            )
        return files, pickled
    raise SwapTowerError(f"{folder}: no {what} weights found (expected {SAFE_INDEX} and its shards, or {SAFE_SINGLE})")


# ---------------------------------------------------------------------------------------------------
# the CLOC tower, the new config, the projector, the processor


def read_cloc_tower(cloc_dir: str | os.PathLike, dtype: torch.dtype | None = None, allow_pickle: bool = False):
    """The ``CLOCVisionConfig`` and ViT weights (``CLOCVisionModel`` key names) of a CLOC checkpoint.

    Args:
        cloc_dir: a full ``CLOCModel`` folder (its ``vision_model.*`` weights are read) or a
            ``CLOCVisionModel`` folder; recognised by ``config.json``'s ``model_type``.
        dtype: cast each tensor to it as it is read (default `None`: keep), so only the cast tower is held.
        allow_pickle: accept ``pytorch_model*.bin`` weights (default `False`: refused, unpickling runs code).
    """
    from cloc_hf import CLOCVisionConfig, CLOCVisionModel

    cloc_dir = Path(cloc_dir)
    model_type = _json(cloc_dir / "config.json", "CLOC checkpoint").get("model_type")
    if model_type not in CLOC_MODEL_TYPES:
        raise SwapTowerError(f"{cloc_dir}: config.json has model_type {model_type!r}, not a CLOC checkpoint {CLOC_MODEL_TYPES}")
    vision_config = CLOCVisionConfig.from_pretrained(cloc_dir)
    with torch.device("meta"):
        expected = {k: list(v.shape) for k, v in CLOCVisionModel(vision_config).state_dict().items()}
    files, pickled = _weight_files(cloc_dir, allow_pickle, "CLOC")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        state = _PickleShard(file)._load() if pickled else None
        keys = list(state) if pickled else _safetensors_keys(file)
        for key in keys:
            if model_type == "cloc" and not key.startswith("vision_model."):
                continue  # the text tower, Prompter and box head of a full CLOC model
            name = key.removeprefix("vision_model.")
            if name not in expected:
                continue
            tensor = state[key] if pickled else _safetensors_tensor(file, key)
            if list(tensor.shape) != expected[name]:
                raise SwapTowerError(f"{file}: {key} has shape {list(tensor.shape)}, the config expects {expected[name]}")
            tensors[name] = tensor.to(dtype) if dtype is not None else tensor
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise SwapTowerError(f"{cloc_dir}: the CLOC ViT weights are incomplete ({len(missing)} missing, e.g. {missing[:3]})")
    return vision_config, tensors


def _safetensors_keys(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return list(handle.keys())


def _safetensors_tensor(file: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:  # reopened per tensor: the mapping is released at once
        return handle.get_tensor(key)


def _json(path: Path, what: str) -> dict:
    if not path.parent.is_dir():
        raise SwapTowerError(f"{path.parent}: not a folder (the {what})")
    if not path.is_file():
        raise SwapTowerError(f"{path.parent}: no {path.name} (not a Hugging Face {what} folder)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise SwapTowerError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise SwapTowerError(f"{path}: not a JSON object")
    return data


def _source_config(src: Path):
    """The source ``LlavaConfig``; anything but a LLaVA checkpoint is refused, naming what it is."""
    from transformers import LlavaConfig

    raw = _json(src / "config.json", "LLaVA checkpoint")
    if raw.get("model_type") != "llava":
        raise SwapTowerError(
            f"{src}: config.json has model_type {raw.get('model_type')!r}; cloc-swap-tower converts 'llava' "
            "(LlavaForConditionalGeneration) checkpoints"
        )
    missing = [k for k in ("vision_config", "text_config") if not isinstance(raw.get(k), dict)]
    if missing:
        raise SwapTowerError(f"{src / 'config.json'}: no {' / '.join(missing)}")
    try:
        return LlavaConfig.from_pretrained(src)
    except (ValueError, KeyError, TypeError) as err:
        raise SwapTowerError(f"{src / 'config.json'}: not a readable LlavaConfig ({type(err).__name__}: {err})") from None


def swapped_config(source, vision_config):
    """The source ``LlavaConfig`` with ``vision_config`` replaced and ``image_seq_length`` recounted.

    ``vision_feature_layer`` / ``vision_feature_select_strategy`` stay the source's (its projector and
    training recipe were built for them); a layer the CLOC tower does not have is an error.
    """
    from transformers import LlavaConfig

    layers = source.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    depth = vision_config.num_hidden_layers
    bad = [layer for layer in layers if not -(depth + 1) <= layer <= depth]
    if bad:
        raise SwapTowerError(
            f"vision_feature_layer {source.vision_feature_layer} of the source does not exist in the CLOC tower "
            f"({depth} layers: hidden_states indices -{depth + 1}..{depth})"
        )
    data = source.to_dict()
    data["vision_config"] = vision_config.to_dict()
    for key in ("auto_map", "architectures", "transformers_version", "_name_or_path"):
        data["vision_config"].pop(key, None)
    if data.get("dtype") is not None:  # the tower is written in the checkpoint's dtype
        data["vision_config"]["dtype"] = data["dtype"]
    grid = (vision_config.image_size // vision_config.patch_size) ** 2
    data["image_seq_length"] = grid + (1 if source.vision_feature_select_strategy == "full" else 0)
    return LlavaConfig.from_dict(data)


def projector_tensors(config, layout: dict, prefix: str, mode: str, dtype: torch.dtype, seed: int = 0):
    """`None` to keep the source projector, or new projector tensors (``mode="reinit"``).

    ``"keep"`` needs the source's ``linear_1`` to take the CLOC tower's width (``hidden_size`` times
    the number of feature layers); otherwise it raises, pointing to ``"reinit"``. ``"reinit"`` builds
    transformers' ``LlavaMultiModalProjector`` and initialises it with ``LlavaPreTrainedModel._init_weights``
    (normal(0, ``initializer_range``) weights, zero biases), seeded with ``seed`` for reproducibility.
    """
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector, LlavaPreTrainedModel

    layers = config.vision_feature_layer
    width = config.vision_config.hidden_size * (1 if isinstance(layers, int) else len(layers))
    if mode == "keep":
        found = layout.get(prefix + "linear_1.weight")
        if found is None:
            raise SwapTowerError(f"the source has no projector weights ({prefix}linear_1.weight); pass --projector reinit")
        if found[1] != [config.text_config.hidden_size, width]:
            raise SwapTowerError(
                f"the source projector takes {found[1][-1]} features ({prefix}linear_1.weight {found[1]}), the CLOC tower "
                f"gives {width} ({config.vision_config.hidden_size} x {1 if isinstance(layers, int) else len(layers)} "
                "layer(s)): pass --projector reinit to start a new projector"
            )
        return None
    if mode != "reinit":
        raise SwapTowerError(f"unknown projector mode {mode!r}; expected one of {PROJECTOR_CHOICES}")
    torch.manual_seed(seed)
    projector = LlavaMultiModalProjector(config)
    holder = SimpleNamespace(config=config)  # _init_weights reads only `self.config`
    for module in projector.modules():
        LlavaPreTrainedModel._init_weights(holder, module)
    return {prefix + k: v.detach().to(dtype) for k, v in projector.state_dict().items()}


def build_processor(src: Path, cloc_dir: Path, config):
    """A ``LlavaProcessor``: the source's tokenizer, image token and chat template with CLOC's image processor.

    ``num_additional_image_tokens=1`` because the CLOC ViT has a class token (with 0 the prompt gets
    one image token fewer than the tower yields); ``patch_size`` and the strategy are the new config's.
    The image processor's ``return_original_sizes`` is `False`, so ``processor(...)`` outputs go straight
    into ``model.generate(**inputs)`` (LLaVA takes no ``original_sizes``).
    """
    from transformers import AutoTokenizer, LlavaProcessor

    from cloc_hf import CLOCImageProcessor

    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except Exception as err:  # transformers raises OSError, ValueError or others for a missing tokenizer
        raise SwapTowerError(f"{src}: no usable tokenizer ({type(err).__name__}: {err})") from None
    vision = config.vision_config
    if (cloc_dir / "preprocessor_config.json").is_file():
        image_processor = CLOCImageProcessor.from_pretrained(cloc_dir, return_original_sizes=False)
        if image_processor.size != vision.image_size:
            raise SwapTowerError(f"{cloc_dir}: the image processor's size {image_processor.size} != the ViT's {vision.image_size}")
    else:
        image_processor = CLOCImageProcessor(size=vision.image_size, return_original_sizes=False)
    settings = _json(src / "processor_config.json", "LLaVA checkpoint") if (src / "processor_config.json").is_file() else {}
    image_token = settings.get("image_token") or tokenizer.convert_ids_to_tokens(config.image_token_id)
    if image_token is None or tokenizer.convert_tokens_to_ids(image_token) != config.image_token_id:
        raise SwapTowerError(f"{src}: the tokenizer has no image token with id {config.image_token_id} (config image_token_id)")
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, num_additional_image_tokens=1,
        image_token=image_token, chat_template=_chat_template(src, tokenizer),
    )


def _chat_template(src: Path, tokenizer) -> str | None:
    if (src / "chat_template.jinja").is_file():
        return (src / "chat_template.jinja").read_text(encoding="utf-8")
    if (src / "chat_template.json").is_file():
        return _json(src / "chat_template.json", "LLaVA checkpoint").get("chat_template")
    return getattr(tokenizer, "chat_template", None)


# ---------------------------------------------------------------------------------------------------
# the swap


def swap_llava_tower(llava_dir, cloc_dir, out_dir, projector: str = "keep", allow_pickle: bool = False, seed: int = 0) -> Path:
    """Write ``out_dir``: the LLaVA checkpoint ``llava_dir`` with the CLOC ViT of ``cloc_dir`` as its tower.

    Args:
        projector: ``"keep"`` (default; the source projector, which must fit the tower's width) or
            ``"reinit"`` (a fresh one); either way it needs stage-1 re-alignment before use.
        allow_pickle: accept ``pytorch_model*.bin`` weights (default `False`; unpickling can run code).
        seed: seed of a re-initialised projector (default 0, for reproducible conversions).

    The tower (and a new projector) get the dtype of the source's tower weights. ``out_dir`` must not
    exist or be empty; it is written in a temporary sibling folder and renamed at the end.
    """
    import cloc_hf  # noqa: F401  (registers the CLOC configs the new LlavaConfig refers to)

    src, cloc_dir, out = Path(llava_dir), Path(cloc_dir), Path(out_dir)
    if projector not in PROJECTOR_CHOICES:
        raise SwapTowerError(f"unknown projector mode {projector!r}; expected one of {PROJECTOR_CHOICES}")
    source_config = _source_config(src)
    _check_out(out, src)
    files, pickled = _weight_files(src, allow_pickle, "LLaVA")
    shards = [(_PickleShard if pickled else _SafetensorsShard)(f) for f in files]
    layout = {name: entry for shard in shards for name, entry in shard.layout().items()}
    tower_prefix = next((p for p in TOWER_PREFIXES if any(n.startswith(p) for n in layout)), None)
    if tower_prefix is None:
        raise SwapTowerError(f"{src}: no vision tower weights (no tensor name starts with {' or '.join(TOWER_PREFIXES)})")
    projector_prefix = tower_prefix.replace("vision_tower.", "multi_modal_projector.")
    dtype = _DTYPES[next(layout[n][0] for n in layout if n.startswith(tower_prefix))]
    vision_config, tower = read_cloc_tower(cloc_dir, dtype, allow_pickle)
    config = swapped_config(source_config, vision_config)
    new_projector = projector_tensors(config, layout, projector_prefix, projector, dtype, seed)
    processor = build_processor(src, cloc_dir, config)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _copy_side_files(src, tmp)
        new = {tower_prefix + k: v for k, v in tower.items()} | (new_projector or {})
        drop = (tower_prefix,) if new_projector is None else (tower_prefix, projector_prefix)
        _write_weights(shards, new, drop, tmp, sharded=len(files) > 1 or (src / SAFE_INDEX).is_file())
        config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(_note(src, cloc_dir, projector, config), encoding="utf-8")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_out(out: Path, src: Path) -> None:
    if out.resolve() == src.resolve():
        raise SwapTowerError(f"{out}: the output folder is the source folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SwapTowerError(f"{out}: exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config, chat template...: every top-level file but weights and the replaced ones."""
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name not in _NOT_COPIED and not path.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(path, dst / path.name)


def _write_weights(shards, new: dict[str, torch.Tensor], drop: tuple[str, ...], dst: Path, sharded: bool) -> None:
    """One output shard per source shard (empty ones dropped): kept tensors copied, ``new`` ones added to
    the shard that held most of the dropped bytes (where the old tower was), then the index."""
    layouts = [shard.layout() for shard in shards]
    kept = [{n for n in lay if not n.startswith(drop)} for lay in layouts]
    dropped_bytes = [sum(lay[n][2] for n in lay if n.startswith(drop)) for lay in layouts]
    home = max(range(len(shards)), key=lambda i: dropped_bytes[i])
    plan = [(i, kept[i]) for i in range(len(shards)) if kept[i] or i == home]
    metadata = {**shards[0].metadata, "format": "pt"}
    weight_map: dict[str, str] = {}
    total_size = total_params = 0
    for number, (i, names) in enumerate(plan, start=1):
        name = f"model-{number:05d}-of-{len(plan):05d}.safetensors" if sharded else SAFE_SINGLE
        entries = shards[i].entries(names) + ([_New(k, v) for k, v in new.items()] if i == home else [])
        write_safetensors(dst / name, entries, metadata)
        for entry in entries:
            weight_map[entry.name] = name
            total_size += entry.nbytes
            total_params += _numel(entry.shape)
        del entries
    if sharded:
        index = {"metadata": {"total_size": total_size, "total_parameters": total_params}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _numel(shape: list[int]) -> int:
    count = 1
    for side in shape:
        count *= side
    return count


def _note(src: Path, cloc_dir: Path, projector: str, config) -> str:
    kept = "kept from the source (it was trained on the old tower's features)" if projector == "keep" else "freshly initialised"
    return f"""# LLaVA with a CLOC vision tower (converted, not yet aligned)

Written by `cloc-swap-tower` from `{src.name}` (language model, tokenizer) and the CLOC ViT `{cloc_dir.name}`.

- Vision tower: the CLOC ViT ({config.vision_config.num_hidden_layers} layers, width {config.vision_config.hidden_size},
  {config.vision_config.image_size} px, patch {config.vision_config.patch_size}); the Prompter, if the CLOC
  checkpoint had one, is not part of this model.
- Language model: unchanged, byte for byte.
- Projector: {kept}.
- `vision_feature_layer` {config.vision_feature_layer}, `vision_feature_select_strategy` "{config.vision_feature_select_strategy}" (the source's).
- Processor: `LlavaProcessor` with `CLOCImageProcessor` (`return_original_sizes: false`, so its outputs
  are exactly the model's inputs) and `num_additional_image_tokens=1` (the class token).

**The projector needs re-alignment before use.** Run LLaVA's stage 1 (train the projector alone on
image-caption pairs, tower and language model frozen), then fine-tune as usual; until then the
model's answers about images are meaningless.

Load it in a process that has run `import cloc_hf` (it registers the CLOC tower with transformers):

```python
import cloc_hf
from transformers import AutoProcessor, LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained("<this folder>")
processor = AutoProcessor.from_pretrained("<this folder>")
inputs = processor(images=[image], text=[prompt], return_tensors="pt")
output_ids = model.generate(**inputs, max_new_tokens=32)
```
"""


def main(argv: list[str] | None = None) -> int:
    """``cloc-swap-tower``: see the module docstring. Returns 0, or 1 with one error line on stderr."""
    parser = argparse.ArgumentParser(prog="cloc-swap-tower", description=__doc__.split("\n\n")[0])
    parser.add_argument("--llava", required=True, help="source LLaVA checkpoint folder (HF LlavaForConditionalGeneration)")
    parser.add_argument("--cloc", required=True, help="CLOC checkpoint folder (full CLOCModel or CLOCVisionModel)")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--projector", choices=PROJECTOR_CHOICES, default="keep",
                        help="keep the source projector (default; must fit the tower's width) or start a new one")
    parser.add_argument("--allow-pickle", action="store_true", help="read pytorch_model*.bin weights (weights_only=True)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a re-initialised projector (default 0)")
    args = parser.parse_args(argv)
    try:
        out = swap_llava_tower(args.llava, args.cloc, args.out, args.projector, args.allow_pickle, args.seed)
    except (SwapTowerError, OSError) as err:
        print(f"cloc-swap-tower: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print(f"wrote {out} (projector: {args.projector}); re-align the projector (stage 1) before use, see {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
