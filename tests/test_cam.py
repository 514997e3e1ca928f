"""Saliency (networks/cam.py): the maps against a hand-written LayerCAM/Grad-CAM, their shape, range
and overlay, that nothing of a call stays alive, and the peak-in-mask check."""

import gc
import weakref

import cv2
import numpy as np
import pytest
import torch

from mtl_meniscus.config import ModelConfig
from mtl_meniscus.networks.cam import cam_layer, overlay, peak_in_mask, saliency_maps
from mtl_meniscus.networks.models import build_model

TASKS = ("fissure", "orientation", "position")


def _by_hand(model, x, task, method):
    """The map as the papers define it, from the layer's maps A and d logit / dA (backward with
    parameter gradients, one task per pass): an independent computation."""
    kept = {}
    handle = cam_layer(model, task).register_forward_hook(lambda _m, _i, out: kept.update(a=out))
    model.eval()
    x = x.clone().requires_grad_(True)
    activation = None
    try:
        logits = model(x)[task]
        activation = kept["a"]
        activation.retain_grad()
        logits.sum().backward()
    finally:
        handle.remove()
    a, g = activation.detach().numpy(), activation.grad.numpy()  # (B, C, h, w)
    weights = g.mean(axis=(2, 3), keepdims=True) if method == "gradcam" else np.maximum(g, 0)
    cams = np.maximum((weights * a).sum(axis=1), 0)
    out = [cv2.resize(c, (x.shape[3], x.shape[2]), interpolation=cv2.INTER_LINEAR) for c in cams]
    return np.stack([c / c.max() if c.max() > 0 else c for c in out])


@pytest.mark.parametrize("name", ["shared", "separate"])
@pytest.mark.parametrize("method", ["layercam", "gradcam"])
def test_saliency_maps_match_the_definition_for_every_task_from_one_call(name, method):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, widths=(4, 8, 8, 8), dense=(8, 4)))
    x = torch.randn(2, 2, 64, 64)
    maps = saliency_maps(model, x, TASKS, method=method)
    assert list(maps) == list(TASKS)
    for task in TASKS:
        cam = maps[task]
        assert cam.shape == (2, 64, 64) and cam.dtype == np.float32
        assert cam.min() >= 0 and cam.max() <= 1
        np.testing.assert_allclose(cam, _by_hand(model, x, task, method), atol=1e-5)
    picture = overlay(np.random.default_rng(0).normal(size=(64, 64)), maps["position"][0])
    assert picture.shape == (64, 64, 3) and picture.dtype == np.uint8


def test_a_saliency_call_keeps_nothing_alive():
    """Hooks that kept the maps in a dict held each call's autograd graph (about 2.6 MB per slice,
    never freed, even by gc.collect: a long predict --cam or serve with saliency grew without end)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="shared", widths=(4, 8, 8, 8), dense=(8, 4)))
    seen = []
    handle = cam_layer(model, "fissure").register_forward_hook(
        lambda _m, _i, out: seen.append(weakref.ref(out))
    )
    maps = saliency_maps(model, torch.randn(1, 2, 64, 64), TASKS)
    handle.remove()
    assert set(maps) == set(TASKS)
    gc.collect()
    assert len(seen) == 1 and seen[0]() is None  # the layer's feature maps (and their graph) are gone
    assert all(p.grad is None for p in model.parameters())  # and no parameter gradient was taken


def test_peak_in_mask():
    cam = np.zeros((32, 32), np.float32)
    cam[10, 20] = 1
    mask = np.zeros((32, 32), bool)
    mask[10, 25] = True
    assert peak_in_mask(cam, mask, dilation_px=5) and not peak_in_mask(cam, mask, dilation_px=2)
