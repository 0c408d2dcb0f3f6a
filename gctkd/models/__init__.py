"""Models: timm creation and weights, CIFAR networks in timm, feature taps, connectors, teachers."""

from gctkd.models import cifar  # noqa: F401  (registers the CIFAR models with timm)
from gctkd.models.factory import (
    classifier_outputs,
    count_parameters,
    create_model,
    load_weights,
    load_weights_file,
    model_from_checkpoint,
)
from gctkd.models.teacher import FrozenTeacher

__all__ = [
    "FrozenTeacher",
    "classifier_outputs",
    "count_parameters",
    "create_model",
    "load_weights",
    "load_weights_file",
    "model_from_checkpoint",
]
