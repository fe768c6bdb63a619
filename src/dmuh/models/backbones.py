"""Registered feature backbones: CNN-F, AlexNet, ResNet-18/50, a small CNN and an MLP.

Every backbone maps its input to a flat feature vector and carries `feature_dim`, `input_size`
and `in_channels`; the pretrained-loading hints are described in `dmuh.models.registry`.
torchvision models are always built with `weights=None`: weights only come from local files.

Input size. A backbone whose factory takes an `input_size` option works at any size (`smallcnn`,
`resnet18-32`, `resnet50-32`: convolutions and global pooling; default 32): `dmuh train` then
gives it the size of the decoded images (`dmuh.engine.runtime.build_model`; digits run at 8x8) unless
`input_size` is set, and the checkpoint records the size used. The ImageNet networks (`cnnf`,
`alexnet`, `resnet18`, `resnet50`) take 224x224: images of another size are resized to 224 by the
input pipeline, batch by batch on the device (`--image-size 224` decodes them at 224 once instead).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Optional, Sequence

import torch
import torchvision
from torch import nn

from dmuh.errors import DmuhError
from dmuh.models.registry import register_model


def replace_conv_input(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """The same convolution with another number of input channels (fresh weights)."""
    return nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )


class CNNF(nn.Module):
    """CNN-F (Chatfield et al. 2014, "fast"), the backbone of Table 2 of the DMUH paper.

    For a 224x224 input the rows are: conv1 64x27x27, conv2 256x13x13, conv3 256x13x13,
    conv4 256x13x13, conv5 256x6x6, full6 4096, full7 4096 (full8 is the hash layer).
    State-dict keys: conv1.weight/.bias ... conv5.weight/.bias, full6.weight/.bias,
    full7.weight/.bias (MatConvNet's imagenet-vgg-f calls full6/full7 fc6/fc7; its fc8 is
    the 1000-class head, not loaded). Conv weights are (out, in, kH, kW), full6 takes the
    conv5 map flattened in (channel, row, column) order.
    """

    feature_dim = 4096
    first_conv = "conv1"

    def __init__(self, in_channels: int = 3, dropout: float = 0.5):
        super().__init__()
        self.in_channels = in_channels
        self.input_size = 224
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=0)
        self.conv2 = nn.Conv2d(64, 256, kernel_size=5, stride=1, padding=2)
        self.conv3 = nn.Conv2d(256, 256, kernel_size=3, stride=1, padding=1)
        self.conv4 = nn.Conv2d(256, 256, kernel_size=3, stride=1, padding=1)
        self.conv5 = nn.Conv2d(256, 256, kernel_size=3, stride=1, padding=1)
        self.full6 = nn.Linear(256 * 6 * 6, 4096)
        self.full7 = nn.Linear(4096, 4096)
        # MatConvNet/Caffe LRN: x / (1 + 1e-4/5 * sum of 5 neighbouring x^2)^0.75.
        self.norm = nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=1.0)
        # conv1 gives 54x54; floor pooling would give 26, ceil_mode gives Table 2's 27
        # (MatConvNet pads pool1 by one on the bottom/right). 27->13 and 13->6 are exact either way.
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)

    def forward_rows(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The output of every Table 2 row, conv1 ... full7, in order."""
        rows: Dict[str, torch.Tensor] = OrderedDict()
        x = rows["conv1"] = self.pool(self.norm(self.relu(self.conv1(x))))
        x = rows["conv2"] = self.pool(self.norm(self.relu(self.conv2(x))))
        x = rows["conv3"] = self.relu(self.conv3(x))
        x = rows["conv4"] = self.relu(self.conv4(x))
        x = rows["conv5"] = self.pool(self.relu(self.conv5(x)))
        if x.shape[-2:] != (6, 6):  # only off 224x224 inputs; exactly Table 2 (and ONNX-friendly) at 224
            x = nn.functional.adaptive_avg_pool2d(x, (6, 6))
        x = torch.flatten(x, 1)
        x = rows["full6"] = self.dropout(self.relu(self.full6(x)))
        rows["full7"] = self.dropout(self.relu(self.full7(x)))
        return rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_rows(x)["full7"]


