"""Box utilities and the one mapping between an original image and the model's input frame.

Every part of the project (processor, data loaders, evaluation, LLaVA bridge) converts boxes with the
functions here; nothing else re-implements IoU, format conversion or the frame mapping.

Conventions
-----------
* ``xyxy``: ``(x1, y1, x2, y2)``, top-left and bottom-right corners, x to the right, y down.
* Pixel boxes live in the *original* image: ``0 <= x <= width``, ``0 <= y <= height``.
* Model boxes are normalised to ``[0, 1]`` in the *model input frame*: the square the ViT actually
  sees after padding-to-square (``"pad"``, LLaVA's ``expand2square``) or after resize + centre crop
  (``"center_crop"``, CLIP's preprocessing). :class:`FrameTransform` maps between the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")

# A box whose corners lie at most this fraction of the frame outside it is clipped silently;
# anything further out is almost certainly a unit or format mistake and raises.
OUTSIDE_TOLERANCE = 0.05


def box_convert(boxes: torch.Tensor, in_fmt: str, out_fmt: str) -> torch.Tensor:
    """Convert ``(..., 4)`` boxes between ``xyxy``, ``xywh`` and ``cxcywh``."""
    for fmt in (in_fmt, out_fmt):
        if fmt not in BOX_FORMATS:
            raise ValueError(f"unknown box format {fmt!r}; expected one of {BOX_FORMATS}")
    if in_fmt == out_fmt:
        return boxes
    a, b, c, d = boxes.unbind(-1)
    if in_fmt == "xywh":
        a, b, c, d = a, b, a + c, b + d
    elif in_fmt == "cxcywh":
        a, b, c, d = a - c / 2, b - d / 2, a + c / 2, b + d / 2
    # now xyxy
    if out_fmt == "xyxy":
        return torch.stack([a, b, c, d], -1)
    if out_fmt == "xywh":
        return torch.stack([a, b, c - a, d - b], -1)
    return torch.stack([(a + c) / 2, (b + d) / 2, c - a, d - b], -1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of ``(..., 4)`` xyxy boxes (negative extents count as 0)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _intersection_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise intersection and union areas ``(N, M)`` of xyxy boxes."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter, union


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of ``(N, 4)`` and ``(M, 4)`` xyxy boxes -> ``(N, M)``."""
    inter, union = _intersection_union(a, b)
    return inter / union.clamp(min=torch.finfo(union.dtype).tiny)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU (Rezatofighi et al. 2019) of xyxy boxes -> ``(N, M)``."""
    inter, union = _intersection_union(a, b)
    eps = torch.finfo(union.dtype).tiny
    iou = inter / union.clamp(min=eps)
    lt = torch.minimum(a[:, None, :2], b[None, :, :2])
    rb = torch.maximum(a[:, None, 2:], b[None, :, 2:])
    hull = (rb - lt).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=eps)


def elementwise_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matched pairs: ``(N, 4)`` with ``(N, 4)`` -> ``(N,)``."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a) + box_area(b) - inter
    return inter / union.clamp(min=torch.finfo(union.dtype).tiny)


def jitter_boxes(
    boxes: torch.Tensor,
    scale: float,
    size: tuple[float, float] = (1.0, 1.0),
    min_size: float = 1e-3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(N, 4)`` xyxy ``boxes`` with each corner moved by Gaussian noise of std ``scale`` x the box's
    width / height, clipped to the frame ``size = (width, height)`` and kept at least ``min_size``
    wide and high (corners that cross are swapped back into order).

    Used for training with loose boxes (``CLOCConfig.region_box_jitter``) and for evaluating with
    them (``eval.region.jitter_boxes``, in pixels with ``min_size=1``): a loose detector box is off by
    about 0.1-0.2 of its size.
    """
    if scale < 0:
        raise ValueError(f"jitter_boxes: scale={scale} must be >= 0")
    width, height = float(size[0]), float(size[1])
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    noise = torch.randn(boxes.shape, generator=generator, dtype=boxes.dtype, device=boxes.device)
    moved = boxes + scale * wh * noise
    limit = torch.tensor([width, height] * 2, dtype=boxes.dtype, device=boxes.device)
    moved = torch.minimum(moved.clamp_min(0), limit)
    x1 = torch.minimum(moved[:, 0], moved[:, 2]).clamp(max=width - min_size)
    y1 = torch.minimum(moved[:, 1], moved[:, 3]).clamp(max=height - min_size)
    x2 = torch.maximum(torch.maximum(moved[:, 0], moved[:, 2]), x1 + min_size)
    y2 = torch.maximum(torch.maximum(moved[:, 1], moved[:, 3]), y1 + min_size)
    return torch.stack([x1, y1, x2, y2], dim=1)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression; returns kept indices sorted by decreasing score."""
    order = scores.argsort(descending=True)
    keep = []
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    ious = box_iou(boxes[order], boxes[order])
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(order[i])
        suppressed |= ious[i] > iou_threshold
    return torch.stack(keep) if keep else order.new_zeros(0)


def validate_boxes(
    boxes,
    *,
    name: str = "boxes",
    width: float = 1.0,
    height: float = 1.0,
    tolerance: float = OUTSIDE_TOLERANCE,
) -> torch.Tensor:
    """Check a ``(n, 4)`` xyxy box tensor and clip it to ``[0, width] x [0, height]``.

    Raises ``ValueError`` naming ``name`` and the offending row for: wrong shape, NaN/inf,
    ``x2 <= x1`` or ``y2 <= y1``, and corners further than ``tolerance`` (a fraction of the frame)
    outside it. Slightly-outside boxes are clipped silently (documented behaviour).
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32) if not torch.is_tensor(boxes) else boxes
    if boxes.ndim == 1 and boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (n, 4) in xyxy format, got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        boxes = boxes.float()
    if boxes.numel() == 0:
        return boxes
    bad = ~torch.isfinite(boxes).all(-1)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name}[{i}] contains NaN or inf: {boxes[i].tolist()}")
    bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name}[{i}] = {boxes[i].tolist()} is empty or flipped: need x2 > x1 and y2 > y1 (xyxy)")
    lo = boxes.new_tensor([-tolerance * width, -tolerance * height] * 2)
    hi = boxes.new_tensor([(1 + tolerance) * width, (1 + tolerance) * height] * 2)
    bad = ((boxes < lo) | (boxes > hi)).any(-1)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"{name}[{i}] = {boxes[i].tolist()} lies far outside the frame of size {width}x{height}; "
            "boxes must be xyxy in that frame (normalised [0, 1] for the model, pixels for the processor)"
        )
    limit = boxes.new_tensor([width, height, width, height])
    return torch.minimum(boxes.clamp(min=0), limit)


