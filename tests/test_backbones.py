"""timm trunks: the documented backbones build, local pretrained weights load through timm with the
first convolution adapted to 2 channels, requested weights that are missing stop the run, and a
weights file with the package's own trunk is refused."""

from pathlib import Path

import pytest
import timm
import torch
from support import _clean, app, runner

from mtl_meniscus.config import Config, ModelConfig
from mtl_meniscus.engine.checkpoint import (
    atomic_torch_save,
    load_checkpoint,
    model_from_checkpoint,
    model_payload,
)
from mtl_meniscus.errors import ConfigError, MeniscusError
from mtl_meniscus.networks.cam import saliency_maps
from mtl_meniscus.networks.models import build_model, parameter_groups

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.mark.parametrize("name", ["resnet50", "vgg16", "vgg19"])
def test_documented_backbones_build_without_weights(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="shared", trunk=name, pretrained="none", pool_grid=1))
    out = model(torch.randn(2, 2, 64, 64))
    assert set(out) == {"fissure", "orientation", "position"}
    assert all(v.shape == (2,) and torch.isfinite(v).all() for v in out.values())
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 2


def test_separate_cascade_with_a_timm_trunk_and_its_saliency():
    model = build_model(ModelConfig(name="separate", trunk="resnet18", pretrained="none", pool_grid=1))
    x = torch.randn(1, 2, 64, 64)
    assert set(model(x)) == {"fissure", "orientation", "position"}
    cam = saliency_maps(model, x, ["position"])["position"]
    assert cam.shape == (1, 64, 64) and 0 <= cam.min() and cam.max() <= 1


@pytest.fixture
def resnet18_weights(tmp_path):
    """A 3-channel ImageNet-style state dict, saved the way a user would download it."""
    torch.manual_seed(1)
    state = timm.create_model("resnet18", pretrained=False, num_classes=1000, in_chans=3).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    return path, state


def test_local_pretrained_file_loads_with_an_adapted_first_conv(resnet18_weights):
    path, state = resnet18_weights
    model = build_model(ModelConfig(name="shared", trunk="resnet18", pretrained=str(path), pool_grid=1))
    backbone = model.trunk.backbone.model
    # timm adapts RGB weights to 2 channels: the first two input channels, scaled by 3/2
    torch.testing.assert_close(backbone.conv1.weight.detach(), state["conv1.weight"][:, :2] * 1.5)
    torch.testing.assert_close(backbone.layer4[1].conv2.weight.detach(), state["layer4.1.conv2.weight"])
    assert not any(name.startswith("fc.") for name in backbone.state_dict())  # classifier dropped


def test_checkpoint_rebuild_does_not_need_the_weights_file(resnet18_weights, tmp_path):
    path, _ = resnet18_weights
    config = Config()
    config.model = ModelConfig(name="shared", trunk="resnet18", pretrained=str(path), pool_grid=1)
    model = build_model(config.model)
    atomic_torch_save(model_payload(model, config), tmp_path / "best.pt")
    path.unlink()
    rebuilt, _ = model_from_checkpoint(load_checkpoint(tmp_path / "best.pt"))
    x = torch.randn(1, 2, 64, 64)
    model.eval()
    torch.testing.assert_close(rebuilt(x)["fissure"], model(x)["fissure"])


def test_missing_weights_stop_with_instructions(tmp_path):
    with pytest.raises(MeniscusError, match="not found.*--pretrained none"):
        build_model(ModelConfig(trunk="resnet18", pretrained=str(tmp_path / "nowhere.pth")))
    (tmp_path / "junk.pth").write_bytes(b"not weights")
    with pytest.raises(
        MeniscusError, match="junk.pth: cannot load as resnet18 weights: a file of weights that timm reads"
    ):
        build_model(ModelConfig(trunk="resnet18", pretrained=str(tmp_path / "junk.pth")))
    with pytest.raises(ConfigError, match="unknown trunk 'resnet9000'"):
        build_model(ModelConfig(trunk="resnet9000", pretrained="none"))


def test_default_weights_come_from_the_cache_only(tmp_path, monkeypatch):
    """--pretrained default reads the Hugging Face cache and never the network: offline, the hub's
    retries took 52 s to fail."""
    import socket

    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    attempts = []

    def refuse(*args, **kwargs):  # a name lookup or a connection: the first step of any download
        attempts.append(args)
        raise OSError("the test allows no network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(
        MeniscusError,
        match=r"weights for resnet18 are not in the local Hugging Face cache.*--pretrained none",
    ):
        build_model(ModelConfig(trunk="resnet18", pretrained="default"))
    assert attempts == [] and constants.HF_HUB_OFFLINE == offline  # the hub's setting restored


