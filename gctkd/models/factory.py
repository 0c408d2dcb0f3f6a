"""Model creation by timm name, with errors a user can act on.

Every model comes from timm's registry; importing :mod:`gctkd.models` adds the CIFAR
networks of :mod:`gctkd.models.cifar` to it. Nothing is downloaded unless the user asks
for ``pretrained`` weights.
"""

import logging

import timm
from torch import nn

from gctkd.errors import UserError, nearest_names

_logger = logging.getLogger(__name__)


def create_model(name: str, num_classes: int, pretrained: bool = False) -> nn.Module:
    """A timm model with ``num_classes`` outputs.

    Args:
        name: any timm model name, e.g. ``resnet18`` or gctkd's ``resnet8x4``.
        num_classes: size of the classifier.
        pretrained: load timm's pretrained weights (downloads them; opt-in only).
    """
    if not timm.is_model(name):
        raise UserError(
            f"unknown model '{name}'{nearest_names(name, timm.list_models())}: "
            "pass a timm model name (timm.list_models() lists them)"
        )
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
