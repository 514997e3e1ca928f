"""Networks. Every model maps x (B, C, H, W) to {task: logits (B,)} for the tasks it predicts.

- ConvTrunk: the reference method's conv blocks (here conv + 2x2 max-pool + BatchNorm + ReLU +
  dropout, or a stride-2 conv in place of conv + pool: ConvBlock says why), then adaptive average
  pooling to a small grid and flatten, so that *where* a tear is (anterior/posterior horn)
  survives into the features.
- DenseHead: the reference method's dense 32 -> 16 -> 1 head with dropout.
- SharedTrunkNet: one trunk, one head per task.
- SeparateCascade: the reference method's three independent networks behind the same contract.
- SegmentationDecoder: with model.segmentation, a U-Net decoder on the shared trunk's stages giving
  per-pixel logits (background, meniscus, tear); SharedTrunkNet.forward still returns the task
  dict only, and forward_with_segmentation both (see SharedTrunkNet).
- ROI-first classification (model.roi): a crop trunk on fixed-size crops around the two meniscus
  horns, its features beside the whole image's in the heads; a ROI model of horns found outside
  it is called as model(x, horns) (see SharedTrunkNet).
- ExamNet: a slice network run on every slice of whole exams, its features pooled over each exam's
  slices (SlicePooling) into its heads. It maps (x (N, C, H, W): the slices of B exams one after
  another, lengths (B,): each exam's slice count) to {task: logits (B,)}: one row per exam.
Models are built by name from a ModelConfig through the MODELS registry (model.name).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from mtl_meniscus.config import OWN_TRUNKS, SEGMENTATION, ModelConfig, roi_crop_pixels
from mtl_meniscus.errors import ConfigError, ConfigValueError, MeniscusError
from mtl_meniscus.io.orientation import POSTERIOR_IS_RIGHT
from mtl_meniscus.io.outputs import some_of
from mtl_meniscus.registry import Registry


class ConvBlock(nn.Sequential):
    """conv(k) + 2x2 max-pool + BatchNorm + ReLU + dropout: halves H and W.

    Pooling comes before normalisation: max-pool commutes with ReLU and with BatchNorm's
    positive-scale affine map, and BatchNorm's backward on the full-resolution map was
    43% of a training step on CPU (torch.profiler); after the pool it runs on 4x fewer values.
    """

    def __init__(self, in_chans: int, out_chans: int, kernel: int, dropout: float, strided: bool = False):
        downsample = (
            [nn.Conv2d(in_chans, out_chans, kernel, stride=2, padding=kernel // 2, bias=False)]
            if strided
            else [nn.Conv2d(in_chans, out_chans, kernel, padding=kernel // 2, bias=False), nn.MaxPool2d(2)]
        )
        super().__init__(
            *downsample,
            nn.BatchNorm2d(out_chans),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        )


class GridPool(nn.Module):
    """maps (B, C, h, w) -> (B, 2C * g * g): max- and average-pooled to a g x g grid, flattened."""

    def __init__(self, grid: int):
        super().__init__()
        self.max_pool = nn.AdaptiveMaxPool2d(grid)
        self.avg_pool = nn.AdaptiveAvgPool2d(grid)
        self.grid = grid

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.max_pool(maps), self.avg_pool(maps)], dim=1).flatten(1)


class ConvTrunk(nn.Module):
    """Stack of ConvBlocks: forward_features (B, C, H, W) -> maps; forward -> pooled (B, num_features)."""

    def __init__(
        self,
        in_chans: int,
        widths: Sequence[int],
        kernels: Sequence[int],
        pool_grid: int,
        dropout: float,
        strided_blocks: int = 0,
    ):
        super().__init__()
        blocks, chans = [], in_chans
        for k, (width, kernel) in enumerate(zip(widths, kernels)):
            blocks.append(ConvBlock(chans, width, kernel, dropout, strided=k < strided_blocks))
            chans = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = GridPool(pool_grid)
        self.num_features = 2 * chans * pool_grid * pool_grid

    def cam_layer(self) -> nn.Module:
        return self.blocks[-1]

    @property
    def stage_widths(self) -> list[int]:
        """The channels of forward_stages' maps, shallowest first."""
        return [block[0].out_channels for block in self.blocks]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)  # (B, C, H / 2^blocks, W / 2^blocks)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every block's maps, shallowest first: [(B, C_k, H / 2^(k+1), W / 2^(k+1))]; the last is
        forward_features'."""
        stages = []
        for block in self.blocks:
            x = block(x)
            stages.append(x)
        return stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x))  # (B, 2C * g * g)