def validate_points(points, *, name: str = "points", tolerance: float = OUTSIDE_TOLERANCE) -> torch.Tensor:
    """Check ``(n, 2)`` normalised xy points, clip slightly-outside ones to ``[0, 1]``."""
    points = torch.as_tensor(points, dtype=torch.float32) if not torch.is_tensor(points) else points
    if points.ndim == 1 and points.numel() == 0:
        points = points.reshape(0, 2)
    if points.ndim != 2 or points.shape[-1] != 2:
        raise ValueError(f"{name} must have shape (n, 2) as (x, y), got {tuple(points.shape)}")
    points = points.float() if not points.is_floating_point() else points
    if points.numel() == 0:
        return points
    bad = ~torch.isfinite(points).all(-1)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name}[{i}] contains NaN or inf: {points[i].tolist()}")
    bad = ((points < -tolerance) | (points > 1 + tolerance)).any(-1)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name}[{i}] = {points[i].tolist()} lies far outside the normalised [0, 1] frame")
    return points.clamp(0, 1)


@dataclass(frozen=True)
class FrameTransform:
    """Geometry of one image's preprocessing: original ``width x height`` -> square ``size`` input.

    ``mode="pad"`` pads the image to a square of side ``max(width, height)`` with the image centred
    (LLaVA ``expand2square``), then resizes to ``size``. ``mode="center_crop"`` resizes the shorter
    side to ``size`` (the longer one to ``int(size * long / short)``, as CLIP's processor does) and
    crops the centre square. The image processor executes exactly this geometry, so box mapping and
    pixels always agree.
    """

    width: int
    height: int
    size: int
    mode: str = "pad"

    def __post_init__(self):
        if self.mode not in ("pad", "center_crop"):
            raise ValueError(f"unknown resize mode {self.mode!r}; expected 'pad' or 'center_crop'")
        if self.width < 1 or self.height < 1:
            raise ValueError(f"image size must be positive, got {self.width}x{self.height}")

    # --- geometry shared with the image processor ---------------------------------------------
    @property
    def pad_side(self) -> int:
        """Side of the padded square (``mode="pad"``): the longer image side."""
        return max(self.width, self.height)

    @property
    def pad_offset(self) -> tuple[int, int]:
        """Where the original image's top-left corner lands inside the padded square."""
        side = self.pad_side
        return (side - self.width) // 2, (side - self.height) // 2

    @property
    def resized_size(self) -> tuple[int, int]:
        """``(w, h)`` after the shortest-edge resize of ``center_crop`` mode."""
        short, long = sorted((self.width, self.height))
        new_long = max(int(self.size * long / short), self.size)
        return (self.size, new_long) if self.width <= self.height else (new_long, self.size)

    @property
    def crop_offset(self) -> tuple[int, int]:
        """Top-left corner of the centre crop inside the resized image (``mode="center_crop"``)."""
        w, h = self.resized_size
        return (w - self.size) // 2, (h - self.size) // 2

    def _affine(self) -> tuple[float, float, float, float]:
        """``(sx, sy, tx, ty)`` with ``normalised = pixel * s + t``."""
        if self.mode == "pad":
            side = float(self.pad_side)
            ox, oy = self.pad_offset
            return 1 / side, 1 / side, ox / side, oy / side
        w, h = self.resized_size
        cx, cy = self.crop_offset
        return w / self.width / self.size, h / self.height / self.size, -cx / self.size, -cy / self.size

    # --- mapping --------------------------------------------------------------------------------
    def to_model(self, boxes, *, name: str = "boxes") -> torch.Tensor:
        """Original-pixel xyxy ``(n, 4)`` -> normalised xyxy in the model frame, clipped to ``[0, 1]``.

        Raises if a box is invalid in pixel space, or (centre-crop mode) is cropped away entirely.
        """
        boxes = validate_boxes(boxes, name=name, width=self.width, height=self.height)
        sx, sy, tx, ty = self._affine()
        scale = boxes.new_tensor([sx, sy, sx, sy])
        shift = boxes.new_tensor([tx, ty, tx, ty])
        out = boxes * scale + shift
        clipped = out.clamp(0, 1)
        gone = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
        if gone.any():
            i = int(gone.nonzero()[0])
            raise ValueError(
                f"{name}[{i}] = {boxes[i].tolist()} lies entirely outside the centre crop the model sees; "
                "use resize_mode='pad' to keep the whole image"
            )
        return clipped

    def points_to_model(self, points, *, name: str = "points") -> torch.Tensor:
        """Original-pixel ``(n, 2)`` xy points -> normalised model frame."""
        pts = torch.as_tensor(points, dtype=torch.float32)
        if pts.ndim != 2 or pts.shape[-1] != 2:
            raise ValueError(f"{name} must have shape (n, 2), got {tuple(pts.shape)}")
        norm = pts / pts.new_tensor([self.width, self.height])
        validate_points(norm, name=name)
        sx, sy, tx, ty = self._affine()
        out = pts * pts.new_tensor([sx, sy]) + pts.new_tensor([tx, ty])
        gone = ((out < -OUTSIDE_TOLERANCE) | (out > 1 + OUTSIDE_TOLERANCE)).any(-1)
        if gone.any():
            i = int(gone.nonzero()[0])
            raise ValueError(
                f"{name}[{i}] = {pts[i].tolist()} lies outside the centre crop the model sees; "
                "use resize_mode='pad' to keep the whole image"
            )
        return out.clamp(0, 1)

    def to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        """Normalised model-frame xyxy ``(..., 4)`` -> original-pixel xyxy, clipped to the image."""
        boxes = torch.as_tensor(boxes, dtype=torch.float32)
        sx, sy, tx, ty = self._affine()
        shift = boxes.new_tensor([tx, ty, tx, ty])
        scale = boxes.new_tensor([sx, sy, sx, sy])
        out = (boxes - shift) / scale
        limit = boxes.new_tensor([self.width, self.height, self.width, self.height])
        return torch.minimum(out.clamp(min=0), limit)


