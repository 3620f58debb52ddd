"""Writing a converted model: only after the parity check passes, only into an empty directory, as
safetensors, and verified by reloading what was written."""

from __future__ import annotations

from pathlib import Path

import torch

from ..modeling_cloc import CLOCModel
from .common import DEFAULT_ATOL, ConversionError, preview
from .parity import check_parity
from .processor import build_processor


def check_out_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """``out_dir`` as a Path, or ``FileExistsError`` when it is a file, or a non-empty directory and not
    ``overwrite`` (default False: a conversion never mixes its files with someone else's)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True / --overwrite)")
    return out_dir


def verify_saved(model: CLOCModel, out_dir: Path) -> None:
    """Raise :class:`ConversionError` unless ``out_dir`` holds safetensors weights only and reloads with
    ``CLOCModel.from_pretrained`` to exactly ``model``'s tensors."""
    if list(out_dir.glob("*.bin")) or not list(out_dir.glob("*.safetensors")):
        raise ConversionError(f"{out_dir} should hold safetensors weights only")
    reloaded = CLOCModel.from_pretrained(out_dir, dtype=model.dtype).to(model.device)
    expected, actual = model.state_dict(), reloaded.state_dict()
    wrong = [k for k in expected if k not in actual or not torch.equal(expected[k], actual[k])]
    if wrong or set(actual) - set(expected):
        raise ConversionError(f"the model saved to {out_dir} does not reload identically: {preview(wrong)}")


def save_converted(
    model: CLOCModel,
    out_dir: str | Path,
    processor=None,
    *,
    reference,
    atol: float = DEFAULT_ATOL,
    overwrite: bool = False,
) -> dict:
    """Check parity against ``reference``, then write ``model`` (safetensors) and a processor.

    Nothing is written unless :func:`~cloc_hf.convert.parity.check_parity` passes. After writing, the
    directory is reloaded with ``CLOCModel.from_pretrained`` and compared tensor for tensor with ``model``.

    Args:
        model: the converted model.
        out_dir: target directory; must be empty or absent unless ``overwrite``.
        processor: saved beside the model; ``None`` (default) builds the default with
            :func:`~cloc_hf.convert.processor.build_processor`, ``False`` saves no processor.
        reference: the source model (``CLIPModel`` or ``OpenCLIPReference``).
        atol: parity tolerance (default 1e-5).
        overwrite: write into a non-empty ``out_dir`` (default False).

    Returns:
        the parity check's ``{name: max |difference|}``.
    """
    diffs = check_parity(reference, model, atol=atol)
    out_dir = check_out_dir(out_dir, overwrite)
    if processor is None:
        processor = build_processor(model.config)
    model.save_pretrained(out_dir)
    if processor is not False:
        processor.save_pretrained(out_dir)
    verify_saved(model, out_dir)
    return diffs