def test_freeze_and_lower_backbone_learning_rate():
    model = build_model(ModelConfig(trunk="resnet18", pretrained="none", pool_grid=1))
    groups = parameter_groups(model, lr=1e-3, backbone_lr_factor=0.1, freeze_backbone=False)
    assert [g["lr"] for g in groups] == [1e-3, 1e-4]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    frozen = parameter_groups(model, lr=1e-3, backbone_lr_factor=0.1, freeze_backbone=True)
    assert len(frozen) == 1
    assert not any(p.requires_grad for p in model.trunk.parameters())
    assert all(p.requires_grad for p in model.heads.parameters())
    reference = build_model(ModelConfig())
    assert len(parameter_groups(reference, 1e-3, 0.1, True)) == 1  # no timm backbone: nothing frozen
    assert all(p.requires_grad for p in reference.parameters())


def test_frozen_backbone_keeps_its_weights_and_batchnorm_statistics(tmp_path):
    from rich.console import Console

    from mtl_meniscus.config import load_config
    from mtl_meniscus.engine.run import train_run
    from mtl_meniscus.networks.models import build_shared
    from mtl_meniscus.phantom.slices import write_phantom

    write_phantom(tmp_path / "data", n=40, seed=2, size=64)
    config = load_config(
        TINY,
        {
            "data.path": str(tmp_path / "data"),
            "model.trunk": "resnet18",
            "model.pretrained": "none",
            "model.freeze_backbone": True,
            "train.max_epochs": 1,
            "train.precision": "fp32",
        },
    )
    torch.manual_seed(config.train.seed)  # the trainer builds its model right after this seed
    before = {k: v.clone() for k, v in build_shared(config.model).state_dict().items() if ".backbone." in k}
    train_run(config, tmp_path / "run", console=Console(quiet=True))
    after = load_checkpoint(tmp_path / "run" / "best.pt")["state_dict"]
    assert any("running_mean" in k for k in before) and len(before) > 50
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    heads = [k for k in after if k.startswith("heads.")]
    assert heads  # the heads did train (checked by the rest of the suite); only the backbone is frozen


def test_pretrained_file_with_the_reference_trunk_is_refused(data64, tmp_path):
    weights = tmp_path / "w.pth"
    torch.save({}, weights)
    args = ["train", "--config", str(TINY), "--data", str(data64), "--out", str(tmp_path / "r")]
    result = runner.invoke(app, [*args, "--pretrained", str(weights)])
    _clean(result)
    assert result.exit_code == 1 and "'model.pretrained'" in result.output and "timm trunk" in result.output
    assert not (tmp_path / "r" / "best.pt").exists()
    result = runner.invoke(app, [*args, "--freeze-backbone"])  # the same kind of silent no-op
    _clean(result)
    assert result.exit_code == 1 and "'model.freeze_backbone'" in result.output


def test_a_weights_file_of_other_names_is_refused_not_ignored(resnet18_weights, tmp_path):
    """timm loads a file leniently: one whose names do not match the network (every key prefixed
    'model.', or not a state dict of this network at all) loaded nothing, and the trunk trained from
    random weights with no word. A wrapped checkpoint ({'state_dict': ...}) still loads."""
    path, state = resnet18_weights
    torch.save({f"model.{key}": value for key, value in state.items()}, tmp_path / "prefixed.pth")
    with pytest.raises(
        MeniscusError, match=r"prefixed\.pth: not resnet18 weights: .* are not in it.*model\.conv1\.weight"
    ):
        build_model(ModelConfig(trunk="resnet18", pretrained=str(tmp_path / "prefixed.pth")))
    torch.save({"x": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(MeniscusError, match=r"other\.pth: not resnet18 weights.*--pretrained none"):
        build_model(ModelConfig(trunk="resnet18", pretrained=str(tmp_path / "other.pth")))
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    model = build_model(ModelConfig(trunk="resnet18", pretrained=str(tmp_path / "wrapped.pth"), pool_grid=1))
    loaded = model.trunk.backbone.model.layer4[1].conv2.weight.detach()
    torch.testing.assert_close(loaded, state["layer4.1.conv2.weight"])
