"""Model builders: the papers' reference networks by name, and any torchvision classifier as ``tv:<name>``."""
from __future__ import annotations

from formats.errors import UserError, UserTypeError
import contextlib
from collections.abc import Sequence
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from formats.registry import Registry

Builder = Callable[[tuple[int, int, int], int], nn.Module]

MODELS: Registry[Builder] = Registry("model")

TV_PREFIX = "tv:"


# ---------------------------------------------------------------------------------------------------------------
# LeNets


class LeNet300(nn.Module):
    """LeNet-300-100: three fully connected layers on the flattened input."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """LeNet-5-Caffe: conv 20@5x5, pool, conv 50@5x5, pool, fc 500, fc classes."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c, h, w = input_shape
        self.conv1 = nn.Conv2d(c, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        if fh < 1 or fw < 1:
            raise UserError(f"model 'lenet5' cannot take input shape {input_shape}: it needs at least 16x16")
        self.fc1 = nn.Linear(50 * fh * fw, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


# ---------------------------------------------------------------------------------------------------------------
# VGG


VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    """CIFAR VGG with BatchNorm (as open_lth): conv-BN-ReLU stacks, max pools, global average pool, one linear."""

    def __init__(self, cfg: Sequence[int | str], in_channels: int, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                out = int(item)
                layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.fc(torch.flatten(x, 1))


# ---------------------------------------------------------------------------------------------------------------
# ResNets


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut, or a 1x1 conv-BN one when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem (no max pool), stages of BasicBlocks, global average pool, one linear."""

    def __init__(self, in_channels: int, widths: Sequence[int], blocks: Sequence[int], num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        planes = widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(count):
                stage.append(BasicBlock(planes, width, stride if j == 0 else 1))
                planes = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(widths)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


# ---------------------------------------------------------------------------------------------------------------
# Registered builders


@MODELS.register("lenet300")
def lenet300(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """LeNet-300-100 (266,610 parameters on 1x28x28 with 10 classes)."""
    c, h, w = input_shape
    return LeNet300(c * h * w, num_classes)


@MODELS.register("lenet5")
def lenet5(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """LeNet-5-Caffe (431,080 parameters on 1x28x28 with 10 classes)."""
    return LeNet5(input_shape, num_classes)


@MODELS.register("vgg16")
def vgg16(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """CIFAR VGG-16 with BatchNorm (14,724,042 parameters on 3x32x32 with 10 classes)."""
    return VGG(VGG16_CFG, input_shape[0], num_classes)


@MODELS.register("resnet20")
def resnet20(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """CIFAR ResNet-20 of He et al. with projection shortcuts (272,474 parameters on 3x32x32 with 10 classes)."""
    return CifarResNet(input_shape[0], (16, 32, 64), (3, 3, 3), num_classes)


@MODELS.register("resnet18")
def resnet18(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """CIFAR ResNet-18 of kuangliu/pytorch-cifar (11,173,962 parameters on 3x32x32 with 10 classes)."""
    return CifarResNet(input_shape[0], (64, 128, 256, 512), (2, 2, 2, 2), num_classes)


# ---------------------------------------------------------------------------------------------------------------
# torchvision models


def _tv_classifiers() -> list[str]:
    import torchvision.models

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _adapt_input_channels(model: nn.Module, name: str, channels: int) -> None:
    """Replace the first Conv2d by one taking ``channels`` input channels, if it takes a different number."""
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            break
    else:
        return
    if module.in_channels == channels:
        return
    if module.groups != 1:
        raise UserError(
            f"cannot adapt the first convolution {path!r} of {TV_PREFIX}{name} to {channels} input channels: "
            f"it has groups={module.groups}"
        )
    new = nn.Conv2d(
        channels,
        module.out_channels,
        kernel_size=module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=1,
        bias=module.bias is not None,
        padding_mode=module.padding_mode,
    )
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def _build_tv(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    import torchvision.models

    known = _tv_classifiers()
    if name not in known:
        raise UserError(
            f"unknown torchvision classification model {name!r} (from '{TV_PREFIX}{name}'); known include: "
            f"{', '.join(known[:8])}, ...; see all with "
            "torchvision.models.list_models(module=torchvision.models)"
        )
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    _adapt_input_channels(model, name, input_shape[0])
    return model


# ---------------------------------------------------------------------------------------------------------------
# Public API


def _check_args(input_shape: object, num_classes: object) -> tuple[int, int, int]:
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise UserTypeError(f"input_shape must be a sequence of 3 ints (channels, height, width), got {input_shape!r}")
    if len(input_shape) != 3:
        raise UserError(
            f"input_shape must have 3 entries (channels, height, width), got {len(input_shape)}: {tuple(input_shape)}"
        )
    for v in input_shape:
        if isinstance(v, bool) or not isinstance(v, int):
            raise UserTypeError(f"input_shape entries must be ints, got {type(v).__name__} in {tuple(input_shape)!r}")
    if any(v < 1 for v in input_shape):
        raise UserError(f"input_shape entries must be positive, got {tuple(input_shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise UserTypeError(f"num_classes must be an int, got {type(num_classes).__name__} {num_classes!r}")
    if num_classes < 2:
        raise UserError(f"num_classes must be at least 2, got {num_classes}")
    return tuple(int(v) for v in input_shape)  # type: ignore[return-value]


def _dry_run(model: nn.Module, label: str, input_shape: tuple[int, int, int], num_classes: int) -> None:
    """Run a meta-device model on a 2-sample meta input: checks the input shape at no compute cost."""
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape, device="meta"))
    except (RuntimeError, AssertionError, ValueError, IndexError, NotImplementedError) as exc:
        raise UserError(f"model {label!r} cannot take input shape {input_shape}: {exc}") from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(
            f"model {label!r} on input shape {input_shape} gives output {got}, expected (batch, {num_classes})"
        )


def _construct(name: str, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    if name.startswith(TV_PREFIX):
        return _build_tv(name[len(TV_PREFIX) :], shape, num_classes)
    if name in MODELS:
        try:
            return MODELS.get(name)(shape, num_classes)
        except RuntimeError as exc:
            raise UserError(f"model {name!r} cannot take input shape {shape}: {exc}") from exc
    raise UserError(
        f"unknown model {name!r}; known: {', '.join(MODELS.names())}; "
        f"or any torchvision classifier as '{TV_PREFIX}<torchvision name>' (e.g. '{TV_PREFIX}resnet18')"
    )


def build_model(
    name: str, input_shape: tuple[int, int, int], num_classes: int, *, device: str | torch.device | None = None
) -> nn.Module:
    """Build model ``name`` (registered, or ``tv:<torchvision name>``) for ``input_shape`` (C, H, W) inputs.

    The input shape is checked by a forward pass on the meta device first (no compute). With
    ``device="meta"`` the model has shapes but no storage (for loaders that assign weights later).
    """
    if not isinstance(name, str):
        raise UserTypeError(f"model name must be a str, got {type(name).__name__}")
    shape = _check_args(input_shape, num_classes)
    with torch.device("meta"):
        probe = _construct(name, shape, num_classes)
    _dry_run(probe, name, shape, num_classes)
    if device is not None and torch.device(device).type == "meta":
        return probe.train()
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return _construct(name, shape, num_classes)


def model_names() -> list[str]:
    """Registered model names (any torchvision classifier is also accepted as ``tv:<name>``)."""
    return MODELS.names()
