"""Image classifiers: ``digits_cnn``, ``mlp``, ``resnet20``, ``resnet18``, ``mobilenet``.

Each maps ``[B, C, H, W]`` floats (``mlp``: any input shape) to logits ``[B, classes]``. The
convolutional models end in adaptive pooling, so they accept any ``H, W`` (they are sized for
8x8 digits and 32x32 CIFAR). Weights come from the global torch RNG only: seed it first and the
same arguments give the same weights.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "DigitsCNN", "MobileNet", "ResNet", "ZeroPadShortcut", "resnet18", "resnet20"]


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, max pooling to 4x4 and two linear layers (~72k parameters).

    On 8x8 digits the pooling is exactly 2x2 max pooling; this net reaches ~97% test accuracy.

    Args:
        in_channels: input channels.
        num_classes: output classes.
        width: channels of the first convolution (default 16); the second has ``2 * width``,
            the hidden linear layer ``8 * width`` units.
    """

    def __init__(self, *, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 4 * 4, 8 * width)
        self.fc2 = nn.Linear(8 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = F.adaptive_max_pool2d(x, 4)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class MLP(nn.Module):
    """Flatten, ``depth`` hidden ``Linear + ReLU (+ Dropout)`` layers, a linear classifier.

    Args:
        in_features: elements of one input (its shape is flattened).
        num_classes: output classes.
        width: hidden units per layer (default 512).
        depth: hidden layers (default 2; 0 hidden layers is logistic regression).
        dropout: dropout after each hidden layer (0: none).
    """

    def __init__(
        self,
        *,
        in_features: int,
        num_classes: int,
        width: int = 512,
        depth: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        features = in_features
        for _ in range(depth):
            layers += [nn.Linear(features, width), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            features = width
        layers.append(nn.Linear(features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _conv_bn(
    cin: int, cout: int, *, kernel: int = 3, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(cout)]


def _channels(conv: nn.Module) -> int:
    assert isinstance(conv, nn.Conv2d)
    return conv.out_channels


def _init_cnn(model: nn.Module) -> None:
    """He initialisation for convolutions, identity for batch norm (He et al., 2015)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ZeroPadShortcut(nn.Module):
    """The parameter-free shortcut (option A of He et al.): subsample by ``stride`` and place
    the ``in_channels`` input channels among ``out_channels`` zero channels (centred, as zero
    padding would).

    The placement is data: input channel ``src[i]`` goes to output channel ``dst[i]``
    (buffers, not saved: a channel-pruned model rebuilds them from its pruning history), so that
    the channels on either side can be removed independently: the stage before and the stage
    after keep their own widths (:mod:`dtrain.pruning.structured` prunes it).

    Args:
        in_channels: channels in.
        out_channels: channels out (at least ``in_channels``).
        stride: spatial subsampling.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        half = (out_channels - in_channels) // 2
        self.src: Tensor
        self.dst: Tensor
        self.register_buffer("src", torch.arange(in_channels), persistent=False)
        self.register_buffer("dst", torch.arange(half, half + in_channels), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        out = x.new_zeros((x.shape[0], self.out_channels, x.shape[2], x.shape[3]))
        return out.index_copy(1, self.dst, x.index_select(1, self.src))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual connection.

    When the shape changes, the shortcut is either a 1x1 conv + BN (``projection=True``,
    ResNet-18) or parameter-free: a :class:`ZeroPadShortcut` (option A of He et al., the CIFAR
    ResNet-20).
    """

    def __init__(self, cin: int, cout: int, *, stride: int, projection: bool) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, stride=stride)
        self.conv2, self.bn2 = _conv_bn(cout, cout)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            if projection:
                self.shortcut = nn.Sequential(*_conv_bn(cin, cout, kernel=1, stride=stride))
            else:
                self.shortcut = ZeroPadShortcut(cin, cout, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            x = self.shortcut(x)
        return F.relu(out + x)


class ResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem (no max pooling), stages of basic blocks, global pooling.

    Args:
        in_channels: input channels.
        num_classes: output classes.
        stages: ``(channels, blocks, stride)`` per stage.
        projection: 1x1 conv shortcuts (else parameter-free, option A).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        stages: list[tuple[int, int, int]],
        projection: bool,
    ) -> None:
        super().__init__()
        width = stages[0][0]
        self.stem = nn.Sequential(*_conv_bn(in_channels, width), nn.ReLU())
        blocks: list[nn.Module] = []
        cin = width
        self.stage_sizes = [count for _, count, _ in stages]
        for channels, count, stride in stages:
            for i in range(count):
                s = stride if i == 0 else 1
                blocks.append(BasicBlock(cin, channels, stride=s, projection=projection))
                cin = channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        _init_cnn(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def _block(self, i: int) -> BasicBlock:
        block = self.blocks[i]
        assert isinstance(block, BasicBlock)
        return block

    def stage_widths(self) -> list[dict[str, object]]:
        """Per stage: ``width`` (the channels its blocks share: they meet in residual adds) and
        ``inside`` (each block's inner channels, between its two convolutions)."""
        out, first = [], 0
        for count in self.stage_sizes:
            blocks = [self._block(i) for i in range(first, first + count)]
            first += count
            out.append({
                "width": _channels(blocks[-1].conv2),
                "inside": [_channels(b.conv1) for b in blocks],
            })  # fmt: skip
        return out


def resnet20(*, in_channels: int, num_classes: int, width: int = 16) -> ResNet:
    """ResNet-20 for CIFAR (He et al., 2016, section 4.2): ~0.27M parameters.

    Three stages of three basic blocks with ``width``, ``2 * width``, ``4 * width`` channels
    (default 16, 32, 64), parameter-free shortcuts.

    Args:
        in_channels: input channels.
        num_classes: output classes.
        width: channels of the stem and first stage (default 16).
    """
    stages = [(width, 3, 1), (2 * width, 3, 2), (4 * width, 3, 2)]
    return ResNet(in_channels=in_channels, num_classes=num_classes, stages=stages, projection=False)


def resnet18(*, in_channels: int, num_classes: int, width: int = 64) -> ResNet:
    """ResNet-18 in its CIFAR form (3x3 stem, no max pooling): ~11.2M parameters.

    Four stages of two basic blocks with ``width`` .. ``8 * width`` channels (default 64 ..
    512), 1x1 projection shortcuts.

    Args:
        in_channels: input channels.
        num_classes: output classes.
        width: channels of the stem and first stage (default 64).
    """
    stages = [(width, 2, 1), (2 * width, 2, 2), (4 * width, 2, 2), (8 * width, 2, 2)]
    return ResNet(in_channels=in_channels, num_classes=num_classes, stages=stages, projection=True)


# Output channels of MobileNet-v1's depthwise-separable blocks at width 32, (channels, stride).
_MOBILENET_BLOCKS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    *((512, 1),) * 5,
    (1024, 2),
    (1024, 1),
)


class MobileNet(nn.Module):
    """MobileNet-v1 (Howard et al., 2017) for 32x32 inputs: ~3.2M parameters at width 32.

    A 3x3 stem with stride 1 (ImageNet's stride 2 would leave CIFAR images too small), then 13
    depthwise-separable blocks (depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU) with four
    stride-2 downsamplings, global average pooling and a linear classifier.

    Args:
        in_channels: input channels.
        num_classes: output classes.
        width: stem channels (default 32); every block scales with ``width / 32`` (the paper's
            width multiplier), so 16 is MobileNet-0.5.
    """

    def __init__(self, *, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(in_channels, width), nn.ReLU()]
        cin = width
        for channels, stride in _MOBILENET_BLOCKS:
            cout = max(1, channels * width // 32)
            layers += [*_conv_bn(cin, cin, stride=stride, groups=cin), nn.ReLU()]
            layers += [*_conv_bn(cin, cout, kernel=1), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        _init_cnn(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
