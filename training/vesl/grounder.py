"""VESL stage 3: ground each image's noun phrases with an open-vocabulary detector (OWLv2).

A grounder is anything that satisfies :class:`Grounder`: ``grounder(images, phrases)`` returns, per
image, a list of :class:`Detection` with xyxy boxes in **original-image pixels**.

:class:`Owlv2Grounder` runs ``Owlv2ForObjectDetection`` once per image batch with all of each image's
phrases as text queries, keeps boxes with score > ``threshold`` (paper: 0.1), and gives each box its
most confident phrase (the arg-max over queries, as ``post_process_object_detection`` does).

Box geometry (checked against transformers 5.24's ``Owlv2ImageProcessor`` and its PIL twin): the
image is padded at the **bottom and right** to a square of side ``max(width, height)``, then resized
to the model's input size. Predicted boxes are normalised to that padded square, so
``post_process_object_detection(target_sizes=[(height, width)])`` scales them by ``max(height,
width)``, which is exactly the original-pixel frame (the padding adds no offset). Boxes reaching into
the padding are then clipped to the image, and boxes left empty by the clipping are dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from cloc_hf.box_ops import nms
from training.vesl.captioner import resolve_dtype

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.1


@dataclass
class Detection:
    box: tuple[float, float, float, float]  # xyxy, original-image pixels
    phrase: str
    score: float


@runtime_checkable
class Grounder(Protocol):
    """``grounder(images, phrases) -> detections``: per image, its phrases' boxes in original pixels."""

    def __call__(self, images: list[Any], phrases: list[list[str]]) -> list[list[Detection]]: ...


def detections_from_outputs(
    post_process: Any,
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    phrases: list[list[str]],
    image_sizes: list[tuple[int, int]],
    threshold: float = DEFAULT_THRESHOLD,
    nms_iou: float | None = None,
    max_detections: int | None = None,
) -> list[list[Detection]]:
    """Turn raw OWLv2 outputs into per-image detections in original-image pixels.

    Args:
        post_process: the image processor's ``post_process_object_detection``.
        logits: ``(B, num_boxes, Q)`` per-query logits; queries ``>= len(phrases[i])`` are padding.
        pred_boxes: ``(B, num_boxes, 4)`` cxcywh boxes normalised to the padded square input.
        phrases: the text queries of each image.
        image_sizes: ``(width, height)`` of each original image.
        threshold: keep boxes whose best-phrase score is > this.
        nms_iou: class-agnostic NMS at this IoU (``None``: no NMS, as in the paper).
        max_detections: keep at most this many boxes per image, the most confident (``None``: all).
    Returns:
        Per image, detections sorted by decreasing score.
    """
    from transformers.models.owlv2.modeling_owlv2 import Owlv2ObjectDetectionOutput

    batch, _, num_queries = logits.shape
    if len(phrases) != batch or len(image_sizes) != batch:
        raise ValueError(
            f"{batch} images of logits but {len(phrases)} phrase lists and {len(image_sizes)} sizes"
        )
    # padded queries (the processor pads every image to the batch's largest query count) can never win
    valid = torch.zeros(batch, num_queries, dtype=torch.bool, device=logits.device)
    for i, image_phrases in enumerate(phrases):
        valid[i, : len(image_phrases)] = True
    logits = logits.float().masked_fill(~valid[:, None, :], float("-inf"))
    outputs = Owlv2ObjectDetectionOutput(logits=logits, pred_boxes=pred_boxes.float())
    target_sizes = [(height, width) for width, height in image_sizes]
    results = post_process(outputs=outputs, threshold=threshold, target_sizes=target_sizes)

    detections = []
    for result, (width, height), image_phrases in zip(results, image_sizes, phrases):
        boxes = result["boxes"].float()
        limit = boxes.new_tensor([width, height, width, height])
        boxes = torch.minimum(boxes.clamp(min=0), limit)  # the part of a box inside the image
        scores, labels = result["scores"].float(), result["labels"]
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        order = nms(boxes, scores, nms_iou) if nms_iou is not None else scores.argsort(descending=True)
        if max_detections is not None:
            order = order[:max_detections]
        detections.append(
            [
                Detection(
                    box=tuple(float(v) for v in boxes[j].tolist()),
                    phrase=image_phrases[int(labels[j])],
                    score=float(scores[j]),
                )
                for j in order.tolist()
            ]
        )
    return detections


