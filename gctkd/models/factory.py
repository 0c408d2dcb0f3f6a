"""Model creation by timm name and weights files, with errors a user can act on.

Every model comes from timm's registry; importing :mod:`gctkd.models` adds the CIFAR
networks of :mod:`gctkd.models.cifar` to it. Nothing is downloaded unless the user asks
for ``pretrained`` weights.
"""

import logging
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import timm
import torch
from torch import nn

from gctkd.engine.checkpoint import read_torch_file, require_file
from gctkd.errors import UserError, nearest_names
from gctkd.models.cifar import CIFAR_MODEL_NAMES

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
    if not pretrained:
        return timm.create_model(name, num_classes=num_classes)
    if name in CIFAR_MODEL_NAMES:
        raise UserError(
            f"'{name}' is one of gctkd's CIFAR networks, which have no pretrained weights: "
            "drop --pretrained, or continue a trained run with gctkd finetune --from RUN"
        )
    hub_logger = logging.getLogger("huggingface_hub")
    quiet_level, hub_logger.level = hub_logger.level, logging.ERROR  # its retries, one a line
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes)
    except Exception as error:  # noqa: BLE001 - offline, no such weights, a broken cache
        # timm and huggingface_hub raise a dozen kinds here (HTTP, OSError, RuntimeError);
        # for the user each means the same: the weights could not be had
        detail = (str(error).splitlines() or [""])[0]
        detail = detail.split(". ")[0][:200] or type(error).__name__
        raise UserError(
            f"cannot load timm's pretrained weights for '{name}' ({type(error).__name__}: "
            f"{detail}): check the network or the Hugging Face cache, or drop --pretrained"
        ) from None
    finally:
        hub_logger.setLevel(quiet_level)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _state_dict_in(loaded: Any, path: Path, option: str) -> dict[str, torch.Tensor]:
    """The tensor dict of a loaded weights file: plain, or under a usual key."""
    if isinstance(loaded, dict) and loaded.get("format") == "gctkd-checkpoint":
        raise UserError(f"{option} '{path}' is a gctkd checkpoint: pass it as --teacher instead")
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(torch.is_tensor(v) for v in loaded.values()):
        raise UserError(
            f"{option} '{path}' does not hold a state dict (names -> tensors): save the "
            "model's state_dict() with torch.save or safetensors"
        )
    weights = {}
    for name, tensor in loaded.items():
        while name.startswith(("module.", "_orig_mod.")):
            name = name.split(".", 1)[1]
        weights[name] = tensor
    return weights


def load_weights_file(
    path: str | Path, option: str = "--teacher-weights"
) -> dict[str, torch.Tensor]:
    """A state dict from a local ``.safetensors`` or ``.pt``/``.pth``/``.bin`` file.

    Files are read with safetensors or ``torch.load(weights_only=True)``: tensors and plain
    data only, never code. ``module.`` and ``_orig_mod.`` prefixes (DDP, torch.compile) are
    dropped; a dict holding the weights under ``state_dict_ema``, ``state_dict`` or
    ``model`` is unpacked.

    Raises:
        UserError: a missing or unreadable file, or one that holds anything but weights.
    """
    path = Path(path)
    expected = "a .safetensors file or a .pt file of a state_dict()"
    if path.suffix != ".safetensors":
        loaded = read_torch_file(path, option, expected, "weights file")
    else:
        require_file(path, option, expected)
        try:
            loaded = safetensors.torch.load_file(str(path), device="cpu")
        except (OSError, ValueError, safetensors.SafetensorError) as error:
            reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
            raise UserError(
                f"{option} '{path}' is not a readable weights file ({reason}): pass {expected}"
            ) from None
    return _state_dict_in(loaded, path, option)


def classifier_outputs(model: nn.Module, weights: dict[str, torch.Tensor]) -> int | None:
    """The class count a state dict's classifier was trained for, when timm names it."""
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    names = [classifier] if isinstance(classifier, str) else list(classifier or [])
    for name in names:
        weight = weights.get(f"{name}.weight")
        if weight is not None and weight.ndim >= 1:
            return int(weight.shape[0])
    return None


def load_weights(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    source: str,
    what: str = "the model",
    fix: str = "pass the --model it was trained with",
) -> None:
    """``model.load_state_dict(weights)``; a mismatch is a UserError naming ``source``."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        detail = str(error).splitlines()[0][:200]
        raise UserError(f"{source} does not fit {what} ({detail}): {fix}") from None


def model_from_checkpoint(
    state: dict[str, Any], source: str, model_name: str | None = None
) -> nn.Module:
    """Rebuild the network a checkpoint was trained with and load its exported weights."""
    recorded = state.get("model_name")
    if model_name is not None and recorded is not None and model_name != recorded:
        raise UserError(
            f"{source} holds a '{recorded}', not a '{model_name}': drop --model or pass "
            f"--model {recorded}"
        )
    model = create_model(model_name or recorded, int(state["num_classes"]))
    load_weights(model, state["model"], source)
    return model