def roi_align(
    features: torch.Tensor,
    boxes: torch.Tensor,
    box_image_index: torch.Tensor,
    output_size: int = 2,
    sampling_ratio: int = 2,
) -> torch.Tensor:
    """RoI-Align (He et al. 2017, ``aligned=True``) of normalised xyxy boxes over feature maps.

    Written over ``grid_sample`` because torchvision does not import beside the CPU torch build this
    project pins. Bilinear sampling at ``sampling_ratio^2`` points per bin, averaged per bin.

    Args:
        features: ``(B, C, H, W)`` feature maps.
        boxes: ``(R, 4)`` xyxy boxes normalised to ``[0, 1]`` of the feature map's extent.
        box_image_index: ``(R,)`` which feature map each box reads.
    Returns:
        ``(R, C, output_size, output_size)``.
    """
    num = boxes.shape[0]
    _, channels, _, _ = features.shape
    if num == 0:
        return features.new_zeros(0, channels, output_size, output_size)
    steps = output_size * sampling_ratio
    # sample centres inside each box, in normalised [0, 1] coordinates
    frac = (torch.arange(steps, device=boxes.device, dtype=boxes.dtype) + 0.5) / steps
    xs = boxes[:, 0:1] + frac[None] * (boxes[:, 2:3] - boxes[:, 0:1])  # (R, steps)
    ys = boxes[:, 1:2] + frac[None] * (boxes[:, 3:4] - boxes[:, 1:2])
    grid = torch.stack(
        [xs[:, None, :].expand(num, steps, steps), ys[:, :, None].expand(num, steps, steps)], dim=-1
    )
    grid = grid * 2 - 1  # grid_sample's [-1, 1] with align_corners=False matches pixel-centre sampling
    sampled = torch.nn.functional.grid_sample(
        features[box_image_index], grid.to(features.dtype), mode="bilinear", align_corners=False
    )  # (R, C, steps, steps)
    return sampled.reshape(num, channels, output_size, sampling_ratio, output_size, sampling_ratio).mean((3, 5))


