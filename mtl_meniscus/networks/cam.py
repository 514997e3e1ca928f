"""Saliency maps with forward/backward hooks: LayerCAM (Jiang et al. 2021) by default, Grad-CAM
(Selvaraju et al. 2017) on request; no extra dependency."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from mtl_meniscus.errors import ConfigError
from mtl_meniscus.io.imageio import write_png
from mtl_meniscus.networks.models import SeparateCascade, SharedTrunkNet


def cam_layer(model: nn.Module, task: str) -> nn.Module:
    """The last feature-map layer that `task`'s logit depends on (the trunk's last block)."""
    if isinstance(model, SeparateCascade):
        model = model.networks[task]
    if isinstance(model, SharedTrunkNet):
        return model.trunk.cam_layer()
    raise TypeError(f"Grad-CAM does not know the layers of {type(model).__name__}")


def knows_layers(model: nn.Module, task: str) -> bool:
    """Whether cam_layer finds `task`'s feature maps in `model` (this package's networks; not a plug-in's)."""
    try:
        cam_layer(model, task)
    except TypeError:
        return False
    return True


def saliency_maps(
    model: nn.Module,
    x: torch.Tensor,
    tasks: Sequence[str],
    method: str = "layercam",
    horns: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """{task: (B, H, W) saliency maps in [0, 1]}, resized to the input size.

    One forward pass serves every task; each task's gradient is taken with torch.autograd.grad to
    its own layer's feature maps only (no parameter gradients). Hooks that kept the maps in a dict
    also kept each call's autograd graph alive (about 2.6 MB per slice of a long predict --cam).

    A ROI model (model.roi) gets its `horns` (B, 2, 3) if it takes them; its map is drawn on the
    whole-image trunk, so it shows that trunk's part of the logit only, not the horn crops'.

    method 'gradcam': ReLU(sum_c mean_xy(dlogit/dA_c) * A_c) (Selvaraju et al. 2017).
    method 'layercam': ReLU(sum_c ReLU(dlogit/dA_c) * A_c), weights kept per location (Jiang et
    al. 2021). Our trunks end in max-pooling, whose gradients reach a few locations only; averaged
    over the map they mostly cancel, and plain Grad-CAM was often empty on the phantom.
    """
    if method not in ("gradcam", "layercam"):
        raise ConfigError(f"unknown saliency method {method!r} (allowed: gradcam, layercam)")
    layers = {task: cam_layer(model, task) for task in tasks}  # a cascade: one per task
    activations: dict[nn.Module, torch.Tensor] = {}

    def keep_activation(module, _inputs, output):
        activations[module] = output

    handles = [layer.register_forward_hook(keep_activation) for layer in set(layers.values())]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = x.detach().float().requires_grad_(True)  # fp32: gradients of bf16 maps are coarse
            logits = model(x, *([horns] if horns is not None else []))  # {task: (B,)}
            gradients = {
                task: torch.autograd.grad(
                    logits[task].sum(), activations[layers[task]], retain_graph=k < len(tasks) - 1
                )[0]
                for k, task in enumerate(tasks)
            }  # {task: (B, C, h, w)}
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    size = (x.shape[3], x.shape[2])
    return {
        task: _maps(activations[layers[task]].detach().float(), gradients[task].float(), method, size)
        for task in tasks
    }


def _maps(activation: torch.Tensor, gradient: torch.Tensor, method: str, size: tuple[int, int]) -> np.ndarray:
    """(B, H, W) float32 maps in [0, 1] from a layer's (B, C, h, w) feature maps and the logit's
    gradient to them, each resized to `size` (W, H) and divided by its peak."""
    if method == "gradcam":
        weights = gradient.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    else:
        weights = torch.relu(gradient)  # (B, C, h, w)
    cam = torch.relu((weights * activation).sum(dim=1))  # (B, h, w)
    maps = []
    for one in cam.cpu().numpy():
        one = cv2.resize(one, size, interpolation=cv2.INTER_LINEAR)
        peak = one.max()
        maps.append(one / peak if peak > 0 else one)
    return np.stack(maps).astype(np.float32)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """BGR uint8 picture: the grey slice (1st-99th percentile window) under a jet-coloured map."""
    low, high = np.percentile(image, [1, 99])
    grey = np.clip((image - low) / max(high - low, 1e-6) * 255, 0, 255).astype(np.uint8)
    heat = cv2.applyColorMap((np.clip(cam, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), 1 - alpha, heat, alpha, 0)


def write_overlays(folder: Path, name: str, image: np.ndarray, cams: dict[str, np.ndarray]) -> list[Path]:
    """One PNG per task: <folder>/<name>_<task>.png."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, cam in cams.items():
        path = folder / f"{name}_{task}.png"
        write_png(path, overlay(image, cam), "the overlay ")
        paths.append(path)
    return paths


def unique_names(paths: Sequence[str], short: Callable[[str], str]) -> list[str]:
    """`short(path)` for each path (e.g. its file name), except where two paths share it: those are
    named after their whole path ('a/x.png' -> 'a_x_png'), with '-2', '-3' added if still equal."""
    counts = Counter(short(p) for p in paths)
    names = [
        short(p) if counts[short(p)] == 1 else re.sub(r"[^A-Za-z0-9-]+", "_", p).strip("_") for p in paths
    ]
    seen: Counter = Counter()
    unique = []
    for name in names:
        seen[name] += 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return unique


def peak_in_mask(cam: np.ndarray, mask: np.ndarray, dilation_px: int = 5) -> bool:
    """True when the map's maximum falls inside the mask dilated by `dilation_px` pixels."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilation_px + 1, 2 * dilation_px + 1))
    grown = cv2.dilate(mask.astype(np.uint8), kernel) > 0
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return bool(grown[y, x])
