"""CIFAR-form ResNets (He et al. 2016): a 3×3 stride-1 stem and no max-pool, for small images.

The ImageNet form (7×7 stride-2 stem + max-pool) shrinks a 32×32 image to 8×8 before the first
stage; the CIFAR form keeps full resolution there, which is what makes it accurate on small images.
For the ImageNet form use `torchvision:resnet18` etc.
"""

from __future__ import annotations

from torch import Tensor, nn

from dltrain.config.registry import MODELS
from dltrain.models.cnn import require_image

_WIDTHS = (64, 128, 256, 512)
_STRIDES = (1, 2, 2, 2)


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    """A bias-free conv (the BN that follows has its own shift) and its batch norm."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    return [conv, nn.BatchNorm2d(c_out)]


class _Block(nn.Module):
    """A residual block: relu(body(x) + shortcut(x)); the shortcut projects when shapes change."""

    expansion = 1

    def __init__(self, body: list[nn.Module], c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*body)
        self.shortcut = (
            nn.Sequential(*_conv_bn(c_in, c_out, 1, stride))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))

    def last_bn(self) -> nn.BatchNorm2d:
        """The batch norm ending the residual branch (zeroed by zero_init_residual)."""
        return self.body[-1]


class BasicBlock(_Block):
    """Two 3×3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        body = [
            *_conv_bn(c_in, planes, 3, stride),
            nn.ReLU(inplace=True),
            *_conv_bn(planes, planes, 3),
        ]
        super().__init__(body, c_in, planes, stride)


class Bottleneck(_Block):
    """1×1 reduce, 3×3 (strided, as in torchvision's "ResNet v1.5"), 1×1 expand ×4 (ResNet-50)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        c_out = planes * self.expansion
        body = [
            *_conv_bn(c_in, planes, 1),
            nn.ReLU(inplace=True),
            *_conv_bn(planes, planes, 3, stride),
            nn.ReLU(inplace=True),
            *_conv_bn(planes, c_out, 1),
        ]
        super().__init__(body, c_in, c_out, stride)


class CifarResNet(nn.Module):
    """Stem conv → four stages of residual blocks → global average pool → linear classifier."""

    def __init__(
        self,
        block: type[_Block],
        depths: tuple[int, ...],
        in_channels: int,
        num_classes: int,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, _WIDTHS[0], 3), nn.ReLU(inplace=True))
        stages, c_in = [], _WIDTHS[0]
        for planes, stride, depth in zip(_WIDTHS, _STRIDES, depths, strict=True):
            blocks = []
            for i in range(depth):
                blocks.append(block(c_in, planes, stride if i == 0 else 1))
                c_in = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each block then starts as the identity, which helps large-batch training
            # (Goyal et al. 2017, "Accurate, Large Minibatch SGD").
            for m in self.modules():
                if isinstance(m, _Block):
                    nn.init.zeros_(m.last_bn().weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))))


def _build(
    name: str,
    block: type[_Block],
    depths: tuple[int, ...],
    input_shape: tuple[int, ...],
    num_classes: int,
    zero_init_residual: bool,
    input_kind: str,
) -> nn.Module:
    require_image(name, input_shape, input_kind=input_kind)
    return CifarResNet(block, depths, input_shape[0], num_classes, zero_init_residual)


@MODELS.register()
def resnet18(
    input_shape: tuple[int, ...],
    num_classes: int,
    zero_init_residual: bool = False,
    input_kind: str = "image",
) -> nn.Module:
    """ResNet-18 in CIFAR form (3×3 stem, no max-pool), for small images; 11M parameters."""
    return _build(
        "resnet18",
        BasicBlock,
        (2, 2, 2, 2),
        input_shape,
        num_classes,
        zero_init_residual,
        input_kind,
    )


@MODELS.register()
def resnet34(
    input_shape: tuple[int, ...],
    num_classes: int,
    zero_init_residual: bool = False,
    input_kind: str = "image",
) -> nn.Module:
    """ResNet-34 in CIFAR form (3×3 stem, no max-pool), for small images; 21M parameters."""
    return _build(
        "resnet34",
        BasicBlock,
        (3, 4, 6, 3),
        input_shape,
        num_classes,
        zero_init_residual,
        input_kind,
    )


@MODELS.register()
def resnet50(
    input_shape: tuple[int, ...],
    num_classes: int,
    zero_init_residual: bool = False,
    input_kind: str = "image",
) -> nn.Module:
    """ResNet-50 in CIFAR form (3×3 stem, no max-pool, bottleneck blocks); 24M parameters."""
    return _build(
        "resnet50",
        Bottleneck,
        (3, 4, 6, 3),
        input_shape,
        num_classes,
        zero_init_residual,
        input_kind,
    )