def roi_align_patch_tokens(
    patch_tokens: torch.Tensor, boxes: torch.Tensor, box_image_index: torch.Tensor, output_size: int = 2
) -> torch.Tensor:
    """Mean RoI-Align feature of each box over a ViT's patch tokens -> ``(R, C)``.

    ``patch_tokens`` is ``(B, N, C)`` without the class token, ``N`` a square grid in row-major
    order; ``boxes`` ``(R, 4)`` are normalised xyxy in the model frame and ``box_image_index`` ``(R,)``
    says which image each reads. The grid is read as a feature map and each box's
    ``output_size x output_size`` RoI-Align bins (default 2, the Prompter's ablation setting) are
    averaged: the paper's RoI-Align ablation and the evaluation's RoI baseline share this one path.
    """
    batch, num_patches, channels = patch_tokens.shape
    side = grid_side(num_patches)
    fmap = patch_tokens.transpose(1, 2).reshape(batch, channels, side, side)
    return roi_align(fmap, boxes, box_image_index, output_size=output_size).mean(dim=(2, 3))


def patch_centres(size: int) -> torch.Tensor:
    """Normalised ``(x, y)`` centres ``(size*size, 2)`` of a ``size x size`` patch grid, row-major.

    The Prompter encodes these like point prompts to give image tokens the same position code as a
    prompt at the same place.
    """
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], -1)


def grid_side(num_patches: int) -> int:
    """Side of the square patch grid holding ``num_patches`` tokens; raises if they form no square."""
    side = int(math.isqrt(num_patches))
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patch tokens do not form a square grid")
    return side
