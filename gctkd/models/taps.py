"""Feature taps: a network's logits and chosen intermediate feature maps from one forward pass.

Feature distillation (FitNets hints, attention transfer, deep supervision at several depths)
needs the student's and the teacher's feature maps at chosen layers. A layer is named either
by its **tap index**, a position in timm's ``feature_info`` (for timm CNNs 0 is the stem and
1.. the stage outputs; for gctkd's CIFAR networks 0 is the stem and 1-3 the three stages), or
by its **module name** as ``named_modules()`` spells it (``layer2``, ``stages.1``,
``blocks.3.0``). A name that is also a ``feature_info`` module is treated as that tap.

How the maps are read, for the one forward pass that also gives the logits:

- taps by index go through timm's ``forward_intermediates(x, indices)``, whose final output
  goes through ``forward_head`` for the logits;
- taps by any other module name are read with forward hooks, registered only for the call,
  so copies of the model (EMA) never carry them;
- models without ``forward_intermediates``, or whose ``forward_head(forward_intermediates())``
  does not reproduce ``forward()`` (checked once at start), run their plain forward with
  hooks on the ``feature_info`` modules.

Names resolve through wrappers: DistributedDataParallel and timm's EMA (``.module``) and
``torch.compile`` (``._orig_mod``); a ``module.`` or ``_orig_mod.`` prefix in a name is
dropped. A DDP-wrapped model is always run through the wrapper (with hooks), so its gradient
synchronisation still happens. An unknown layer, a layer that never runs, or one whose
output is not a ``[B, C, H, W]`` map is a :class:`~gctkd.errors.UserError` at start.

FIXME: a ``torch.compile``'d model is tapped through its uncompiled module (``_orig_mod``):
feature distillation runs the student eagerly and loses the compile speed-up.

NOTE: a hook keeps the module's output tensor itself, not a copy. A later in-place operation
on that tensor (an in-place activation right after a hooked norm layer) changes what the tap
holds; tap the activation instead, or a stage output (what ``feature_info`` lists).
"""

import logging
from typing import Sequence

import torch
from torch import nn

from gctkd.errors import UserError, nearest_names

_logger = logging.getLogger(__name__)

LayerSpec = int | str

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside DDP, timm EMA and ``torch.compile`` wrappers (any nesting)."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def parse_layer(text: str) -> LayerSpec:
    """``"2"`` -> the tap index 2; anything else is a module name."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return text


def parse_feature_layers(text: str) -> list[tuple[LayerSpec, LayerSpec]]:
    """``--feature-layers`` as ``(teacher layer, student layer)`` pairs.

    ``"1:1,2:2"`` pairs teacher and student layers; an item without a colon (``"2"`` or
    ``"layer3"``) names the same layer on both sides.
    """
    pairs: list[tuple[LayerSpec, LayerSpec]] = []
    for item in str(text).split(","):
        parts = [part.strip() for part in item.split(":")]
        if len(parts) > 2 or not all(parts):
            raise UserError(
                f"--feature-layers takes TEACHER:STUDENT pairs or layers separated by commas "
                f"(e.g. 1:1,2:2 or layer2:stages.1 or 2,3), got {text!r}"
            )
        teacher, student = (parts[0], parts[0]) if len(parts) == 1 else parts
        pairs.append((parse_layer(teacher), parse_layer(student)))
    return pairs


def _feature_modules(model: nn.Module) -> list[str]:
    """The module names of the model's ``feature_info`` taps, in tap order."""
    info = getattr(model, "feature_info", None)
    if info is None:
        return []
    if hasattr(info, "module_name"):  # timm FeatureInfo
        return list(info.module_name())
    return [str(tap.get("module", "")) for tap in info]


def _strip_wrapper_prefix(name: str) -> str:
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