def pad_resize_normalize(images: list[Any], image_processor: Any) -> torch.Tensor:
    """OWLv2 preprocessing in torch, for when the image processor's backend is not installed.

    transformers' ``Owlv2ImageProcessor`` needs torchvision and its PIL twin needs scipy (for
    ``resize``). This does the same geometry (rescale to [0, 1], pad bottom/right with 0 to a square,
    resize to the processor's size, normalise with its mean/std), so boxes map back identically; the
    pixels differ slightly because the anti-aliasing filter differs (bilinear with antialias here,
    a Gaussian blur + bilinear there).
    """
    import numpy as np

    size = image_processor.size
    height = size["height"] if isinstance(size, dict) else size.height
    width = size["width"] if isinstance(size, dict) else size.width
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(image_processor.image_std, dtype=torch.float32)[:, None, None]
    out = []
    for image in images:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        _, h, w = pixels.shape
        side = max(h, w)
        pixels = torch.nn.functional.pad(pixels, (0, side - w, 0, side - h), value=0.0)
        pixels = torch.nn.functional.interpolate(
            pixels[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )[0]
        out.append((pixels - mean) / std)
    return torch.stack(out)


class Owlv2Grounder:
    """Ground phrases with ``Owlv2ForObjectDetection`` + ``Owlv2Processor`` (hub id or local path).

    Args:
        model_name_or_path: e.g. ``"google/owlv2-large-patch14-ensemble"`` or a local folder.
        threshold: keep boxes scoring > this (paper: 0.1).
        nms_iou: optional class-agnostic NMS IoU threshold (``None``: off).
        max_detections: optional cap on boxes per image.
        device, dtype: where and in which precision the detector runs (``"auto"``: bf16 on CUDA).
        preprocess: ``"processor"`` (transformers' image processor), ``"torch"``
            (:func:`pad_resize_normalize`) or ``"auto"`` (the processor when its backend is installed,
            else torch, with a warning).
        model_kwargs: extra ``from_pretrained`` arguments.
    """

    def __init__(
        self,
        model_name_or_path: str,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        nms_iou: float | None = None,
        max_detections: int | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = "auto",
        preprocess: str = "auto",
        model_kwargs: dict[str, Any] | None = None,
    ):
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        if nms_iou is not None and not 0.0 < nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1] or None, got {nms_iou}")
        if preprocess not in ("auto", "processor", "torch"):
            raise ValueError(f"preprocess must be 'auto', 'processor' or 'torch', got {preprocess!r}")
        self.name = str(model_name_or_path)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        try:
            self.processor = Owlv2Processor.from_pretrained(self.name, **(model_kwargs or {}))
            self.model = Owlv2ForObjectDetection.from_pretrained(
                self.name, dtype=self.dtype, **(model_kwargs or {})
            )
        except (OSError, ValueError) as err:
            raise ValueError(
                f"detector {self.name!r} could not be loaded as Owlv2Processor + Owlv2ForObjectDetection: {err}"
            ) from err
        self.model.to(self.device).eval()
        self.threshold = threshold
        self.nms_iou = nms_iou
        self.max_detections = max_detections
        self.preprocess = preprocess

    def pixel_values(self, images: list[Any]) -> torch.Tensor:
        if self.preprocess != "torch":
            try:
                return self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
            except ImportError as err:
                if self.preprocess == "processor":
                    raise
                logger.warning(
                    "detector %r: the image processor cannot run here (%s); using the torch "
                    "preprocessing with the same pad-to-square geometry instead",
                    self.name,
                    str(err).strip().splitlines()[0],
                )
                self.preprocess = "torch"
        return pad_resize_normalize(images, self.processor.image_processor)

    @torch.inference_mode()
    def __call__(self, images: list[Any], phrases: list[list[str]]) -> list[list[Detection]]:
        if len(images) != len(phrases):
            raise ValueError(f"{len(images)} images but {len(phrases)} phrase lists")
        detections: list[list[Detection]] = [[] for _ in images]
        todo = [i for i, p in enumerate(phrases) if p]  # an image without phrases has nothing to ground
        if not todo:
            return detections
        queries = [list(phrases[i]) for i in todo]
        text = self.processor(text=queries, return_tensors="pt", truncation=True)
        pixel_values = self.pixel_values([images[i] for i in todo])
        outputs = self.model(
            input_ids=text["input_ids"].to(self.device),
            attention_mask=text["attention_mask"].to(self.device),
            pixel_values=pixel_values.to(self.device, self.dtype),
        )
        found = detections_from_outputs(
            self.processor.image_processor.post_process_object_detection,
            outputs.logits,
            outputs.pred_boxes,
            queries,
            [images[i].size for i in todo],
            threshold=self.threshold,
            nms_iou=self.nms_iou,
            max_detections=self.max_detections,
        )
        for i, image_detections in zip(todo, found):
            detections[i] = image_detections
        return detections