class AlexNetFeatures(nn.Module):
    """torchvision AlexNet without its last (1000-class) layer: 4096-d fc7 features.

    Keys are torchvision's (features.*, classifier.1.*, classifier.4.*); classifier.6.* is ignored.
    """

    feature_dim = 4096
    first_conv = "features.0"
    ignored_pretrained_keys = ("classifier.6.",)

    def __init__(self, in_channels: int = 3, dropout: float = 0.5):
        super().__init__()
        self.in_channels = in_channels
        self.input_size = 224
        alexnet = torchvision.models.alexnet(weights=None, dropout=dropout)
        self.features = alexnet.features
        if in_channels != 3:
            self.features[0] = replace_conv_input(self.features[0], in_channels)
        self.avgpool = alexnet.avgpool
        # Drop classifier[6] but keep indices 0..5 so the keys match torchvision's.
        self.classifier = nn.Sequential(*list(alexnet.classifier.children())[:6])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


class ResNetFeatures(nn.Module):
    """torchvision ResNet without fc: globally pooled features (512-d for 18, 2048-d for 50).

    small_input replaces the stem (7x7 stride-2 conv + max-pool) by a 3x3 stride-1 conv and no
    pool, as usual for 32x32 images; pretrained weights then load for everything but conv1. That
    network takes any `input_size` (default 32); the ImageNet stem's is 224.
    """

    first_conv = "conv1"
    ignored_pretrained_keys = ("fc.",)

    def __init__(
        self,
        depth: int,
        in_channels: int = 3,
        small_input: bool = False,
        input_size: Optional[int] = None,
        fc: Sequence[int] = (),
        dropout: float = 0.5,
    ):
        super().__init__()
        constructors = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}
        resnet = constructors[depth](weights=None)
        self.in_channels = in_channels
        self.small_input = small_input
        if input_size is not None and not small_input:
            raise ValueError("the ImageNet stem takes 224 px inputs; input_size is for small_input=True")
        self.input_size = (input_size or 32) if small_input else 224
        self.feature_dim = resnet.fc.in_features
        resnet.fc = nn.Identity()
        if small_input:
            resnet.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            resnet.maxpool = nn.Identity()
            self.skipped_pretrained_keys = {"conv1.weight": "the small-input stem is a 3x3 conv, not 7x7"}
        elif in_channels != 3:
            resnet.conv1 = replace_conv_input(resnet.conv1, in_channels)
        # Keep torchvision's module names at the top level so state-dict keys match.
        for child_name, child in resnet.named_children():
            self.add_module(child_name, child)
        # `fc`: a CNN-F-like head (Linear + ReLU + Dropout per entry) on the pooled features, as
        # SmallCNN's: the dropout the `own`/`shared` readings of DMUH's momentum copy act on. It is
        # new (ImageNet weights have no such layers), so pretrained weights leave it initialised.
        self.head = MLPFeatures(self.feature_dim, hidden=fc, dropout=dropout)
        self.feature_dim = self.head.feature_dim
        skipped = {key: "the fc head is not part of a torchvision ResNet" for key in self.head.state_dict()}
        self.skipped_pretrained_keys = {
            **getattr(self, "skipped_pretrained_keys", {}),
            **{f"head.{key}": why for key, why in skipped.items()},
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(torch.flatten(self.avgpool(x), 1))


class SmallCNN(nn.Module):
    """Three conv blocks (3x3 conv, BatchNorm, ReLU; the first two halve the size) and global
    average pooling: a 4*width-d feature (256 by default) for 8-32 px images, quick on a CPU.

    Any `input_size` works (the weights do not depend on it); images of another size are resized
    to it by the input pipeline. `dmuh train` sets it to the decoded images' size when it is not
    given (8 for digits); 32 is the default of `create_model` and of runs that did not record it.

    `fc` adds a CNN-F-like head (Linear + ReLU + Dropout(`dropout`) per entry, as CNN-F's fc6 and
    fc7 before its hash layer): the small stand-in for the paper's network on the CPU, with the
    dropout that some readings of DMUH's momentum copy depend on."""

    first_conv = "blocks.0.0"

    def __init__(
        self, in_channels: int = 3, width: int = 64, input_size: int = 32, fc: Sequence[int] = (), dropout: float = 0.5
    ):
        super().__init__()
        self.in_channels = in_channels
        self.input_size = input_size
        channels = [in_channels, width, 2 * width, 4 * width]
        blocks = []
        for index in range(3):
            layers = [
                nn.Conv2d(channels[index], channels[index + 1], kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(channels[index + 1]),
                nn.ReLU(inplace=True),
            ]
            if index < 2:
                # ceil_mode so odd sizes (7 after pooling 14 or 15) never lose a row: >= 1 px stays >= 1.
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = MLPFeatures(4 * width, hidden=fc, dropout=dropout)
        self.feature_dim = self.head.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.blocks(x)), 1))


