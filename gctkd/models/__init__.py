"""Models: timm creation, the CIFAR networks registered in timm, teacher wrapping."""

from gctkd.models import cifar  # noqa: F401  (registers the CIFAR models with timm)
from gctkd.models.factory import count_parameters, create_model
from gctkd.models.teacher import FrozenTeacher

__all__ = ["FrozenTeacher", "count_parameters", "create_model"]
