"""CIFAR ResNets and Wide ResNets, the student and teacher networks of distillation benchmarks.

The six networks are those compared in "Contrastive Representation Distillation" (Tian et al.,
ICLR 2020), with the layouts of its reference code: the CIFAR ResNets of "Deep Residual
Learning for Image Recognition" (He et al., CVPR 2016), depth 6n + 2 with post-activation basic
blocks, and the pre-activation networks of "Wide Residual Networks" (Zagoruyko and Komodakis,
BMVC 2016), depth 6n + 4. All take 32x32 images: a 3x3 stem without downsampling, three stages
at 32, 16 and 8 px, global average pooling and a linear classifier.

Importing ``gctkd.models`` registers them with timm; there are no pretrained weights. The feature
taps (``feature_info``, ``forward_intermediates``, ``features_only``) are the stem output and the
three stage outputs. A Wide ResNet stage ends in a residual sum not yet through a BN-ReLU: its
last tap is taken before the final BN-ReLU, unless ``forward_intermediates(..., norm=True)``.
"""

import logging

import torch
from timm.layers import BatchNormAct2d, create_classifier
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from gctkd.errors import UserError

_logger = logging.getLogger(__name__)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

_ARCHS = {
    'resnet8x4': dict(stem_chs=32, stage_chs=(64, 128, 256), blocks_per_stage=1, preact=False),
    'resnet32x4': dict(stem_chs=32, stage_chs=(64, 128, 256), blocks_per_stage=5, preact=False),
    'resnet20': dict(stem_chs=16, stage_chs=(16, 32, 64), blocks_per_stage=3, preact=False),
    'resnet56': dict(stem_chs=16, stage_chs=(16, 32, 64), blocks_per_stage=9, preact=False),
    'wrn_16_2': dict(stem_chs=16, stage_chs=(32, 64, 128), blocks_per_stage=2, preact=True),
    'wrn_40_2': dict(stem_chs=16, stage_chs=(32, 64, 128), blocks_per_stage=6, preact=True),
}
_FEATURE_CFG = dict(flatten_sequential=True, out_indices=(0, 1, 2, 3))


def _conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)


