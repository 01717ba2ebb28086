"""The separable RoIAlign equals torchvision's, values and gradients, and Faster R-CNN pools through it."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align as tv_roi_align

from unitune.models.roi_align import SeparableRoIAlign, roi_align


@pytest.mark.parametrize("size", [7, 16, 33])
def test_it_equals_torchvision_with_gradients(size):
    torch.manual_seed(size)
    x = torch.randn(3, 8, size, size + 3, requires_grad=True)
    k = 60
    corner = torch.rand(k, 2) * 90 - 15  # some RoIs start outside the image, some end beyond it
    rois = torch.cat([torch.randint(0, 3, (k, 1)).float(), corner, corner + torch.rand(k, 2) * 60 + 0.2], 1)
    scale = size / 64
    ours, theirs = roi_align(x, rois, (7, 5), scale, 2), tv_roi_align(x, rois, (7, 5), scale, 2, False)
    assert torch.allclose(ours, theirs, atol=1e-5)
    g = torch.randn_like(theirs)
    mine, = torch.autograd.grad((ours * g).sum(), x)
    ref, = torch.autograd.grad((theirs * g).sum(), x)
    assert torch.allclose(mine, ref, atol=1e-4)


def test_faster_rcnn_pools_through_it_at_every_level():
    torch.manual_seed(0)
    features = {"0": torch.randn(2, 4, 32, 32), "1": torch.randn(2, 4, 16, 16), "pool": torch.randn(2, 4, 8, 8)}
    boxes = [torch.tensor([[0.0, 0, 20, 30], [10, 10, 250, 200]]), torch.tensor([[5.0, 5, 100, 120]])]
    stock = MultiScaleRoIAlign(["0", "1"], 7, 2)
    ours = SeparableRoIAlign.like(stock)
    assert torch.allclose(ours(features, boxes, [(256, 256)] * 2), stock(features, boxes, [(256, 256)] * 2), atol=1e-5)
