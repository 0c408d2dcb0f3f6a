"""Numeric precision and memory layout: AMP and channels_last on CUDA, fp32 on the CPU.

The trainer calls the same methods on every device; on the CPU autocast and the gradient
scaler are constructed disabled, so the step's code path does not branch on the device.
"""

import contextlib
import logging

import torch

from gctkd.errors import UserError

_logger = logging.getLogger(__name__)


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is visible: use --device cpu")
    return torch.device(name)


class Precision:
    """Autocast dtype, gradient scaler and memory format for one device.

    Args:
        device: where the step runs.
        amp: ``auto`` (bf16 where the GPU supports it, else fp16), ``bf16``, ``fp16`` or
            ``off``. Ignored on the CPU, which trains in fp32.
    """

    def __init__(self, device: torch.device, amp: str = "auto") -> None:
        self.device = device
        on_cuda = device.type == "cuda"
        if not on_cuda or amp == "off":
            self.dtype = None
        elif amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
            self.dtype = torch.bfloat16
        else:
            self.dtype = torch.float16
        # only fp16 needs loss scaling; bf16 has fp32's exponent range
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.memory_format = torch.channels_last if on_cuda else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def images_to_device(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True, memory_format=self.memory_format)

    def describe(self) -> str:
        dtype = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}
        layout = "channels_last" if self.memory_format == torch.channels_last else "contiguous"
        return f"{self.device.type} {dtype[self.dtype]}, {layout}"