class FeatureTaps:
    """Runs a model once and returns its logits and the feature maps at ``layers``.

    Not a module: it holds no parameters and adds nothing to the model's ``state_dict``.

    Args:
        model: the network, possibly wrapped (DDP, EMA, ``torch.compile``).
        layers: tap indices or module names, one per feature wanted (see the module docstring).
        role: ``"teacher"`` or ``"student"``, for error messages.
        model_name: the model's name, for error messages.

    Raises:
        UserError: an index outside ``feature_info`` or an unknown module name; the message
            lists the valid indices and names.
    """

    def __init__(
        self, model: nn.Module, layers: Sequence[LayerSpec], role: str, model_name: str = ""
    ) -> None:
        self.model = model
        self.core = unwrap_model(model)
        self.role = role
        self.model_name = model_name or type(self.core).__name__
        self.tap_modules = _feature_modules(self.core)
        self._module_names = [name for name, _ in self.core.named_modules()]
        self.use_intermediates = hasattr(self.core, "forward_intermediates") and not _is_ddp(model)
        # each layer becomes ("index", tap) or ("hook", module name)
        self.layers = [self._resolve(layer) for layer in layers]
        self.names = [
            self.tap_modules[where] if kind == "index" else where for kind, where in self.layers
        ]

    def _describe_taps(self) -> str:
        if not self.tap_modules:
            return "it has no feature_info taps, so name modules instead"
        listed = ", ".join(f"{i} {name}" for i, name in enumerate(self.tap_modules))
        return f"its taps are {listed}"

    def _resolve(self, layer: LayerSpec) -> tuple[str, int | str]:
        where = f"--feature-layers: {self.role} layer {layer!r}"
        if isinstance(layer, int) and not self.tap_modules and str(layer) in self._module_names:
            return "hook", str(layer)  # a child of an nn.Sequential without feature_info
        if isinstance(layer, int):
            count = len(self.tap_modules)
            if not -count <= layer < count:
                raise UserError(
                    f"{where} is out of range for {self.model_name}: {self._describe_taps()}; "
                    "pass a tap index or a module name"
                )
            return "index", layer % count
        name = _strip_wrapper_prefix(layer)
        if name in self.tap_modules:
            return "index", self.tap_modules.index(name)
        if name not in self._module_names or not name:
            hint = nearest_names(name, [n for n in self._module_names if n])
            raise UserError(
                f"{where} is not a module of {self.model_name}{hint}: {self._describe_taps()}; "
                "other module names are those of model.named_modules()"
            )
        return "hook", name

    def check(self, images: torch.Tensor) -> list[torch.Size]:
        """Run once on ``images`` in evaluation mode without gradients; the tap shapes.

        Also checks that ``forward_head(forward_intermediates())`` reproduces ``forward()``
        and falls back to hooks when it does not.

        Raises:
            UserError: a tapped module that never runs, or an output not ``[B, C, H, W]``.
        """
        was_training = self.core.training
        self.core.eval()
        try:
            with torch.no_grad():
                if self.use_intermediates and any(kind == "index" for kind, _ in self.layers):
                    logits, _ = self(images)
                    reference = self.model(images)
                    if logits.shape != reference.shape or not torch.allclose(
                        logits, reference, rtol=1e-4, atol=1e-5
                    ):
                        _logger.debug(
                            f"{self.model_name}: forward_intermediates does not reproduce "
                            "forward(); reading its taps with hooks"
                        )
                        self.use_intermediates = False
                _, features = self(images)
        finally:
            self.core.train(was_training)
        for name, feature in zip(self.names, features):
            if feature.ndim != 4:
                raise UserError(
                    f"--feature-layers: {self.role} layer {name!r} of {self.model_name} gives an "
                    f"output of shape {tuple(feature.shape)}; feature taps need [B, C, H, W] "
                    f"maps: {self._describe_taps()}"
                )
        return [feature.shape for feature in features]

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(logits, features)``: features in the order of ``layers``, graph kept."""
        hooked: dict[str, torch.Tensor] = {}
        indices = sorted({where for kind, where in self.layers if kind == "index"})
        hook_names = {where for kind, where in self.layers if kind == "hook"}
        if not self.use_intermediates:
            hook_names |= {self.tap_modules[index] for index in indices}
        # looked up at each call: a SyncBatchNorm conversion may have replaced submodules
        modules = dict(self.core.named_modules()) if hook_names else {}
        missing = sorted(name for name in hook_names if name not in modules)
        if missing:
            raise UserError(
                f"--feature-layers: {self.role} taps {missing} of {self.model_name} are not "
                "modules it can be hooked at: name modules of model.named_modules() instead"
            )

        def hook_for(name: str):
            def store(module: nn.Module, inputs: object, output: object) -> None:
                hooked[name] = output if torch.is_tensor(output) else output[0]

            return store

        handles = [
            modules[name].register_forward_hook(hook_for(name)) for name in hook_names
        ]
        try:
            if self.use_intermediates and indices:
                final, taps = self.core.forward_intermediates(images, indices=indices)
                logits = self.core.forward_head(final)
                by_index = dict(zip(indices, taps))
            else:
                logits = self.model(images)
                by_index = {}
        finally:
            for handle in handles:
                handle.remove()

        features = []
        for (kind, where), name in zip(self.layers, self.names):
            feature = by_index.get(where) if kind == "index" else None
            if feature is None:
                feature = hooked.get(name)
            if feature is None:
                raise UserError(
                    f"--feature-layers: {self.role} layer {name!r} of {self.model_name} did not "
                    "run in the forward pass: pick a layer the model uses"
                )
            features.append(feature)
        return logits, features
