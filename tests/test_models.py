import pytest
import torch
import torch.nn.functional as F

from mtl_meniscus.config import ModelConfig
from mtl_meniscus.errors import ConfigError
from mtl_meniscus.labels import TASKS
from mtl_meniscus.networks.models import SeparateCascade, SharedTrunkNet, build_model, count_parameters

SMALL = dict(widths=(4, 8, 8, 8), pool_grid=2, dense=(8, 4))


@pytest.mark.parametrize("name", ["shared", "separate"])
def test_output_contract_no_nan_and_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, **SMALL))
    x = torch.randn(3, 2, 64, 64)
    out = model(x)
    assert list(out) == list(TASKS)
    for logits in out.values():
        assert logits.shape == (3,) and torch.isfinite(logits).all()
    sum(v.sum() for v in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())


def test_reference_architectures():
    cascade = build_model(ModelConfig(name="separate"))
    assert isinstance(cascade, SeparateCascade)
    convs = {
        task: [m.kernel_size[0] for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        for task, net in cascade.networks.items()
    }
    assert convs == {"fissure": [7, 5, 3], "orientation": [7, 5, 3, 3], "position": [7, 5, 3, 3]}
    shared = build_model(ModelConfig(name="shared"))
    assert isinstance(shared, SharedTrunkNet)
    assert [m.kernel_size[0] for m in shared.trunk.modules() if isinstance(m, torch.nn.Conv2d)] == [
        7,
        5,
        3,
        3,
    ]
    head = shared.heads["fissure"]
    assert [m.out_features for m in head if isinstance(m, torch.nn.Linear)] == [32, 16, 1]
    assert [m.p for m in head if isinstance(m, torch.nn.Dropout)] == [0.4, 0.4]
    # one trunk instead of three: fewer parameters than the cascade
    assert count_parameters(shared) < count_parameters(cascade)


def test_eval_mode_is_deterministic_and_any_input_size_works():
    model = build_model(ModelConfig(name="shared", **SMALL)).eval()
    x = torch.randn(2, 2, 80, 96)
    a, b = model(x), model(x)
    assert all(torch.equal(a[t], b[t]) for t in TASKS)


def test_unknown_model_name_is_a_config_error():
    with pytest.raises(ConfigError, match="model.name"):
        build_model(ModelConfig(name="resnet9000"))


def test_forward_features_gives_the_maps_and_forward_head_the_outputs():
    """timm's split: forward_features -> the trunk's last maps, forward_head -> pooled heads."""
    model = build_model(ModelConfig(name="shared", strided_blocks=1, **SMALL)).eval()
    x = torch.randn(2, 2, 64, 64)
    maps = model.forward_features(x)
    # 4 blocks, each halving the size (the first by its stride): 64 -> 4; channels = last width
    assert maps.shape == (2, 8, 4, 4)
    direct, split = model(x), model.forward_head(maps)
    assert all(torch.equal(direct[t], split[t]) for t in TASKS)
    # the pooled features are max and mean over a 2x2 grid of those maps
    pooled = model.trunk.pool(maps)
    manual = torch.cat(
        [
            torch.nn.functional.adaptive_max_pool2d(maps, 2),
            maps.unflatten(2, (2, 2)).unflatten(4, (2, 2)).mean((3, 5)),
        ],
        1,
    )
    assert torch.allclose(pooled, manual.flatten(1), atol=1e-6)


def test_plain_floor_computes_conv_bn_relu_maxpool_exactly():
    """The blocks pool before the ReLU for speed; outputs and gradients are those of the floor as
    defined (conv-BN-ReLU-maxpool), written out here with torch.nn.functional, in training mode."""
    torch.manual_seed(0)
    trunk = build_model(ModelConfig(name="shared", trunk="plain", **SMALL)).trunk
    x = torch.randn(4, 2, 64, 64)

    def by_definition(x):
        convs = [m for m in trunk.blocks if isinstance(m, torch.nn.Conv2d)]
        norms = [m for m in trunk.blocks if isinstance(m, torch.nn.BatchNorm2d)]
        for conv, norm in zip(convs, norms):
            x = F.conv2d(x, conv.weight, padding=1)
            x = F.batch_norm(x, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
            x = F.max_pool2d(F.relu(x), 2)
        return x.mean((2, 3))  # (B, 96)

    x.requires_grad_()
    expected = by_definition(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *trunk.parameters()])
    got = trunk(x)
    got_grads = torch.autograd.grad(got.square().sum(), [x, *trunk.parameters()])
    # bit for bit: the ReLU and the max-pool see and route the same values in either order
    assert torch.equal(got, expected)
    assert all(torch.equal(g, e) for g, e in zip(got_grads, expected_grads, strict=True))


@pytest.mark.parametrize("name", ["shared", "separate"])
def test_plain_floor_is_the_fixed_five_block_cnn_in_both_modes(name):
    """trunk 'plain': conv3x3-BN-ReLU-maxpool x5 (16/32/64/64/96), global average pooling and one
    linear layer per task, whatever the preset says of widths, kernels, grid, dense layers, dropout."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, trunk="plain", **SMALL, conv_dropout=0.3, dense_dropout=0.4))
    nets = model.networks.values() if isinstance(model, SeparateCascade) else [model]
    for net in nets:
        layers = [type(m).__name__ for m in net.trunk.blocks]
        assert layers == ["Conv2d", "BatchNorm2d", "MaxPool2d", "ReLU"] * 5  # = conv-BN-ReLU-maxpool
        convs = [m for m in net.trunk.blocks if isinstance(m, torch.nn.Conv2d)]
        assert [c.out_channels for c in convs] == [16, 32, 64, 64, 96]
        assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) for c in convs)
        assert not [m for m in net.modules() if isinstance(m, torch.nn.Dropout | torch.nn.Dropout2d)]
        for head in net.heads.values():
            assert [type(m).__name__ for m in head] == ["Linear"] and head[0].in_features == 96
    x = torch.randn(3, 2, 64, 64)
    out = model(x)
    assert list(out) == list(TASKS) and all(v.shape == (3,) for v in out.values())
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # global average pooling of the last maps (64 px -> 2 x 2 after five poolings)
    if name == "shared":
        model.eval()
        maps = model.forward_features(x)
        assert maps.shape == (3, 96, 2, 2)
        assert torch.allclose(model.trunk.pool(maps), maps.mean((2, 3)), atol=1e-6)


def test_plain_floor_takes_no_weights_file():
    from mtl_meniscus.config import config_from_dict

    with pytest.raises(ConfigError, match="model.pretrained"):
        config_from_dict({"model": {"trunk": "plain", "pretrained": "/tmp/w.pth"}})