class PlainTrunk(nn.Module):
    """The floor every preset is measured against: a plain CNN of five conv3x3-BN-ReLU-maxpool
    blocks (16/32/64/64/96 filters) and global average pooling; forward -> (B, 96).

    Deliberately fixed (model.widths, kernels, pool_grid and dropout do not apply) so that "plain"
    means the same network in every run, compare table and bench report.

    Each block runs as conv-BN-maxpool-ReLU, which computes exactly conv-BN-ReLU-maxpool (max-pool
    commutes with ReLU, both being monotone) with the ReLU and its backward on 4x fewer values:
    they were 21% of a bf16 training step at 256 px (torch.profiler), and the step ran 1.2x faster.
    """

    WIDTHS = (16, 32, 64, 64, 96)

    def __init__(self, in_chans: int):
        super().__init__()
        blocks, chans = [], in_chans
        for width in self.WIDTHS:
            blocks += [
                nn.Conv2d(chans, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.MaxPool2d(2),
                nn.ReLU(inplace=True),
            ]
            chans = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = chans

    def cam_layer(self) -> nn.Module:
        return self.blocks

    @property
    def stage_widths(self) -> list[int]:
        """The channels of forward_stages' maps, shallowest first."""
        return list(self.WIDTHS)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)  # (B, 96, H / 32, W / 32)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each block's output, shallowest first: [(B, C_k, H / 2^(k+1), W / 2^(k+1))]."""
        stages = []
        for layer in self.blocks:
            x = layer(x)
            if isinstance(layer, nn.ReLU):  # the block's last layer
                stages.append(x)
        return stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x))  # (B, 96)


