"""Multi-process training with torch.distributed: process group set-up, feature gathering, the global-batch loss.

Launch with torchrun (``python -m torch.distributed.run --nproc_per_node N -m MedCLIPSAMLib finetune ...``):
torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and `init_distributed` reads them. The
backend is NCCL when the device is a CUDA GPU and gloo otherwise.

Why the gradient of `global_batch_loss` is exact. Let G be the global batch (W ranks with B pairs each), f_r the
features of rank r, L the single-process loss on the concatenated batch, and
``L = sum_r L_r`` with ``L_r = (1/G) * sum_{i in rows of r} (l_i^image->text + l_i^text->image)``,
where every l_i uses all G candidates. Rank r computes ``W * L_r`` from its own features (with autograd) and
the features of all ranks gathered by ``torch.distributed.nn.functional.all_gather``, whose backward sums the
incoming gradients of every rank's copy of f_r. So the gradient reaching f_r on rank r is
``sum_s W * dL_s / df_r = W * dL / df_r``. Each rank back-propagates that through its own encoder, and DDP
averages the parameter gradients over the W ranks, which gives ``sum_r (df_r/dtheta)^T dL/df_r = dL/dtheta``:
the single-process gradient. The returned value ``W * L_r`` averages over ranks to L.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from MedCLIPSAMLib.errors import InvalidInputError
from MedCLIPSAMLib.finetune.losses import ContrastiveLoss

__all__ = [
    "DistributedContext",
    "all_gather_with_grad",
    "all_gather_variable",
    "average_across_ranks",
    "barrier",
    "cleanup_distributed",
    "global_batch_loss",
    "init_distributed",
    "single_process_context",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """Position of this process in the job: its rank, the number of processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that saves files and logs progress (rank 0)."""
        return self.rank == 0


def single_process_context(device: torch.device) -> DistributedContext:
    """Return the context of a plain, single-process run on `device`."""
    return DistributedContext(rank=0, world_size=1, local_rank=0, device=device, backend=None)


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group that torchrun describes in the environment, or return a single-process context.

    With WORLD_SIZE > 1 in the environment, the process group is created (env:// rendezvous) with NCCL when
    `device` is CUDA, else gloo. Each CUDA process uses GPU LOCAL_RANK. Without torchrun's variables, or with
    WORLD_SIZE 1, nothing is initialised.

    Args:
        device: The device resolved for this run (``cuda`` picks the local rank's GPU).

    Raises:
        InvalidInputError: the environment lacks RANK or LOCAL_RANK while WORLD_SIZE > 1, or more CUDA processes
            run on this node than it has GPUs.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return single_process_context(device)
    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        raise InvalidInputError(
            "WORLD_SIZE > 1 but RANK or LOCAL_RANK is not set; launch distributed runs with torchrun "
            "(python -m torch.distributed.run --nproc_per_node N ...)."
        )
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InvalidInputError(
                f"Local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; start at most "
                "that many processes per node (--nproc_per_node)."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", world_size=world_size, rank=rank)
    logger.info("Joined process group: rank %d of %d, backend %s, device %s", rank, world_size, backend, device)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def cleanup_distributed() -> None:
    """Destroy the process group if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    """Wait until every rank reaches this point (no-op in a single process)."""
    if context.is_distributed:
        dist.barrier()


def all_gather_with_grad(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Concatenate the [B, ...] tensors of all ranks in rank order into [W * B, ...], keeping autograd.

    The backward pass sums, for each rank's slice, the gradients computed on every rank. All ranks must pass
    the same shape; the training sampler guarantees equal local batch sizes.
    """
    if not context.is_distributed:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


def all_gather_variable(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Concatenate [N_r, ...] tensors of all ranks (N_r may differ) in rank order, without autograd."""
    if not context.is_distributed:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(context.world_size)]
    dist.all_gather(sizes, size)
    counts = [int(value.item()) for value in sizes]
    padded = tensor.new_zeros((max(counts),) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(context.world_size)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([part[:count] for part, count in zip(gathered, counts)], dim=0)


def average_across_ranks(value: float, context: DistributedContext) -> float:
    """Return the mean of a Python number over all ranks (the number itself in a single process)."""
    if not context.is_distributed:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item()) / context.world_size


def global_batch_loss(
    loss: ContrastiveLoss,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    context: DistributedContext,
) -> torch.Tensor:
    """Compute this rank's share of the loss over the global batch, scaled for DDP's gradient averaging.

    Args:
        loss: The contrastive loss (name, temperature, hardness).
        image_features: [B, D] L2-normalised image embeddings of this rank's pairs, with autograd.
        text_features: [B, D] L2-normalised text embeddings of the same pairs.
        context: Rank and world size; in a single process this is ``loss(image_features, text_features)``.

    Returns:
        0-d tensor ``W * L_r`` (see the module docstring): its mean over ranks equals the loss of the
        concatenated global batch, and back-propagating it on every rank, followed by DDP's gradient averaging,
        gives the single-process gradient on the concatenated batch.

    Raises:
        InvalidInputError: the global batch contains fewer than 2 pairs.
    """
    if not context.is_distributed:
        return loss(image_features, text_features)
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise InvalidInputError(
            "image_features and text_features must be [B, D] tensors of the same shape, got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}."
        )
    all_image_features = all_gather_with_grad(image_features, context)
    all_text_features = all_gather_with_grad(text_features, context)
    global_batch = all_image_features.shape[0]
    if global_batch < 2:
        raise InvalidInputError("A contrastive loss needs a global batch of at least 2 image-text pairs, got 1.")
    local_batch = image_features.shape[0]
    offset = context.rank * local_batch
    positive_index = torch.arange(offset, offset + local_batch, device=image_features.device)
    image_to_text, text_to_image = loss.row_losses(
        image_features, text_features, all_image_features, all_text_features, positive_index
    )
    return context.world_size * (image_to_text.sum() + text_to_image.sum()) / global_batch
