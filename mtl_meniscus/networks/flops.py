"""Floating-point operations a network costs per image, counted by PyTorch's own counter
(torch.utils.flop_counter.FlopCounterMode: 2 per multiply-add of every matmul and convolution,
forward and backward), never by hand. `compare` uses them to give the modes equal training compute
(`--budget equal-flops`) and to report each variant's training FLOPs."""

from __future__ import annotations

import torch
from torch import nn

from mtl_meniscus.networks.models import needs_horns, reset_roi_fallbacks, segments


def _counted(model: nn.Module, x: torch.Tensor, backward: bool) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    # a ROI model of horns found outside it: none found, so the fallback windows (crops cost the same)
    horns = (torch.zeros(len(x), 2, 3),) if needs_horns(model) else ()
    with FlopCounterMode(display=False) as counter:
        # a segmenting network's training step runs its decoder too, as does a network that only
        # segments (the cascade's segmentation network: no task output)
        if segments(model) and (backward or not getattr(model, "tasks", True)):
            outputs, pixels = model.forward_with_segmentation(x, *horns)
            outputs = {**outputs, "segmentation": pixels}
        else:
            outputs = model(x, *horns)
        if backward:  # a training step: the loss's gradient reaches every weight and the input's layers
            sum(value.float().sum() for value in outputs.values()).backward()
    return counter.get_total_flops()


def flops_per_image(model: nn.Module, in_chans: int, image_size: int, training: bool = False) -> float:
    """FLOPs of one image through `model` ({task: logits} out): the forward pass, or with
    `training` the forward and backward passes of a training step. Counted on a batch of two (batch
    norm needs more than one image in training mode) and halved; the model's mode and gradients are
    left as they were."""
    was_training = model.training
    model.train(training)
    x = torch.randn(2, in_chans, image_size, image_size)
    try:
        if training:
            total = _counted(model, x, backward=True)
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                total = _counted(model, x, backward=False)
    finally:
        model.train(was_training)
        reset_roi_fallbacks(model)  # the counted batch is not an image the model was asked about
    return total / 2