class _ForwardFeatures(nn.Module):
    """A timm model seen through forward_features, so hooks see its last feature maps."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)  # (B, C, h, w)


class TimmTrunk(nn.Module):
    """Any timm model as the trunk (in_chans adapted by timm, no classifier) + the same grid pooling."""

    def __init__(self, name: str, in_chans: int, pool_grid: int, pretrained: str):
        super().__init__()
        self.backbone = _ForwardFeatures(create_timm_backbone(name, in_chans, pretrained))
        chans = self.backbone.model.feature_info[-1]["num_chs"]
        self.pool = GridPool(pool_grid)
        self.num_features = 2 * chans * pool_grid * pool_grid

    def cam_layer(self) -> nn.Module:
        return self.backbone

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # (B, C, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x))  # (B, 2C * g * g)


def check_trunk(name: str) -> None:
    """model.trunk is this package's (OWN_TRUNKS) or a timm model's name: a typo is named with the
    choices before any data is read (a timm name is only looked up, nothing is built)."""
    if name in OWN_TRUNKS:
        return
    import timm

    if not timm.is_model(name):
        raise ConfigValueError(
            "model.trunk",
            f"config key 'model.trunk': unknown trunk {name!r} (this package's: {', '.join(OWN_TRUNKS)}; "
            "or a timm model, e.g. resnet50, vgg16, vgg19)",
        )


_HUB_FLAG = threading.Lock()


@contextmanager
def _hub_cache_only() -> Iterator[None]:
    """Hugging Face hub downloads off: timm's default weights come from the local cache or not at
    all (offline, the hub's retries took 52 s to fail). The few timm models whose weights are a URL
    rather than a hub entry are still fetched by torch.hub, which fails at once offline."""
    try:
        from huggingface_hub import constants
    except ImportError:  # timm without the hub reads its weights from files only
        yield
        return
    with _HUB_FLAG:  # one holder at a time (tune's threads): none restores the flag under another
        saved, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = saved


def create_timm_backbone(name: str, in_chans: int, pretrained: str) -> nn.Module:
    """timm model without classifier; weights: 'none', 'default' (timm's, local cache only) or a file.

    Requested weights that cannot be found stop the run with instructions: never a silent
    fall-back to random weights.
    """
    import timm

    check_trunk(name)
    kwargs = dict(num_classes=0, in_chans=in_chans, global_pool="")
    how_to = (
        f"download {name}'s weights on a machine with internet access (timm / Hugging Face hub) and "
        "pass --pretrained /path/to/weights.pth (or .safetensors), or --pretrained none to train from scratch"
    )
    if pretrained == "none":
        return timm.create_model(name, pretrained=False, **kwargs)
    if pretrained == "default":
        try:
            with _hub_cache_only():
                return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as err:  # not in the cache (or not a hub model): many exception types
            raise MeniscusError(
                f"pretrained weights for {name} are not in the local Hugging Face cache, which 'default' "
                f"reads with downloads off ({type(err).__name__}); fill it on a machine with internet access "
                f"(python -c \"import timm; timm.create_model('{name}', pretrained=True)\") and copy "
                f"~/.cache/huggingface/hub here, or {how_to}"
            ) from None
    path = Path(pretrained)
    if not path.is_file():
        raise MeniscusError(f"pretrained weights file not found: {path}; {how_to}")
    try:
        model = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs
        )
        stored = timm.models.load_state_dict(str(path))  # as timm read it: a checkpoint's weights unwrapped
    except Exception as err:
        raise MeniscusError(
            f"{path}: cannot load as {name} weights: a file of weights that timm reads is a torch.save "
            f".pth/.pt or a .safetensors ({type(err).__name__}: {str(err)[:200]})"
        ) from None
    _check_weights_loaded(model, stored, name, path, how_to)
    return model


def _check_weights_loaded(model: nn.Module, stored: dict, name: str, path: Path, how_to: str) -> None:
    """A MeniscusError naming the file when most of the network's tensors are not in it. timm loads
    a file leniently (a classifier or a torchvision VGG's names may differ), so a file of other
    names (every key prefixed 'model.', another network's) loaded nothing and the trunk trained
    from random weights, only timm's log line saying so."""
    expected = [key for key in model.state_dict() if not key.endswith("num_batches_tracked")]
    missing = [key for key in expected if key not in stored]
    if len(missing) <= len(expected) // 2:
        return
    unexpected = [key for key in stored if key not in model.state_dict()]
    raise MeniscusError(
        f"{path}: not {name} weights: {len(missing)} of the network's {len(expected)} tensors are not "
        f"in it (e.g. {some_of(missing, 3)})"
        + (f"; the file's names are e.g. {some_of(unexpected, 3)}" if unexpected else "")
        + f"; {how_to}"
    )


class DenseHead(nn.Sequential):
    """features (B, F) -> logits (B,) through dense layers with leaky ReLU and dropout.

    Leaky, not plain, ReLU: with plain ReLU the 16-unit layer of a head could die early in
    training (every unit negative on every input) and the head then output a constant for good;
    we saw the orientation head stuck at AUC exactly 0.500 for 7 epochs on the phantom.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], dropout: float):
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_features, width), nn.LeakyReLU(0.01, inplace=True), nn.Dropout(dropout)]
            in_features = width
        layers.append(nn.Linear(in_features, 1))
        super().__init__(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(features).squeeze(1)


SEGMENTATION_CLASSES = 3  # background, meniscus, tear: the label values of data/masks.py
# The decoder's narrowest stage (the tiny preset's trunk starts with 4 filters; the default's 16).
DECODER_MIN_WIDTH = 16
# The classifier's bias starts at the log of a typical pixel share of each class (the phantom's:
# 98.5% background, 1.35% meniscus, 0.15% tear), the prior initialisation of Lin et al. 2017
# (RetinaNet). From zero bias the first steps went into learning that most pixels are background
# and the decoder stayed at all-background for long: the tiny preset with the classification
# losses on 40 phantom images, 3 seeds, held-out meniscus Dice after 90 steps 0.24, 0, 0 (after
# 120: 0.74, 0, 0.70); with the prior, 0.65, 0.63, 0.65 after 30 steps.
CLASS_PRIOR = (0.985, 0.0135, 0.0015)


class ContiguousGroupNorm(nn.GroupNorm):
    """nn.GroupNorm computed on a contiguous (NCHW) copy of a bf16 CPU map that is not contiguous
    (channels_last in training), returned as channels_last; other maps go straight through.
    PyTorch's CPU GroupNorm backward on channels_last bf16 takes a slow path: 249 vs 46 ms on a
    (32, 16, 256, 256) map, and with this a segmenting training step at batch 32, 256 px ran 1.27x
    faster (bf16, AMX machine) despite the two copies. On fp32 maps the copies cost more than they
    save (forward and backward 239 vs 179 ms on that map, AMD Zen 5), so they go straight through.
    Same parameters and state_dict as nn.GroupNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous() or x.device.type != "cpu" or x.dtype != torch.bfloat16:
            return super().forward(x)
        return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm, not BatchNorm: each row's decoder output depends on that row alone, so a row
    without a mask (left out of the loss) gives the decoder exactly no gradient, and the statistics
    do not depend on how many rows of a batch have masks."""
    return ContiguousGroupNorm(math.gcd(channels, 8), channels)


class DecoderStage(nn.Module):
    """Upsample a map to its skip's size, concatenate the skip, then conv3x3-GroupNorm-ReLU:
    (B, C_in, h, w), skip (B, C_skip, 2h, 2w) -> (B, C_out, 2h, 2w)."""

    def __init__(self, in_chans: int, skip_chans: int, out_chans: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans + skip_chans, out_chans, 3, padding=1, bias=False),
            _norm(out_chans),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # nearest to the skip's size (not a fixed x2): an odd size halved by max-pool rounds down
        up = nn.functional.interpolate(x, size=skip.shape[-2:], mode="nearest")
        # the skip in the map's dtype: under CPU bf16 autocast the input image (fp32) would promote
        # the whole full-resolution concatenation to fp32, only for the conv to cast it back (same
        # values); under CUDA autocast GroupNorm gives fp32 maps and the cast leaves them as before
        return self.conv(torch.cat([up, skip.to(up.dtype)], dim=1))


class SegmentationDecoder(nn.Module):
    """A small U-Net decoder on the trunk's stages: from the deepest map up, each DecoderStage
    takes the next shallower stage as its skip (widths mirroring the trunk's), the last one the
    input itself; then a 1x1 conv to the classes. Maps the input x (B, C, H, W) and the trunk's
    stages [(B, C_k, H / 2^(k+1), W / 2^(k+1))] to logits (B, 3, H, W)."""

    def __init__(self, in_chans: int, stage_widths: Sequence[int]):
        super().__init__()
        widths = list(stage_widths)
        # Stage k lands on the level of its skip, one shallower than trunk stage k (the input for
        # k = 0), with that level's trunk width (the first one at full resolution), at least
        # DECODER_MIN_WIDTH; it takes the deeper stage's output (the deepest: the trunk's maps).
        skips = [in_chans, *widths[:-1]]
        outs = [max(width, DECODER_MIN_WIDTH) for width in (widths[0], *widths[:-1])]
        ins = [*outs[1:], widths[-1]]
        self.stages = nn.ModuleList(DecoderStage(i, s, o) for i, s, o in zip(ins, skips, outs))
        self.classify = nn.Conv2d(outs[0], SEGMENTATION_CLASSES, 1)
        with torch.no_grad():
            self.classify.bias.copy_(torch.log(torch.tensor(CLASS_PRIOR)))

    def forward(self, x: torch.Tensor, stages: Sequence[torch.Tensor]) -> torch.Tensor:
        skips = [x, *stages[:-1]]
        y = stages[-1]
        for stage, skip in zip(reversed(self.stages), reversed(skips)):
            y = stage(y, skip)
        return self.classify(y)  # (B, 3, H, W)


# Where a ROI model crops when a horn was not found: the phantom's mean horn centres as shares of
# the width and height (x, y), anterior then posterior, measured over 200 images at the easy and
# realistic levels (sd 0.03-0.04 of the size): the joint line, a horn's usual place in the canonical
# view, posterior on the right (io/orientation.py).
HORN_FALLBACK = ((0.35, 0.49), (0.65, 0.48)) if POSTERIOR_IS_RIGHT else ((0.65, 0.49), (0.35, 0.48))


def horn_crops(x: torch.Tensor, centres: torch.Tensor, size: int) -> torch.Tensor:
    """Fixed-size crops of x (B, C, H, W) centred on centres (B, K, 2) (x, y in pixel coordinates,
    pixel k covering k..k+1): (K * B, C, size, size), all images' first crop, then their second...
    Pixels past the image repeat its nearest border pixel, as data/roi.py crop_around pads "edge"
    (the window starts at floor(centre - size / 2), as window_around's)."""
    batch, _, height, width = x.shape
    start = torch.floor(centres - size / 2).long()  # (B, K, 2)
    offsets = torch.arange(size, device=x.device)
    columns = (start[..., 0:1] + offsets).clamp(0, width - 1)  # (B, K, S)
    rows = (start[..., 1:2] + offsets).clamp(0, height - 1)
    images = torch.arange(batch, device=x.device)[:, None, None, None]
    # the advanced indices come first in the result: (B, K, S, S, C)
    crops = x[images, :, rows[..., :, None], columns[..., None, :]]
    crops = crops.permute(1, 0, 4, 2, 3).reshape(-1, x.shape[1], size, size)  # (K * B, C, S, S)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return crops.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# A predicted horn has at least this share of the image's pixels (data/roi.py's smallest horn box).
HORN_MIN_SHARE = 0.001


def predicted_horns(pixels: torch.Tensor) -> torch.Tensor:
    """Horns (B, 2, 3) (x, y, found; anterior first) from segmentation logits (B, 3, H, W): the
    centroid of the pixels whose most probable class is meniscus or tear, on each side of their
    common centroid's column.

    Kept simple and without connected components (awkward in torch): two horns of similar size lie
    on either side of their common centre; a stray pixel pulls its side's centre by its share of that
    side's pixels. A side with fewer than HORN_MIN_SHARE of the image's pixels has no horn (found 0:
    the fallback window). No gradient: the decoder learns from its own loss only."""
    pixels = pixels.detach()
    batch, _, height, width = pixels.shape
    horn = (pixels.argmax(1) > 0).float()  # (B, H, W): meniscus or tear
    xs = torch.arange(width, device=pixels.device, dtype=horn.dtype) + 0.5  # pixel centres
    ys = torch.arange(height, device=pixels.device, dtype=horn.dtype)[:, None] + 0.5
    middle = (horn * xs).sum((1, 2)) / horn.sum((1, 2)).clamp(min=1)  # (B,)
    left = horn * (xs < middle[:, None, None])
    sides = []
    for side in (left, horn - left):
        count = side.sum((1, 2))  # (B,)
        centre_x = (side * xs).sum((1, 2)) / count.clamp(min=1)
        centre_y = (side * ys).sum((1, 2)) / count.clamp(min=1)
        found = (count >= HORN_MIN_SHARE * height * width).to(horn.dtype)
        sides.append(torch.stack([centre_x, centre_y, found], dim=1))  # (B, 3)
    anterior, posterior = sides if POSTERIOR_IS_RIGHT else sides[::-1]
    return torch.stack([anterior, posterior], dim=1)  # (B, 2, 3)


class SharedTrunkNet(nn.Module):
    """One trunk feeding one head per task: the shared representation of the reference's next step.

    With `segmentation` it also holds a SegmentationDecoder on the trunk's stages. `forward` stays
    the classification contract {task: (B,) logits} and never runs the decoder (except with roi
    predicted, whose crops need it), so inference, saliency, export and predict are unchanged and
    no slower; the decoder's output comes from
    forward_with_segmentation, which training reaches through SegmentationTraining (a module whose
    forward it is, so that DDP sees the call).

    With `roi` (model.roi other than none) it also holds a `crop_trunk` (built as the trunk, its own
    weights, shared by the two horns): a crop of roi_crop pixels per ROI_REFERENCE_SIZE of the input
    around each horn goes through it, and the heads read the whole image's features followed by the
    anterior and the posterior crop's. The horns come in as forward(x, horns), horns (B, 2, 3) (x,
    y, found; roi classical and truth: found outside the network, data/roi.py), or from the decoder
    (roi predicted: forward(x) runs it; a cascade's classifier of roi predicted has no decoder and
    is given the horns of the cascade's segmentation network). A horn not found is cropped at
    HORN_FALLBACK, and counted (roi_fallbacks). With no task (tasks ()) and a decoder it is a
    segmentation network only: the cascade's (SeparateCascade)."""

    def __init__(
        self,
        trunk: nn.Module,
        tasks: Sequence[str],
        hidden: Sequence[int],
        dropout: float,
        segmentation: bool = False,
        in_chans: int = 2,
        roi: str = "none",
        roi_crop: int = 96,
        crop_trunk: nn.Module | None = None,
    ):
        super().__init__()
        self.tasks = tuple(tasks)
        self.trunk = trunk
        self.roi, self.roi_crop = roi, roi_crop
        # what the heads read: the image's features, then (roi) the two crops'
        crops = 2 * crop_trunk.num_features if crop_trunk is not None else 0
        self.num_features = trunk.num_features + crops
        self.heads = nn.ModuleDict({t: DenseHead(self.num_features, hidden, dropout) for t in self.tasks})
        # absent, not None-valued, without segmentation: the state_dict is the one it always was
        if segmentation:
            self.decoder = SegmentationDecoder(in_chans, trunk.stage_widths)
        if roi != "none":
            self.crop_trunk = crop_trunk
            # [images seen, of which cropped at a fallback window]: not saved (persistent=False)
            self.register_buffer("roi_fallbacks", torch.zeros(2, dtype=torch.long), persistent=False)

    @property
    def segments(self) -> bool:
        """True when the network has a segmentation decoder."""
        return hasattr(self, "decoder")

    # timm's naming: forward_features gives the trunk's maps, forward_head pools them and applies the heads.
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(x)  # (B, C, h, w)

    def forward_head(
        self, maps: torch.Tensor, horn_features: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        features = self.trunk.pool(maps)  # (B, F)
        if horn_features is not None:  # a ROI model's: (B, 2 F_crop) after the image's
            features = torch.cat([features, horn_features], dim=1)
        return {task: head(features) for task, head in self.heads.items()}  # {task: (B,) logits}

    def forward(self, x: torch.Tensor, horns: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.roi == "none":
            return self.forward_head(self.forward_features(x))
        if self.roi == "predicted" and self.segments:  # its own decoder finds the horns
            return self.forward_with_segmentation(x)[0]
        return self.forward_head(self.forward_features(x), self.horn_features(x, horns))

    def forward_with_segmentation(
        self, x: torch.Tensor, horns: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({task: (B,) logits} as forward gives them, segmentation logits (B, 3, H, W)), from one
        pass of the trunk."""
        stages = self.trunk.forward_stages(x)
        if self.roi == "none":  # heads first, as always: the gradients sum in the same order
            return self.forward_head(stages[-1]), self.decoder(x, stages)
        pixels = self.decoder(x, stages)
        if self.roi == "predicted":
            horns = predicted_horns(pixels)
        return self.forward_head(stages[-1], self.horn_features(x, horns)), pixels

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits (B, 3, H, W) alone: the trunk's stages and the decoder, no heads."""
        return self.decoder(x, self.trunk.forward_stages(x))

    def horn_features(self, x: torch.Tensor, horns: torch.Tensor | None) -> torch.Tensor:
        """(B, 2 F_crop): the crop trunk's features of the anterior horn's crop, then the posterior's;
        a horn not found (horns[..., 2] == 0) is cropped at its HORN_FALLBACK window."""
        if horns is None:
            raise MeniscusError(
                f"this network crops around horns found outside it (model.roi {self.roi}): call it as "
                "model(x, horns), horns (B, 2, 3) from data/roi.py HornCentres"
            )
        batch, _, height, width = x.shape
        found = horns[..., 2:] > 0.5  # (B, 2, 1)
        scale = torch.tensor([width, height], dtype=horns.dtype, device=horns.device)
        fallback = torch.tensor(HORN_FALLBACK, dtype=horns.dtype, device=horns.device) * scale  # (2, 2)
        centres = torch.where(found, horns[..., :2], fallback)  # (B, 2, 2)
        with torch.no_grad():  # no .item(): the counts stay on the device until read
            self.roi_fallbacks[0] += batch
            self.roi_fallbacks[1] += (~found).any(1).sum()
        size = roi_crop_pixels(self.roi_crop, max(height, width))
        features = self.crop_trunk(horn_crops(x, centres, size))  # (2B, F_crop)
        return torch.cat([features[:batch], features[batch:]], dim=1)  # (B, 2 F_crop)


class SegmentationTraining(nn.Module):
    """A segmenting network seen through forward_with_segmentation: what the trainer calls (and
    DDP wraps), so the network's own forward keeps the classification contract."""

    def __init__(self, network: SharedTrunkNet):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, *horns: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return self.network.forward_with_segmentation(x, *horns)


def segments(model: nn.Module) -> bool:
    """True for a network with a segmentation decoder (SharedTrunkNet with segmentation)."""
    return bool(getattr(model, "segments", False))


def classifies(model: nn.Module) -> bool:
    """False only for a network without a task (the cascade's segmentation network); a registered
    model need not list its tasks (MODELS.register, registry.py), so one without `tasks` classifies."""
    return bool(getattr(model, "tasks", True))


def _networks(model: nn.Module) -> list[nn.Module]:
    """The slice classifiers of a model: the cascade's (without its segmentation network), or the
    model itself; an exam model's slice network."""
    networks = model.classifiers if isinstance(model, SeparateCascade) else [model]
    return [getattr(network, "slice_net", network) for network in networks]


def roi_of(model: nn.Module) -> str:
    """The model's model.roi: 'none' for a model that crops nothing (the cascade's networks share it)."""
    return getattr(_networks(model)[0], "roi", "none")


def needs_horns(model: nn.Module) -> bool:
    """True for a model called as model(x, horns): it crops around horns found outside it (roi
    classical or truth; roi predicted without a decoder of its own: a cascade's classifier, trained
    on the horns of the cascade's segmentation network)."""
    roi = roi_of(model)
    return roi in ("classical", "truth") or (roi == "predicted" and not segments(model))


def roi_fallback_counts(model: nn.Module) -> tuple[int, int]:
    """(images a ROI model has cropped since reset_roi_fallbacks, of which at a fallback window);
    (0, 0) for other models. A cascade's networks see the same images: its first network's."""
    counts = getattr(_networks(model)[0], "roi_fallbacks", None)
    return (0, 0) if counts is None else (int(counts[0]), int(counts[1]))


def reset_roi_fallbacks(model: nn.Module) -> None:
    """Start roi_fallback_counts again from zero."""
    for network in _networks(model):
        if hasattr(network, "roi_fallbacks"):
            network.roi_fallbacks.zero_()


class SlicePooling(nn.Module):
    """Slice features (N, F) of B exams, one after another, -> one feature vector per exam (B, F).

    max: each feature's highest value over the exam's slices (MRNet's pooling). attention: a
    weighted mean whose weights a small network computes from each slice's features (the
    attention-based multiple-instance pooling of Ilse, Tomczak & Welling 2018), so the model can
    learn which slices matter. Both ignore the order of the slices.
    """

    def __init__(self, kind: str, num_features: int, hidden: int = 64):
        super().__init__()
        self.kind = kind
        if kind == "attention":
            self.score = nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        elif kind != "max":
            raise ConfigError(
                f"config key 'model.exam_pooling': bad value {kind!r} (allowed: max, attention)"
            )

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        exams = torch.split(features, lengths.tolist())  # B tensors (S_b, F)
        if self.kind == "max":
            return torch.stack([slices.amax(dim=0) for slices in exams])  # (B, F)
        pooled = []
        for slices in exams:
            weights = torch.softmax(self.score(slices).float(), dim=0).to(slices.dtype)  # (S_b, 1)
            pooled.append((weights * slices).sum(dim=0))
        return torch.stack(pooled)  # (B, F)


class ExamNet(nn.Module):
    """A slice network (trunk + heads) on whole exams: the trunk on every slice, the features
    pooled over each exam's slices, the heads on the pooled features (see the module docstring).
    A slice network with roi classical adds each slice's two horn crops' features before the
    pooling: forward(x, lengths, horns), horns (N, 2, 3) every slice's."""

    def __init__(self, slice_net: SharedTrunkNet, pooling: str):
        super().__init__()
        self.tasks = slice_net.tasks
        self.exam_pooling = pooling
        self.slice_net = slice_net
        self.pool = SlicePooling(pooling, slice_net.num_features)

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor, horns: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        features = self.slice_net.trunk(x)  # (N, F), N = lengths.sum()
        if self.slice_net.roi != "none":  # (N, F + 2 F_crop): each slice's crops, as a slice model's
            features = torch.cat([features, self.slice_net.horn_features(x, horns)], dim=1)
        pooled = self.pool(features, lengths)  # (B, F)
        return {task: head(pooled) for task, head in self.slice_net.heads.items()}  # {task: (B,)}


class SeparateCascade(nn.Module):
    """The reference method's independent networks, one per task, behind the shared contract.

    With model.segmentation the cascade has a fourth network of its own, `segmentation` (trunk and
    decoder, no task head; trained first, on the rows with a mask): `segment` is its output, and
    with roi predicted its horns (predicted_horns) are what every classifier crops around, in one
    pass per batch."""

    def __init__(self, networks: dict[str, nn.Module]):
        super().__init__()
        # in the order given (the task table's), the segmentation network first when there is one
        self.tasks = tuple(name for name in networks if name != SEGMENTATION)
        self.networks = nn.ModuleDict(networks)
        self.exam_pooling = getattr(self.classifiers[0], "exam_pooling", None)

    @property
    def classifiers(self) -> list[nn.Module]:
        """The networks of the tasks, in the tasks' order."""
        return [self.networks[task] for task in self.tasks]

    @property
    def segments(self) -> bool:
        """True when the cascade has a segmentation network."""
        return SEGMENTATION in self.networks

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits (B, 3, H, W) of the segmentation network."""
        return self.networks[SEGMENTATION].segment(x)

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> dict[str, torch.Tensor]:
        """{task: (B,) logits}; `extra` is what every classifier takes after x: an exam model's
        lengths, the horns of roi classical or truth (B, 2, 3), or both (exams: each slice's). With
        roi predicted, the segmentation network's horns."""
        if self.segments and roi_of(self) == "predicted":
            extra = (predicted_horns(self.segment(x)),)
        out: dict[str, torch.Tensor] = {}
        for network in self.classifiers:
            out.update(network(x, *extra))
        return {task: out[task] for task in self.tasks}

    def forward_with_segmentation(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(forward(x), segment(x)): the export's contract of a segmenting model."""
        return self.forward(x), self.segment(x)


def takes_exams(model: nn.Module) -> bool:
    """True for a model of whole exams: it is called as model(x, lengths[, horns]), see ExamNet."""
    return getattr(model, "exam_pooling", None) is not None


def _trunk(config: ModelConfig, kernels: Sequence[int]) -> nn.Module:
    if config.trunk == "plain":
        return PlainTrunk(config.in_chans)
    if config.trunk not in OWN_TRUNKS:
        return TimmTrunk(config.trunk, config.in_chans, config.pool_grid, config.pretrained)
    return ConvTrunk(
        config.in_chans,
        config.widths[: len(kernels)],
        kernels,
        config.pool_grid,
        config.conv_dropout,
        config.strided_blocks,
    )


def _net(config: ModelConfig, kernels: Sequence[int], tasks: Sequence[str]) -> SharedTrunkNet:
    """Trunk + one head per task; the plain floor's heads are single linear layers (one linear
    layer for all tasks, split by task), every other trunk's the configured dense heads. With
    model.roi, a crop trunk built as the trunk (its own weights)."""
    trunk = _trunk(config, kernels)
    extras = dict(segmentation=config.segmentation, in_chans=config.in_chans)
    if config.roi != "none":  # built after the trunk: a roi none model draws the same weights as ever
        extras |= dict(roi=config.roi, roi_crop=config.roi_crop, crop_trunk=_trunk(config, kernels))
    if config.trunk == "plain":  # the floor's heads are fixed too
        return SharedTrunkNet(trunk, tasks, (), 0.0, **extras)
    return SharedTrunkNet(trunk, tasks, config.dense, config.dense_dropout, **extras)


def _on_exams(net: SharedTrunkNet, config: ModelConfig) -> nn.Module:
    """The slice network itself, or, with model.exam_pooling, the same network on whole exams."""
    return net if config.exam_pooling is None else ExamNet(net, config.exam_pooling)


MODELS = Registry("model", key="model.name")


def trains_per_task(name: str) -> bool:
    """True for a model of one network per task (the cascade): the engine trains each on its own
    images (fissure on all, the subtypes on tears); False for one network trained on all tasks."""
    per_task = MODELS.facts(name).get("per_task")
    if not isinstance(per_task, bool):
        raise MeniscusError(
            f"model {name!r} is registered without per_task (MODELS.register({name!r}, per_task=False) for "
            "one network of all tasks, per_task=True for one network per task, as the cascade)"
        )
    return per_task


@MODELS.register("shared", per_task=False)
def build_shared(config: ModelConfig) -> nn.Module:
    """Shared trunk (the reference's 4-block trunk by default) with one head per task."""
    return _on_exams(_net(config, config.kernels, config.tasks), config)


def build_single_task(config: ModelConfig, task: str) -> nn.Module:
    """One network of the cascade: fissure has 3 conv blocks, orientation and position 4; the
    segmentation network (model.segmentation) the 4-block trunk, its decoder and no head, cropping
    nothing. A classifier has no decoder: with roi predicted it is given the segmentation network's
    horns."""
    if task == SEGMENTATION:
        return _net(config.model_copy(update={"roi": "none"}), config.kernels, ())
    kernels = config.fissure_kernels if task == "fissure" else config.kernels
    classifier = config.model_copy(update={"segmentation": False})
    return _on_exams(_net(classifier, kernels, (task,)), config)


def cascade_networks(config: ModelConfig) -> tuple[str, ...]:
    """The cascade's networks in training order: the segmentation network first (with
    model.segmentation; the classifiers of roi predicted crop around its horns), then one per task."""
    return ((SEGMENTATION,) if config.segmentation else ()) + tuple(config.tasks)


@MODELS.register("separate", per_task=True)
def build_separate(config: ModelConfig, network: str) -> nn.Module:
    """Three independent single-task networks (the reference baseline).

    A per_task model's builder builds one of its networks (the engine trains each alone, and
    build_model assembles them into a SeparateCascade): here build_single_task's."""
    return build_single_task(config, network)


def build_network(config: ModelConfig, network: str) -> nn.Module:
    """One network of a per_task model (cascade_networks names them), by the model's own builder."""
    return MODELS.get(config.name)(config, network)


def build_model(config: ModelConfig) -> nn.Module:
    """Build a model by name (a registered one) from its config; a per_task model's networks
    (with model.segmentation the segmentation network first) behind the shared contract."""
    if trains_per_task(config.name):
        return SeparateCascade({name: build_network(config, name) for name in cascade_networks(config)})
    return MODELS.get(config.name)(config)


def check_output_contract(config: ModelConfig, image_size: int) -> None:
    """A plug-in model (one whose builder is not this package's) keeps the contract every command
    relies on: its builder returns an nn.Module (a per_task model's, one network at a time), and
    forward(x) on a batch x (2, in_chans, H, W) returns {task: logits of shape (2,)} for each of its
    tasks. Checked once on zeros before any work, so that a broken plug-in is named by what it
    broke, not by a traceback from deep in training (or, for a missing task, not at all). The
    package's own models are tested instead; exam and ROI models take more inputs than x."""
    module = MODELS.plugin_module(config.name)
    if module is None or config.exam_pooling is not None or config.roi != "none":
        return
    builder, per_task = MODELS.get(config.name), trains_per_task(config.name)
    what = f"model {config.name!r} (a plug-in: {module})"
    x = torch.zeros(2, config.in_chans, image_size, image_size)
    with torch.random.fork_rng(devices=[]):  # building draws weights: the caller's stream stays as it was
        for network in cascade_networks(config) if per_task else (None,):
            if network == SEGMENTATION:  # a decoder network of no task: trained on masks, no logits
                continue
            tasks = (network,) if per_task else tuple(config.tasks)
            try:
                model = builder(config, network) if per_task else builder(config)
            except Exception as err:
                raise MeniscusError(f"{what}: its builder failed ({type(err).__name__}: {err})") from None
            if not isinstance(model, nn.Module):
                raise MeniscusError(
                    f"{what}: its builder returned a {type(model).__name__}, not a torch nn.Module"
                )
            try:
                with torch.no_grad():
                    out = model.eval()(x)
            except Exception as err:
                raise MeniscusError(
                    f"{what}: forward(x) failed on a batch of shape {tuple(x.shape)} ({type(err).__name__}: {err})"
                ) from None
            if not _keeps_contract(out, tasks, len(x)):
                raise MeniscusError(
                    f"{what}: forward(x) must return {{task: logits of shape (B,)}} for the tasks "
                    f"{', '.join(tasks)}; on a batch of {len(x)} it returned {_shapes(out)}"
                )


def _keeps_contract(out: object, tasks: Sequence[str], batch: int) -> bool:
    if not isinstance(out, dict) or set(out) != set(tasks):
        return False
    return all(
        torch.is_tensor(v) and v.is_floating_point() and tuple(v.shape) == (batch,) for v in out.values()
    )


def _shapes(out: object) -> str:
    """What a forward returned, briefly: a dict's keys and shapes, else its type."""
    if not isinstance(out, dict):
        return f"a {type(out).__name__}" + (f" of shape {tuple(out.shape)}" if torch.is_tensor(out) else "")
    return (
        "{"
        + ", ".join(
            f"{k!r}: {tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}" for k, v in out.items()
        )
        + "}"
    )


def parameter_groups(
    model: nn.Module, lr: float, backbone_lr_factor: float, freeze_backbone: bool
) -> list[dict]:
    """Optimizer groups: timm backbones at lr * factor (or frozen), everything else at lr."""
    backbone, rest = [], []
    for module_name, param in model.named_parameters():
        if ".backbone." in f".{module_name}":
            if freeze_backbone:
                param.requires_grad_(False)
                continue
            backbone.append(param)
        else:
            rest.append(param)
    groups = [{"params": rest, "lr": lr}]
    if backbone:
        groups.append({"params": backbone, "lr": lr * backbone_lr_factor})
    return groups


def set_train_mode(model: nn.Module, freeze_backbone: bool) -> None:
    """model.train(), but a frozen timm backbone stays in eval mode: its BatchNorm layers keep
    their running statistics (train mode would update them even with no gradient step)."""
    model.train()
    if freeze_backbone:
        for module in model.modules():
            if isinstance(module, TimmTrunk):
                module.backbone.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
