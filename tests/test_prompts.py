"""The per-image prompt lists (cloc_hf.prompts): flattening, its inverse, and the padded conversion."""

import pytest
import torch

from cloc_hf.box_ops import validate_boxes
from cloc_hf.prompts import flatten_per_image, padded_to_per_image, per_image_to_padded, split_per_image


def _lists():
    return [torch.arange(12.0).reshape(3, 4) / 20, torch.zeros(0, 4), torch.tensor([[0.1, 0.2, 0.3, 0.4]])]


def test_flatten_and_split_round_trip():
    items = _lists()
    flat = flatten_per_image(items, 3, "boxes")
    assert flat.counts == [3, 0, 1] and flat.image_index.tolist() == [0, 0, 0, 2]
    assert torch.equal(flat.values, torch.cat(items))
    assert all(torch.equal(a, b) for a, b in zip(split_per_image(flat.values, flat.counts), items))
    with pytest.raises(ValueError, match=r"counts \[3, 0\] sum to 3, but there are 4 rows"):
        split_per_image(flat.values, [3, 0])


def test_a_batch_tensor_reads_as_equal_lists():
    batch = torch.rand(2, 3, 4)
    flat = flatten_per_image(batch, 2, "boxes")
    assert flat.counts == [3, 3] and torch.equal(flat.values, batch.reshape(6, 4))


def test_padded_conversion_keeps_the_row_major_masked_order():
    padded = torch.arange(24.0).reshape(2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    per_image = padded_to_per_image(padded, mask)
    assert [len(t) for t in per_image] == [2, 1]
    assert torch.equal(torch.cat(per_image), padded[mask])
    back, back_mask = per_image_to_padded(per_image, length=3, fill=-1)
    assert back_mask.tolist() == [[True, True, False], [True, False, False]]
    assert torch.equal(back[back_mask], padded[mask]) and (back[~back_mask] == -1).all()
    with pytest.raises(ValueError, match=r"region_boxes of shape \(2, 3, 4\) does not match its \(B, M\) mask"):
        padded_to_per_image(padded, mask[:, :2], name="region_boxes")
    with pytest.raises(ValueError, match="shorter than the longest list"):
        per_image_to_padded(per_image, length=1)


@pytest.mark.parametrize(
    "items, batch, message",
    [
        (_lists()[:2], 3, r"got 2 boxes lists for a batch of 3 images"),
        (torch.zeros(3, 4), 3, r"boxes must be a list with one \(n_i, k\) tensor per image, got Tensor"),
        ([torch.zeros(1, 4), torch.zeros(2, 5)], 2, r"boxes\[1\] has shape \(2, 5\), expected \(n_i, 4\)"),
    ],
)
def test_wrong_lists_raise_naming_the_item(items, batch, message):
    with pytest.raises(ValueError, match=message):
        flatten_per_image(items, batch, "boxes")


def test_validation_names_the_image_and_box():
    items = [torch.tensor([[0.1, 0.1, 0.2, 0.2]]), torch.tensor([[0.1, 0.1, 0.2, 0.2], [0.5, 0.1, 0.4, 0.3]])]
    with pytest.raises(ValueError, match=r"boxes\[1\]\[1\].*flipped"):
        flatten_per_image(items, 2, "boxes", validate_boxes)


def test_validated_batch_equals_per_image_validation():
    """All rows validated at once (the fast path) give what per-image validation gives, clipping included."""
    items = [torch.tensor([[-0.005, 0.1, 0.2, 1.004]]), torch.zeros(0, 4),
             torch.tensor([[0.1, 0.1, 0.2, 0.2], [0.4, 0.1, 0.5, 0.3]])]
    flat = flatten_per_image(items, 3, "boxes", validate_boxes)
    expected = torch.cat([validate_boxes(t, name=f"boxes[{i}]") for i, t in enumerate(items)])
    assert torch.equal(flat.values, expected) and flat.counts == [1, 0, 2]
    assert flat.image_index.tolist() == [0, 2, 2] and flat.values[0, 0] == 0 and flat.values[0, 3] == 1