class MLPFeatures(nn.Module):
    """Linear + ReLU (+ dropout) layers over precomputed feature vectors (N, input_dim).
    With hidden=() the features are the inputs themselves."""

    in_channels = None
    input_size = None

    def __init__(self, input_dim: int, hidden: Sequence[int] = (1024,), dropout: float = 0.0):
        super().__init__()
        self.input_dim = int(input_dim)
        layers = []
        width = self.input_dim
        for hidden_width in hidden:
            layers += [nn.Linear(width, int(hidden_width)), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = int(hidden_width)
        self.layers = nn.Sequential(*layers)
        self.feature_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_model("cnnf")
def cnnf(in_channels: int = 3, dropout: float = 0.5) -> nn.Module:
    return CNNF(in_channels=in_channels, dropout=dropout)


@register_model("alexnet")
def alexnet(in_channels: int = 3, dropout: float = 0.5) -> nn.Module:
    return AlexNetFeatures(in_channels=in_channels, dropout=dropout)


def _check_input_size(name: str, input_size) -> int:
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0:
        raise DmuhError(f"model {name!r}: input_size must be a positive number of pixels, got {input_size!r}")
    return input_size


def _check_width(model: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65536:
        raise DmuhError(f"model {model!r}: {name} must be an integer in [1, 65536], got {value!r}")


def _check_head(model: str, fc, dropout) -> None:
    """The `fc` widths and `dropout` of a CNN-F-like head (SmallCNN's, ResNet's)."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise DmuhError(f"model {model!r}: dropout must be a number in [0, 1), got {dropout!r}")
    widths_ok = isinstance(fc, (list, tuple)) and all(
        isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= 65536 for w in fc
    )
    if not widths_ok:
        raise DmuhError(
            f"model {model!r}: fc must be a list of positive widths up to 65536, e.g. [512, 512], got {fc!r}"
        )


@register_model("resnet18")
def resnet18(
    in_channels: int = 3, small_input: bool = False, fc: Sequence[int] = (), dropout: float = 0.5
) -> nn.Module:
    _check_head("resnet18", fc, dropout)
    return ResNetFeatures(18, in_channels=in_channels, small_input=small_input, fc=fc, dropout=dropout)


# The small-stem variants take any input size (`input_size`, default 32), so they are factories of
# their own; `small_input` is fixed to True (giving it is an error that says so).
@register_model("resnet18-32", small_input=True)
def resnet18_small(
    in_channels: int = 3, input_size: int = 32, small_input: bool = True, fc: Sequence[int] = (), dropout: float = 0.5
) -> nn.Module:
    input_size = _check_input_size("resnet18-32", input_size)
    _check_head("resnet18-32", fc, dropout)
    return ResNetFeatures(18, in_channels=in_channels, small_input=True, input_size=input_size, fc=fc, dropout=dropout)


@register_model("resnet50")
def resnet50(
    in_channels: int = 3, small_input: bool = False, fc: Sequence[int] = (), dropout: float = 0.5
) -> nn.Module:
    _check_head("resnet50", fc, dropout)
    return ResNetFeatures(50, in_channels=in_channels, small_input=small_input, fc=fc, dropout=dropout)


@register_model("resnet50-32", small_input=True)
def resnet50_small(
    in_channels: int = 3, input_size: int = 32, small_input: bool = True, fc: Sequence[int] = (), dropout: float = 0.5
) -> nn.Module:
    input_size = _check_input_size("resnet50-32", input_size)
    _check_head("resnet50-32", fc, dropout)
    return ResNetFeatures(50, in_channels=in_channels, small_input=True, input_size=input_size, fc=fc, dropout=dropout)


@register_model("smallcnn")
def smallcnn(
    in_channels: int = 3, width: int = 64, input_size: int = 32, fc: Sequence[int] = (), dropout: float = 0.5
) -> nn.Module:
    _check_input_size("smallcnn", input_size)
    _check_width("smallcnn", "width", width)
    _check_head("smallcnn", fc, dropout)
    return SmallCNN(in_channels=in_channels, width=width, input_size=input_size, fc=fc, dropout=dropout)


@register_model("mlp")
def mlp(input_dim: int, hidden: Sequence[int] = (1024,), dropout: float = 0.0) -> nn.Module:
    if isinstance(hidden, (str, int)) or not all(
        isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in hidden
    ):
        raise DmuhError(f"model 'mlp': hidden must be a list of positive widths, e.g. [1024], got {hidden!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise DmuhError(f"model 'mlp': dropout must be a number in [0, 1), got {dropout!r}")
    return MLPFeatures(input_dim=input_dim, hidden=hidden, dropout=dropout)
