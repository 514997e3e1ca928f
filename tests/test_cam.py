"""Saliency (networks/cam.py): Grad-CAM maps' shape, range and overlay, and the peak-in-mask check."""

import numpy as np
import pytest
import torch

from mtl_meniscus.config import ModelConfig
from mtl_meniscus.networks.cam import grad_cam, overlay, peak_in_mask
from mtl_meniscus.networks.models import build_model


@pytest.mark.parametrize("name", ["shared", "separate"])
def test_grad_cam_shape_range_and_locality(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, widths=(4, 8, 8, 8), dense=(8, 4)))
    x = torch.randn(2, 2, 64, 64)
    for task in ("fissure", "orientation", "position"):
        cam = grad_cam(model, x, task)
        assert cam.shape == (2, 64, 64) and cam.dtype == np.float32
        assert cam.min() >= 0 and cam.max() <= 1
    picture = overlay(np.random.default_rng(0).normal(size=(64, 64)), cam[0])
    assert picture.shape == (64, 64, 3) and picture.dtype == np.uint8


def test_peak_in_mask():
    cam = np.zeros((32, 32), np.float32)
    cam[10, 20] = 1
    mask = np.zeros((32, 32), bool)
    mask[10, 25] = True
    assert peak_in_mask(cam, mask, dilation_px=5) and not peak_in_mask(cam, mask, dilation_px=2)
