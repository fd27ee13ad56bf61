"""The model: Table 2 parameter counts, shapes, errors, dropout, memory-efficient mode."""
from __future__ import annotations

import pytest
import torch

from densenet import DenseLayer, DenseNet, model_name
from densenet_trainer.config import architecture
from densenet_trainer.speed import fused
from helpers import densenet


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def expected_parameters(depth: int, k: int, bottleneck: bool, theta: float, classes: int) -> int:
    """The count derived from the paper's description without building the model
    (architecture.parameter_count, which also refuses enormous models before they are built)."""
    return architecture.parameter_count(depth, k, bottleneck, theta, classes)


TABLE_2 = [  # depth, k, bottleneck, theta, classes, paper's count
    (40, 12, False, 1.0, 10, 1.0e6), (100, 12, False, 1.0, 10, 7.0e6),
    (100, 24, False, 1.0, 10, 27.2e6), (100, 12, True, 0.5, 10, 769_162),
    (100, 12, True, 0.5, 100, 800_032), (250, 24, True, 0.5, 10, 15_324_406),
    (190, 40, True, 0.5, 10, 25_624_430),
]


@pytest.mark.parametrize("depth,k,bottleneck,theta,classes,paper", TABLE_2)
def test_table2_parameter_counts(depth, k, bottleneck, theta, classes, paper):
    model = DenseNet(depth, k, bottleneck=bottleneck, compression=theta, num_classes=classes)
    derived = expected_parameters(depth, k, bottleneck, theta, classes)
    assert count(model) == derived
    if isinstance(paper, int):
        assert derived == paper  # exact figures quoted for DenseNet-BC
    else:
        assert round(derived / 1e5) == round(paper / 1e5)  # the paper rounds to 0.1M


def test_non_bc_counts_are_the_derived_figures():
    assert [count(DenseNet(d, k, bottleneck=False, compression=1.0)) for d, k in [(40, 12), (100, 12), (100, 24)]] == \
        [1_019_722, 6_979_642, 27_249_082]


@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("train", [True, False])
def test_output_shape(classes, batch, train):
    model = DenseNet(16, 4, bottleneck=True, compression=0.5, num_classes=classes).train(train)
    assert model(torch.randn(batch, 3, 32, 32)).shape == (batch, classes)


@pytest.mark.parametrize("depth,bottleneck,nearest", [
    (41, False, "40 or 43"), (41, True, "40 or 46"), (101, True, "100 or 106"), (5, False, "7")])
def test_impossible_depth_names_nearest_valid(depth, bottleneck, nearest):
    with pytest.raises(ValueError, match=f"depth {depth} is impossible.*nearest valid depths: {nearest}$"):
        DenseNet(depth, 12, bottleneck=bottleneck)


def test_names():
    assert DenseNet(100, 12, bottleneck=True, compression=0.5).name == "densenet-bc-100-12"
    assert DenseNet(40, 12, bottleneck=False, compression=1.0).name == "densenet-40-12"
    assert model_name(100, 12, True, 1.0) == "densenet-b-100-12"
    assert model_name(40, 12, False, 0.5) == "densenet-c-40-12"


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = DenseNet(16, 4, bottleneck=True, compression=0.5, dropout=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))
    still = DenseNet(16, 4, bottleneck=True, compression=0.5, dropout=0.0).train()
    assert torch.equal(still(x), still(x))


def test_stem_width_and_no_conv_bias():
    assert DenseNet(16, 4, bottleneck=True, compression=0.5).stem.out_channels == 8
    assert DenseNet(16, 4, bottleneck=False, compression=1.0).stem.out_channels == 16
    convs = [m for m in DenseNet(16, 4, bottleneck=True).modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.bias is None for c in convs)


@pytest.mark.parametrize("bottleneck", [True, False])
def test_memory_efficient_matches_standard_in_float64(bottleneck):
    torch.manual_seed(0)
    standard = DenseNet(16, 4, bottleneck=bottleneck, compression=0.5, num_classes=10).double()
    efficient = DenseNet(16, 4, bottleneck=bottleneck, compression=0.5, num_classes=10, memory_efficient=True).double()
    efficient.load_state_dict(standard.state_dict())
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    outputs = []
    for model in (standard, efficient):
        model.train()
        out = model(x)
        out.square().sum().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(standard.named_parameters(), efficient.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)
    # the recomputation must not move the BatchNorm running statistics a second time
    for (name, a), b in zip(standard.named_buffers(), efficient.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_memory_efficient_does_not_recompute_without_gradients(monkeypatch):
    """The ATen path: each layer runs once without gradients, and once more in backward."""
    model = DenseNet(16, 4, bottleneck=True, compression=0.5, memory_efficient=True)
    layer_type = type(model.features[0].layers[0])
    calls = []
    original = layer_type._layer

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(layer_type, "_layer", counting)
    layers = sum(1 for m in model.modules() if isinstance(m, layer_type))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.eval()(x)
    assert len(calls) == layers
    calls.clear()
    model.train()(x).sum().backward()
    assert len(calls) == 2 * layers  # forward, then one recomputation in backward


@pytest.mark.skipif(fused.backend("cpu") is None, reason="no C compiler with OpenMP: the fused path is not built")
def test_memory_efficient_fused_path_recomputes_one_normalisation_per_layer(monkeypatch):
    """The fused path recomputes each layer's first BN-ReLU in backward, from the block's
    buffer, and nothing else: no convolution runs twice, no recomputation without gradients."""
    model = densenet("fused", depth=16, growth_rate=4, memory_efficient=True).to(memory_format=torch.channels_last)
    layers = sum(1 for m in model.modules() if isinstance(m, DenseLayer))
    recomputed, convolutions = [], []
    normalise = fused._normalise
    monkeypatch.setattr(fused, "_normalise", lambda *args, **kwargs: (
        recomputed.append(len(args) == 6), normalise(*args, **kwargs))[1])
    for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
        conv.register_forward_hook(lambda *args: convolutions.append(1))
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model.eval()(x)
    assert not any(recomputed)
    recomputed.clear()
    model.train()(x).sum().backward()
    assert sum(recomputed) == layers
    conv_modules = sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert len(convolutions) == 2 * conv_modules - layers  # eval ran them all; training's first
    # convolutions run inside fused.norm_relu_conv, which calls F.conv2d, not the module
