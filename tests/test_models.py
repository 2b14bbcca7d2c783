"""Tests for formats.models: parameter counts, output shapes, names, torchvision adaptation and errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from formats.models import MODELS, _adapt_input_channels, build_model, model_names

MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def n_weights(model: nn.Module, kinds: tuple[type, ...]) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, kinds))


def output(model: nn.Module, shape: tuple[int, int, int]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.zeros(2, *shape))


# --- parameter counts -------------------------------------------------------------------------------------------


def test_lenet300_counts():
    # 784*300 + 300*100 + 100*10 = 266,200 weights; + 300 + 100 + 10 biases
    m = build_model("lenet300", MNIST, 10)
    assert n_params(m) == 266_610
    assert n_weights(m, (nn.Linear,)) == 266_200


def test_lenet5_counts():
    # 20*25 + 50*20*25 + 800*500 + 500*10 = 430,500 weights; + 20 + 50 + 500 + 10 biases
    m = build_model("lenet5", MNIST, 10)
    assert n_params(m) == 431_080
    assert n_weights(m, (nn.Linear, nn.Conv2d)) == 430_500


def test_resnet20_count():
    # stem 432+32; stage1 3*2*(2304+32); stage2 (4608+64)+(9216+64)+(512+64) + 2*2*(9216+64);
    # stage3 (18432+128)+(36864+128)+(2048+128) + 2*2*(36864+128); fc 650
    assert n_params(build_model("resnet20", CIFAR, 10)) == 272_474


def test_resnet18_count():
    # the figure kuangliu/pytorch-cifar's ResNet18 has on CIFAR-10
    assert n_params(build_model("resnet18", CIFAR, 10)) == 11_173_962


def test_vgg16_count():
    # conv weights 14,710,464 (no bias) + BN 2*4224 + fc 5130
    assert n_params(build_model("vgg16", CIFAR, 10)) == 14_724_042


# --- names ------------------------------------------------------------------------------------------------------


def test_registered_names():
    assert {"lenet300", "lenet5", "vgg16", "resnet20", "resnet18"} <= set(MODELS.names())
    assert model_names() == ["lenet300", "lenet5", "resnet18", "resnet20", "vgg16"]  # sorted, as documented


def test_parameter_names_are_stable():
    names = [k for k, _ in build_model("lenet5", MNIST, 10).named_parameters()]
    assert names == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                     "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    names = [k for k, _ in build_model("lenet300", MNIST, 10).named_parameters()]
    assert names == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]
    names = dict(build_model("resnet20", CIFAR, 10).named_parameters())
    for key in ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer2.0.shortcut.0.weight",
                "layer3.2.bn2.bias", "fc.weight", "fc.bias"]:
        assert key in names
    names = dict(build_model("vgg16", CIFAR, 10).named_parameters())
    assert "features.0.weight" in names and "features.1.weight" in names and "fc.weight" in names


def test_no_extra_buffers():
    for name in MODELS.names():
        model = build_model(name, MNIST, 10)
        bn = {f"{p}.{b}" for p, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
              for b in ("running_mean", "running_var", "num_batches_tracked")}
        assert {k for k, _ in model.named_buffers()} == bn


def test_convs_before_bn_have_no_bias():
    for name in ["vgg16", "resnet20", "resnet18"]:
        for m in build_model(name, CIFAR, 10).modules():
            if isinstance(m, nn.Conv2d):
                assert m.bias is None


# --- output shapes, every registered model ----------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("shape", [MNIST, CIFAR])
def test_output_shape(name, shape):
    model = build_model(name, shape, 10)
    assert model.training  # the dry run leaves the mode as it was
    assert output(model, shape).shape == (2, 10)


@pytest.mark.parametrize("name", MODELS.names())
def test_other_class_count(name):
    assert output(build_model(name, MNIST, 3), MNIST).shape == (2, 3)


# --- torchvision ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tv:resnet18", "tv:mobilenet_v3_small"])
def test_tv_models_grayscale(name):
    model = build_model(name, MNIST, 10)
    assert output(model, MNIST).shape == (2, 10)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1


def test_tv_first_conv_keeps_its_arguments():
    conv = build_model("tv:resnet18", MNIST, 10).conv1
    assert (conv.in_channels, conv.out_channels) == (1, 64)
    assert conv.kernel_size == (7, 7) and conv.stride == (2, 2) and conv.padding == (3, 3)
    assert conv.bias is None


def test_adapt_rejects_grouped_first_conv():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
    with pytest.raises(ValueError, match="groups=2"):
        _adapt_input_channels(model, "toy", 1)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
    _adapt_input_channels(model, "toy", 4)  # nothing to change, no error


def test_adapt_sets_conv_on_nested_parent():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")), nn.Conv2d(8, 8, 1))
    _adapt_input_channels(model, "toy", 1)
    conv = model[0][0]
    assert conv.in_channels == 1 and conv.padding_mode == "reflect" and conv.bias is not None
    assert model[1].in_channels == 8


def test_unknown_tv_name():
    with pytest.raises(ValueError, match="list_models") as info:
        build_model("tv:no_such_net", MNIST, 10)
    assert "no_such_net" in str(info.value)


def test_tv_input_too_small():
    with pytest.raises(ValueError, match=r"tv:squeezenet1_1.*\(1, 8, 8\)"):
        build_model("tv:squeezenet1_1", (1, 8, 8), 10)


# --- errors -----------------------------------------------------------------------------------------------------


def test_unknown_name_lists_known():
    with pytest.raises(ValueError) as info:
        build_model("lenet7", MNIST, 10)
    message = str(info.value)
    for name in MODELS.names():
        assert name in message
    assert "tv:<torchvision name>" in message


def test_registered_input_too_small():
    with pytest.raises(ValueError, match=r"lenet5.*\(1, 8, 8\)"):
        build_model("lenet5", (1, 8, 8), 10)


@pytest.mark.parametrize("shape", [(28, 28), (1, 28, 28, 1), (0, 28, 28), (1, -1, 28)])
def test_bad_input_shape_values(shape):
    with pytest.raises(ValueError, match="input_shape"):
        build_model("lenet300", shape, 10)


@pytest.mark.parametrize("shape", [784, "1x28x28", (1.0, 28, 28), (True, 28, 28), None])
def test_bad_input_shape_types(shape):
    with pytest.raises(TypeError, match="input_shape"):
        build_model("lenet300", shape, 10)


def test_bad_num_classes():
    for bad in (1, 0, -3):
        with pytest.raises(ValueError, match="num_classes"):
            build_model("lenet300", MNIST, bad)
    for bad in (10.0, "10", True, None):
        with pytest.raises(TypeError, match="num_classes"):
            build_model("lenet300", MNIST, bad)


def test_list_input_shape_is_accepted():
    assert output(build_model("lenet300", [1, 28, 28], 10), MNIST).shape == (2, 10)