class _BasicBlock(nn.Module):
    """Post-activation block: conv-BN-ReLU-conv-BN, plus a shortcut, then ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_chs, out_chs, stride)
        self.norm1 = BatchNormAct2d(out_chs)
        self.conv2 = _conv3x3(out_chs, out_chs)
        self.norm2 = nn.BatchNorm2d(out_chs)
        self.shortcut = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            conv = nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False)
            self.shortcut = nn.Sequential(conv, nn.BatchNorm2d(out_chs))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.norm1(self.conv1(x))))
        return self.act(out + self.shortcut(x))


class _PreActBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv-BN-ReLU-conv plus a shortcut, no activation after.

    A 1x1 shortcut conv, where the shape changes, reads the pre-activated input (as in WRN).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.norm1 = BatchNormAct2d(in_chs)
        self.conv1 = _conv3x3(in_chs, out_chs, stride)
        self.norm2 = BatchNormAct2d(out_chs)
        self.conv2 = _conv3x3(out_chs, out_chs)
        self.shortcut = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.norm1(x)
        shortcut = x if self.shortcut is None else self.shortcut(act)
        return self.conv2(self.norm2(self.conv1(act))) + shortcut


class CifarResNet(nn.Module):
    """A three-stage residual network for 32x32 images, with timm's model interface.

    Args:
        stem_chs: Output channels of the 3x3 stem conv.
        stage_chs: Output channels of the three stages, at strides 1, 2 and 4 from the input.
        blocks_per_stage: Residual blocks in each stage.
        preact: Pre-activation blocks and a final BN-ReLU (Wide ResNet) instead of
            post-activation blocks (ResNet).
        num_classes: Classifier outputs; 0 leaves the classifier out.
        in_chans: Input image channels.
        global_pool: timm pooling type of the head ('avg', 'max', ...; '' for none).
        drop_rate: Dropout probability before the classifier.
    """

    def __init__(
        self,
        stem_chs: int,
        stage_chs: tuple[int, int, int],
        blocks_per_stage: int,
        preact: bool,
        num_classes: int = 100,
        in_chans: int = 3,
        global_pool: str = 'avg',
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        stem = [_conv3x3(in_chans, stem_chs)] + ([] if preact else [BatchNormAct2d(stem_chs)])
        self.stem = nn.Sequential(*stem)
        self.feature_info = [dict(num_chs=stem_chs, reduction=1, module=f'stem.{len(stem) - 1}')]

        block_cls = _PreActBlock if preact else _BasicBlock
        stages, in_chs = [], stem_chs
        for index, out_chs in enumerate(stage_chs):
            blocks = [block_cls(in_chs, out_chs, 1 if index == 0 else 2)]
            blocks += [block_cls(out_chs, out_chs, 1) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            in_chs = out_chs
            tap = dict(num_chs=out_chs, reduction=2**index, module=f'stages.{index}')
            self.feature_info.append(tap)
        self.stages = nn.Sequential(*stages)
        self.norm = BatchNormAct2d(in_chs) if preact else nn.Identity()

        self.num_features = self.head_hidden_size = in_chs
        self.global_pool, self.fc = create_classifier(in_chs, num_classes, pool_type=global_pool)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each residual block in the backward pass instead of storing activations."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Swap in a new ``num_classes``-way classifier (0: none); None ``global_pool`` keeps it."""
        self.num_classes = num_classes
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = 'NCHW',
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward pass that also returns feature maps at the taps of ``feature_info``.

        Args:
            x: Input images, shape (N, C, H, W).
            indices: Taps to return: the last n if an int, these taps if a list (negative counts
                from the end), all 4 if None. Tap 0 is the stem, taps 1-3 the stages.
            norm: Apply the final BN-ReLU of a pre-activation network to the last stage's tap.
            stop_early: Stop after the last requested tap, which is then also the final output.
            output_fmt: Layout of the taps; only 'NCHW'.
            intermediates_only: Return the list of taps alone.

        Returns:
            ``(final features, taps)``, or the list of taps if ``intermediates_only``.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        last_index = len(self.stages)
        intermediates = []

        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        stages = self.stages[:max_index] if stop_early else self.stages
        for feat_index, stage in enumerate(stages, start=1):
            x = checkpoint_seq(stage, x) if self.grad_checkpointing else stage(x)
            if feat_index in take_indices:
                intermediates.append(self.norm(x) if norm and feat_index == last_index else x)
        if intermediates_only:
            return intermediates

        if len(stages) == last_index:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages after the last tap in ``indices`` and the head; return the kept taps."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        prune_end = max_index < len(self.stages)
        self.stages = self.stages[:max_index]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map before pooling, shape (N, num_features, H / 4, W / 4)."""
        x = self.stem(x)
        if self.grad_checkpointing:
            return self.norm(checkpoint_seq(self.stages, x, flatten=True))
        return self.norm(self.stages(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooling, dropout and classifier; ``pre_logits`` stops before the classifier."""
        x = self.global_pool(x)
        if self.drop_rate > 0.0:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_CFG = dict(
    url='',
    num_classes=100,
    input_size=(3, 32, 32),
    pool_size=(8, 8),
    crop_pct=1.0,
    interpolation='bilinear',
    mean=CIFAR_MEAN,
    std=CIFAR_STD,
    first_conv='stem.0',
    classifier='fc',
)
default_cfgs = generate_default_cfgs({name: dict(_CFG) for name in _ARCHS})
CIFAR_MODEL_NAMES = tuple(_ARCHS)  # all registered with timm; none has pretrained weights


def _create(variant: str, pretrained: bool, **kwargs) -> CifarResNet:
    if pretrained:
        raise UserError(
            f"no pretrained weights exist for {variant!r}: gctkd's CIFAR models start from random "
            'initialization; use pretrained=False (load a trained checkpoint with checkpoint_path)'
        )
    arch = _ARCHS[variant]
    return build_model_with_cfg(
        CifarResNet, variant, pretrained=False, feature_cfg=dict(_FEATURE_CFG), **arch, **kwargs
    )


@register_model
def resnet8x4(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-8 with 4x wider stages (32-64-128-256 channels, 1 block per stage)."""
    return _create('resnet8x4', pretrained, **kwargs)


@register_model
def resnet32x4(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 with 4x wider stages (32-64-128-256 channels, 5 blocks per stage)."""
    return _create('resnet32x4', pretrained, **kwargs)


@register_model
def resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-20 (16-16-32-64 channels, 3 blocks per stage)."""
    return _create('resnet20', pretrained, **kwargs)


@register_model
def resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-56 (16-16-32-64 channels, 9 blocks per stage)."""
    return _create('resnet56', pretrained, **kwargs)


@register_model
def wrn_16_2(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Wide ResNet-16-2 (16-32-64-128 channels, 2 pre-activation blocks per stage)."""
    return _create('wrn_16_2', pretrained, **kwargs)


@register_model
def wrn_40_2(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Wide ResNet-40-2 (16-32-64-128 channels, 6 pre-activation blocks per stage)."""
    return _create('wrn_40_2', pretrained, **kwargs)
