"""Several processes: ``torchrun`` starts them, PyTorch's DistributedDataParallel trains.

``torchrun --nproc-per-node N gctkd COMMAND ...`` sets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE`` and the rendezvous address in each process's environment; :func:`setup`
joins the process group from them (NCCL on CUDA, one GPU per process; gloo on the CPU).
Without ``WORLD_SIZE`` > 1 nothing here does anything and the run is a plain single process.

What holds with several processes:

* ``--batch-size`` stays the batch of one optimizer step; each process takes
  ``batch_size / world_size`` of it, so the steps per epoch, the LR schedule and every knob
  value are those of one process (knobs are a pure function of progress, hence equal on all
  ranks without any communication).
* BatchNorm statistics are computed over the whole batch of all processes: torch's
  SyncBatchNorm on CUDA (timm's converter, which also handles timm's BatchNormAct layers),
  and on the CPU, where SyncBatchNorm does not run, :func:`_reduced_batch_norm`, which sums
  the per-channel moments with a differentiable all-reduce.
* Only the trainable modules are wrapped in DistributedDataParallel, never a frozen teacher;
  the wrapper calls the task's own loss, so hooks on the model (feature taps) still fire.
* Validation is split over the ranks and its sums are all-reduced, so every rank gets the
  metrics of the whole validation set.
* Logging, TensorBoard, metrics, config and checkpoints are written by rank 0 only.
"""

import functools
import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gctkd.errors import UserError

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands among the processes of one run.

    Args:
        rank: this process's rank, 0 to ``world_size - 1``.
        local_rank: its rank on this machine (the GPU it uses).
        world_size: processes in the run.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistributedContext()


def _environment_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def setup(device: torch.device) -> tuple[DistributedContext, torch.device]:
    """Join the process group torchrun describes; returns the context and this rank's device.

    Args:
        device: the device the settings chose (``cuda`` or ``cpu``); on CUDA each process
            takes the GPU of its local rank.
    """
    world_size = _environment_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return SINGLE, device
    rank = _environment_int("RANK", 0)
    local_rank = _environment_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {local_rank} needs GPU {local_rank}, but {torch.cuda.device_count()} "
                "are visible: start at most one process per GPU (--nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    context = DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size)
    if not context.is_main:
        # one set of logs: other ranks report errors only
        logging.getLogger("gctkd").setLevel(logging.ERROR)
    _logger.info(f"{world_size} processes ({dist.get_backend()}), rank 0 writes the run folder")
    return context, device


def teardown(context: DistributedContext) -> None:
    """Leave the process group (after a run, or when it fails)."""
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, context: DistributedContext, op: str = "sum") -> torch.Tensor:
    """Sum (or ``max``) ``tensor`` in place over all ranks; a no-op for one process."""
    if context.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


def broadcast_object(value: Any, context: DistributedContext) -> Any:
    """Rank 0's ``value`` on every rank (for what only rank 0 decides: the run folder)."""
    if not context.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward sums the gradients over the ranks in turn."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> torch.Tensor:
        total = gradient.clone()
        dist.all_reduce(total)
        return total


def _reduced_batch_norm(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm in training mode with mean and variance over the batches of all ranks.

    The per-channel sums of x and x^2 and the sample count are summed over the ranks by an
    all-reduce whose backward sums the gradients in turn, so each rank's gradient is the one
    of the whole batch. Evaluation uses the running statistics as usual.
    """
    if not module.training:
        return module._gctkd_local_forward(x)
    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]
    count = x.new_full((1,), x.numel() // channels)
    moments = torch.cat([x.sum(dims), (x * x).sum(dims), count])
    moments = _SumOverRanks.apply(moments)
    total = moments[-1]
    mean = moments[:channels] / total
    variance = (moments[channels : 2 * channels] / total - mean * mean).clamp_min(0)
    shape = [1, channels] + [1] * (x.dim() - 2)
    out = (x - mean.view(shape)) * torch.rsqrt(variance + module.eps).view(shape)
    if module.affine:
        out = out * module.weight.view(shape) + module.bias.view(shape)
    if module.track_running_stats:
        with torch.no_grad():
            module.num_batches_tracked.add_(1)
            factor = module.momentum
            if factor is None:
                factor = 1.0 / float(module.num_batches_tracked)
            unbiased = variance * (total / (total - 1).clamp_min(1))
            module.running_mean.lerp_(mean.detach(), factor)
            module.running_var.lerp_(unbiased.detach(), factor)
    # timm's BatchNormAct layers apply dropout and their activation after the norm
    if hasattr(module, "act") and hasattr(module, "drop"):
        out = module.act(module.drop(out))
    return out


def synchronize_batch_norm(module: nn.Module, context: DistributedContext) -> nn.Module:
    """Make the BatchNorm layers of ``module`` normalise over the batches of all ranks.

    Parameter and buffer names stay as they were, so checkpoints match single-process ones.
    """
    if not context.enabled:
        return module
    device_types = {p.device.type for p in module.parameters()}
    if device_types - {"cpu"}:
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(module)
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and not hasattr(
            layer, "_gctkd_local_forward"
        ):
            layer._gctkd_local_forward = layer.forward
            layer.forward = functools.partial(_reduced_batch_norm, layer)
    return module


class _TrainingForward(nn.Module):
    """The trainable modules as one module whose forward is the task's training loss.

    DistributedDataParallel wraps this, so it synchronises the gradients of the model and
    of any trained helper, while the task (and a frozen teacher it holds) stays outside.
    """

    def __init__(self, task: Any, trainable: nn.ModuleDict) -> None:
        super().__init__()
        self.trainable = trainable
        self._task = task

    def forward(
        self, images: torch.Tensor, targets: torch.Tensor, knobs: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        return self._task.training_loss(images, targets, knobs)


def wrap_training_forward(
    task: Any, trainable: nn.ModuleDict, context: DistributedContext, device: torch.device
) -> nn.Module:
    """DistributedDataParallel over the trainable modules, calling ``task.training_loss``."""
    from torch.nn.parallel import DistributedDataParallel

    forward = _TrainingForward(task, trainable)
    device_ids = [device.index] if device.type == "cuda" else None
    # BatchNorm statistics are synchronised, so buffers agree without broadcasting them at
    # every forward (the weights and buffers are still broadcast from rank 0 at the start)
    options = inspect.signature(DistributedDataParallel.__init__).parameters
    name = "forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers"
    return DistributedDataParallel(forward, device_ids=device_ids, **{name: False})
